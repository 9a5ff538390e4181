"""Machine files: the contract between the software and a real machine.

The task the machine is tuned for (a registered task name) and its setup (lattice);
PV names, units, the signed scale from simulator units to engineering units
(polarity and the sim-to-real factor; the TBSAC paper used 1.85 A per unit), limits,
largest change per step, read-back tolerance and settle time for every knob (a
corrector, steerer, solenoid or any other supply); the readings: X/Y PVs of BPMs
and/or scalar monitors (current monitors, sensors); interlock channels with their
trip rules. Every number must be finite.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from core.config import ConfigError, load_yaml_model
from core.plant import InterlockRuleKind


class _Strict(BaseModel):
    # NaN or infinity in a limit or a threshold would switch its check off.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class KnobChannel(_Strict):
    """One supply the agent drives (a corrector, steerer or solenoid; a heater...)."""

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
    def _check(self) -> "KnobChannel":
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
    """One scalar reading (e.g. a current transformer, a Faraday cup, a thermometer)."""

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
    rule: InterlockRuleKind
    threshold: float


class PeriodClock(_Strict):
    """A machine that runs in settlement periods (a battery's EMS): a counter PV that
    advances when a period has run. Every read waits for a period not read before."""

    pv: str
    timeout_s: PositiveFloat = Field(description="no new period within this while a read waits is a fault (stale feed)")


class MachineFile(_Strict):
    """A whole machine as the software sees it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="letters, digits, '.', '_' and '-' (it names files in the data directory)")
    description: str = ""
    task: str = Field(description="the registered task the machine is tuned for (`tbsac info` lists them)")
    lattice: str = Field(description="the task's shipped setup (lattice) or a path to one")
    knobs: list[KnobChannel] = Field(min_length=1, validation_alias=AliasChoices("knobs", "correctors"))
    bpms: list[BpmChannel] = Field(default_factory=list)
    monitors: list[MonitorChannel] = Field(default_factory=list)
    interlocks: list[Interlock] = Field(default_factory=list)
    samples_per_reading: PositiveInt = 1
    connection_timeout_s: PositiveFloat = 2.0
    read_timeout_s: PositiveFloat = 1.0
    stale_after_s: PositiveFloat = Field(5.0, description="a reading older than this is a fault")
    min_step_interval_s: NonNegativeFloat = Field(1.0, description="auto sessions run from the control server take at "
                                                  "least this long per step, so that an operator can stop between steps")
    clock: PeriodClock | None = None

    @model_validator(mode="after")
    def _unique(self) -> "MachineFile":
        if not self.bpms and not self.monitors:
            raise ValueError("a machine needs readings: bpms or monitors (at least one)")
        names = [c.name for c in self.knobs] + [b.name for b in self.bpms] + [m.name for m in self.monitors]
        names += [i.name for i in self.interlocks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"names used twice: {sorted(dup)}")
        return self

    def all_pvs(self) -> list[str]:
        pvs = [p for c in self.knobs for p in (c.setpoint, c.readback)]
        pvs += [p for b in self.bpms for p in (b.x, b.y, b.status) if p]
        pvs += [m.pv for m in self.monitors]
        pvs += [i.pv for i in self.interlocks]
        if self.clock:
            pvs.append(self.clock.pv)
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
