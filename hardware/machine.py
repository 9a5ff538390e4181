"""Machine files: the contract between the software and a real machine.

PV names, units, the signed scale from simulator units to engineering units
(polarity and the sim-to-real factor; the TBSAC paper used 1.85 A per unit), limits,
largest change per step, read-back tolerance and settle time for every knob (corrector,
steerer or solenoid supply); the X/Y PVs of every BPM (orbit task) or the PVs of the
current monitors (RFQ task); interlock channels with their trip rules.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from simulators.config import ConfigError, load_yaml_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorrectorChannel(_Strict):
    """One magnet power supply the agent drives (corrector, steerer or solenoid)."""

    name: str
    setpoint: str
    readback: str
    scale: float = Field(description="engineering units per simulator unit; the sign is the polarity")
    unit: str = "A"
    lower: float = Field(description="lowest allowed setpoint, engineering units")
    upper: float = Field(description="highest allowed setpoint, engineering units")
    max_step: PositiveFloat = Field(description="largest change in one step, engineering units")
    tolerance: PositiveFloat = Field(description="read-back must match the setpoint within this")
    settle_timeout_s: PositiveFloat = 10.0

    @model_validator(mode="after")
    def _check(self) -> "CorrectorChannel":
        if self.scale == 0:
            raise ValueError("scale must not be zero")
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


class BpmChannel(_Strict):
    """One beam position monitor (both planes)."""

    name: str
    x: str
    y: str
    status: str | None = Field(default=None, description="optional PV, non-zero = reading not valid")
    unit: Literal["mm"] = "mm"
    range_mm: PositiveFloat = Field(20.0, description="readings at or beyond this are saturated")


class MonitorChannel(_Strict):
    """One scalar beam monitor read by the RFQ task (e.g. a current transformer, a Faraday cup)."""

    name: str
    pv: str
    unit: str = "mA"
    lower: float = 0.0
    upper: float = Field(description="full scale: readings at or beyond it are saturated")


class Interlock(_Strict):
    """A channel that trips the session when its rule is violated.

    Rules: ``min_fraction_of_start`` (e.g. beam current must stay above
    threshold x its value at the start), ``min`` and ``max`` (absolute), ``equals``
    (e.g. an MPS-OK PV must read 1).
    """

    name: str
    pv: str
    rule: Literal["min_fraction_of_start", "min", "max", "equals"]
    threshold: float


class MachineFile(_Strict):
    """A whole machine as the software sees it."""

    name: str
    description: str = ""
    task: Literal["orbit", "rfq"] = Field("orbit", description="what the machine is tuned for")
    lattice: str = Field(description="shipped lattice (beamline for orbit, injector for rfq) or path")
    correctors: list[CorrectorChannel] = Field(min_length=1)
    bpms: list[BpmChannel] = Field(default_factory=list)
    monitors: list[MonitorChannel] = Field(default_factory=list)
    interlocks: list[Interlock] = Field(default_factory=list)
    samples_per_reading: PositiveInt = 1
    connection_timeout_s: PositiveFloat = 2.0
    read_timeout_s: PositiveFloat = 1.0
    stale_after_s: PositiveFloat = Field(5.0, description="a reading older than this is a fault")

    @model_validator(mode="after")
    def _unique(self) -> "MachineFile":
        if self.task == "orbit" and (not self.bpms or self.monitors):
            raise ValueError("an orbit machine needs bpms (at least one) and no monitors")
        if self.task == "rfq" and (self.bpms or not self.monitors):
            raise ValueError("an rfq machine needs monitors (at least one) and no bpms")
        names = [c.name for c in self.correctors] + [b.name for b in self.bpms] + [m.name for m in self.monitors]
        names += [i.name for i in self.interlocks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"names used twice: {sorted(dup)}")
        return self

    def all_pvs(self) -> list[str]:
        pvs = [p for c in self.correctors for p in (c.setpoint, c.readback)]
        pvs += [p for b in self.bpms for p in (b.x, b.y, b.status) if p]
        pvs += [m.pv for m in self.monitors]
        pvs += [i.pv for i in self.interlocks]
        return pvs


MACHINE_DIR = resources.files("hardware") / "machines"


def load_machine(name_or_path: str | Path) -> tuple[MachineFile, Path]:
    """A shipped machine file by name (e.g. ``virtual-cafe2-cm1``) or a path."""
    path = Path(name_or_path)
    if not path.exists() and not path.suffix:
        candidate = MACHINE_DIR / f"{name_or_path}.yaml"
        if candidate.is_file():
            path = Path(str(candidate))
    if not path.is_file():
        shipped = sorted(p.name[:-5] for p in MACHINE_DIR.iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"machine {str(name_or_path)!r}: no such file (shipped: {', '.join(shipped)})")
    return load_yaml_model(MachineFile, path), path


def load_machine_lattice(machine: MachineFile, path: Path):
    """The machine's lattice (beamline or injector, by task), checked against the machine."""
    if machine.task == "rfq":
        from simulators.injector.model import load_injector

        lattice = load_injector(machine.lattice)
    else:
        from simulators.beamline.lattice import load_lattice

        lattice = load_lattice(machine.lattice)
    check_matches_lattice(machine, path, lattice)
    return lattice


RFQ_MONITORS = ["ACCT", "FC"]  # the transmission is FC / ACCT


def check_matches_lattice(machine: MachineFile, path: Path, lattice) -> None:
    """The machine's knob and monitor names must be the lattice's, in the same order."""
    if machine.task == "rfq":
        pairs = (("correctors", [c.name for c in machine.correctors], lattice.knob_names),
                 ("monitors", [m.name for m in machine.monitors], RFQ_MONITORS))
    else:
        pairs = (("correctors", [c.name for c in machine.correctors], lattice.corrector_names),
                 ("bpms", [b.name for b in machine.bpms], lattice.bpm_names))
    for field, mine, theirs in pairs:
        if mine != theirs:
            raise ConfigError(f"{path}: field '{field}': names {mine} do not match lattice {lattice.name} {theirs}")
