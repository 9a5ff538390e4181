"""Opening a machine (the one place that does): a machine file over EPICS, or a simulated
machine ``sim-<lattice>`` of any registered task; and the generic layout consoles draw.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.config import ConfigError
from core.plant import Plant, SimulatedPlant
from core.registry import get_task, task_names
from core.task import TaskDefinition
from hardware.machine import MACHINE_DIR, MachineFile, load_machine
from safety.guard import InterlockRule

from .locks import MachineLock

SIM_PREFIX = "sim-"


@dataclass
class Machine:
    """An opened machine: its task, setup, plant and interlock rules."""

    name: str
    kind: str  # epics or simulated
    definition: TaskDefinition
    setup: object
    plant: Plant
    interlocks: list[InterlockRule]
    record: dict  # what the store keeps of it (name, kind, content, path)
    path: Path | None = None
    machine_file: MachineFile | None = None

    def panels(self) -> list[dict]:
        """The console panels of the machine's task."""
        return self.definition.panels(self.setup)

    def engineering(self) -> list[dict] | None:
        """Per knob, the machine file's engineering unit and signed scale per simulator unit
        (None for a simulated machine: its units are the simulator's)."""
        if self.machine_file is None:
            return None
        return [{"unit": c.unit, "scale": c.scale} for c in self.machine_file.knobs]

    def lock(self) -> MachineLock | None:
        """The machine's cross-process lock (None for a simulated machine: each session has its own)."""
        if self.machine_file is None:
            return None
        return MachineLock([k.setpoint for k in self.machine_file.knobs], self.name)

    def connect(self) -> "Machine":
        """Connect the plant (EPICS: every PV, with a timeout)."""
        if hasattr(self.plant, "connect"):
            self.plant.connect()
        return self


def _default_errors(definition: TaskDefinition) -> str:
    presets = definition.error_presets()
    return "test" if "test" in presets else presets[0]


@functools.lru_cache(maxsize=64)
def _reference_plant(task: str, setup_name: str, setup_path: str | None = None) -> SimulatedPlant:
    """The simulated plant of a setup: its knob and reading specs are the reference every
    machine file of that setup must match (cached: building a model can take a while)."""
    definition = get_task(task)
    setup = definition.load_setup(setup_path or setup_name)
    return definition.sim_plant(setup, definition.load_errors(_default_errors(definition)))


def machine_setup(machine: MachineFile, path: Path) -> tuple[TaskDefinition, object, SimulatedPlant]:
    """The machine's task, its setup and the setup's simulated plant, checked against the machine file."""
    try:
        definition = get_task(machine.task)
    except ConfigError as exc:
        raise ConfigError(f"{path}: field 'task': {exc}") from None
    lattice = machine.lattice
    if lattice not in definition.shipped_setups() and not Path(lattice).is_absolute():
        beside = Path(path).parent / lattice
        lattice = str(beside) if beside.is_file() else lattice
    setup = definition.load_setup(lattice)
    reference = _reference_plant(definition.name, setup.name, None if lattice in definition.shipped_setups() else lattice)
    from hardware.epics_plant import EpicsPlant

    epics = EpicsPlant(machine, path)
    for field, mine, theirs in (("knobs", [k.name for k in epics.knobs], [k.name for k in reference.knobs]),
                                ("readings (bpms, monitors)", [r.name for r in epics.readings],
                                 [r.name for r in reference.readings])):
        if mine != theirs:
            raise ConfigError(f"{path}: field '{field}': names {mine} do not match lattice {setup.name} {theirs}")
    return definition, setup, reference


def epics_plant(machine: MachineFile, path: Path, reference: SimulatedPlant):
    """The machine's EPICS plant (not connected), its knobs in the setup's units."""
    from hardware.epics_plant import EpicsPlant

    return EpicsPlant(machine, path, knob_units=[k.unit for k in reference.knobs])


def machine_record_from_file(machine: MachineFile, path: Path) -> dict:
    return {"name": machine.name, "kind": "epics", "content": Path(path).read_text(), "path": str(Path(path).resolve())}


def _simulated_setup(name: str) -> tuple[TaskDefinition, str] | None:
    if not name.startswith(SIM_PREFIX):
        return None
    setup = name[len(SIM_PREFIX):]
    for task in task_names():
        definition = get_task(task)
        if setup in definition.shipped_setups():
            return definition, setup
    return None


def open_machine(name_or_path: str, seed: int = 0, errors: str | None = None, connect: bool = True) -> Machine:
    """A simulated machine ``sim-<lattice>`` (hidden errors drawn from `seed`) or a machine
    file by shipped name or path, connected over EPICS."""
    simulated = _simulated_setup(name_or_path)
    if simulated:
        definition, setup_name = simulated
        setup = definition.load_setup(setup_name)
        errors = errors or _default_errors(definition)
        plant = definition.sim_plant(setup, definition.load_errors(errors))
        plant.reset(seed)
        rules = [InterlockRule(**rule) for rule in definition.sim_interlocks]
        record = {"name": name_or_path, "kind": "simulated", "path": None,
                  "content": yaml.safe_dump({"task": definition.name, "lattice": setup_name, "errors": errors, "seed": seed})}
        return Machine(name_or_path, "simulated", definition, setup, plant, rules, record)
    machine, path = load_machine(name_or_path)
    definition, setup, reference = machine_setup(machine, path)
    plant = epics_plant(machine, path, reference)
    if connect:
        plant.connect()
    rules = [InterlockRule(i.name, i.rule, i.threshold) for i in machine.interlocks]
    return Machine(machine.name, "epics", definition, setup, plant, rules, machine_record_from_file(machine, path),
                   path, machine)


def _layout(definition: TaskDefinition, setup, plant: Plant, machine_file=None) -> dict:
    """What a console needs to draw a machine: knobs (simulator units and limits, and the
    machine file's engineering unit and signed scale per simulator unit), readings,
    metrics, panels. A simulated machine's engineering units are its simulator units."""
    wired = [(c.unit, c.scale) for c in machine_file.knobs] if machine_file else [(k.unit, 1.0) for k in plant.knobs]
    return {
        "task": definition.name,
        "knobs": [{"name": k.name, "unit": k.unit, "lower": k.lower, "upper": k.upper,
                   "engineering": {"unit": unit, "scale": scale}} for k, (unit, scale) in zip(plant.knobs, wired)],
        "readings": [{"name": r.name, "unit": r.unit} for r in plant.readings],
        "metrics": [dataclasses.asdict(m) for m in definition.metrics],
        "panels": definition.panels(setup),
    }


@functools.lru_cache(maxsize=1)
def list_machines() -> tuple[dict, ...]:
    """Shipped machine files (EPICS, by task in registration order) and one simulated machine
    per shipped setup of every task.

    Cached: the layout does not change while a server runs.
    """
    out = []
    for p in sorted(MACHINE_DIR.iterdir(), key=lambda p: p.name):
        if p.name.endswith(".yaml"):
            machine, path = load_machine(Path(str(p)))
            definition, setup, reference = machine_setup(machine, path)
            out.append({"name": machine.name, "kind": "epics", "lattice": machine.lattice, "description": machine.description,
                        "interlocks": [i.name for i in machine.interlocks],
                        **_layout(definition, setup, epics_plant(machine, path, reference), machine)})
    # Machine files by task in registration order (the beamline first: a console's default
    # choice is the first machine), then by name.
    order = {name: i for i, name in enumerate(task_names())}
    out.sort(key=lambda m: (order.get(m["task"], len(order)), m["name"]))
    for task in task_names():
        definition = get_task(task)
        for name in definition.shipped_setups():
            setup = definition.load_setup(name)
            out.append({"name": SIM_PREFIX + name, "kind": "simulated", "lattice": name,
                        "description": f"{name} in simulation ({definition.description}; hidden errors drawn from a seed)",
                        "interlocks": [r["name"] for r in definition.sim_interlocks],
                        **_layout(definition, setup, _reference_plant(task, name))})
    return tuple(out)


class MachineWatches:
    """What the listed EPICS machines' interlock channels read right now, each machine
    watched (Channel Access monitors) from the first time it is asked for.

    This is how a console learns that an IOC died while a session waits for an operator:
    the session reads nothing then, the watch sees the circuit drop at once.
    """

    def __init__(self):
        self._watches: dict[str, object] = {}
        self._lock = threading.Lock()

    def live(self, name: str) -> dict:
        """``{"machine", "watched", "time", "ok", "channels": [...]}``; each channel says
        connected, value, severity, how long since its connection changed, and its problem
        ('' when fine: an absolute interlock rule holds, the IOC answers)."""
        listed = next((m for m in list_machines() if m["name"] == name), None)
        if listed is None:
            raise LookupError(f"machine {name!r} is not listed")
        if listed["kind"] != "epics":
            return {"machine": name, "watched": False, "time": time.time(),
                    "why": "a simulated machine lives inside its session: its readings are the session's steps"}
        with self._lock:
            watch = self._watches.get(name)
            if watch is None:
                from hardware.epics_plant import ChannelWatch

                machine_file, _ = load_machine(name)
                watch = self._watches[name] = ChannelWatch(machine_file)
        rules = {i.name: InterlockRule(i.name, i.rule, i.threshold) for i in watch.machine.interlocks}
        channels = []
        for c in watch.snapshot():
            if not c["connected"]:
                problem = f"no connection to {c['pv']} for {c['changed_s_ago']:.0f} s (IOC down or unreachable?)"
            elif c["value"] is None:
                problem = f"{c['pv']}: connected, no value yet"
            elif not math.isfinite(c["value"]):
                c = dict(c, value=None)  # JSON has no NaN
                problem = f"{c['pv']}: not a number"
            elif (c["severity"] or 0) >= 3:
                problem = f"{c['pv']}: INVALID severity"
            else:
                # min_fraction_of_start needs a session's start value: only absolute rules here.
                problem = rules[c["name"]].violated(c["value"], None) if c["name"] in rules else ""
            channels.append(dict(c, problem=problem))
        return {"machine": name, "watched": True, "time": time.time(), "ok": not any(c["problem"] for c in channels),
                "channels": channels}

    def close(self) -> None:
        with self._lock:
            for watch in self._watches.values():
                watch.close()
            self._watches.clear()
