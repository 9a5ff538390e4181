"""The plant interface: anything with knobs and readings.

A task drives a plant; a simulated plant (``simulators``), an EPICS plant
(``hardware``) and a guarded plant (``safety``) all implement this same small
interface, so deployment is literally swapping the plant under the same task code.
Imports nothing from the project: every room builds on it.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class KnobSpec:
    """A settable channel: limits and the largest change allowed in one step."""

    name: str
    unit: str
    lower: float
    upper: float
    max_step: float
    tolerance: float = 1e-6  # a read-back within this of the setting counts as equal


@dataclass(frozen=True)
class ReadingSpec:
    """A measured channel and the range outside which a value is not trusted."""

    name: str
    unit: str
    lower: float = -np.inf
    upper: float = np.inf


@dataclass
class Readings:
    """One read of every reading channel, in the order of ``Plant.readings``."""

    values: np.ndarray
    timestamps: np.ndarray
    valid: np.ndarray
    interlocks: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # channel -> why it is not valid

    @property
    def all_valid(self) -> bool:
        return bool(self.valid.all())


# How an interlock channel trips a session (evaluated by safety.guard.InterlockRule):
# below a fraction of its value at the start, below/above a threshold, or not equal to it.
InterlockRuleKind = Literal["min_fraction_of_start", "min", "max", "equals"]


@dataclass
class Event:
    """Something worth recording in a session: a clamp, a trip, a task's own decision..."""

    time: float
    kind: str  # clamp, delay, proposal, approved, rejected, trip, restore, abort, start, ...
    reason: str
    data: dict = field(default_factory=dict)


class PlantFault(RuntimeError):
    """The plant cannot be trusted any more (lost connection, write not verified...)."""


class ConnectionLost(PlantFault):
    """A channel stopped answering: stop writing; restore later from the snapshot."""


class Plant(ABC):
    """Knobs and readings of a machine (simulated or real)."""

    knobs: list[KnobSpec]
    readings: list[ReadingSpec]

    @abstractmethod
    def read_knobs(self) -> np.ndarray:
        """Current knob settings, in ``knobs`` order."""

    @abstractmethod
    def write_knobs(self, values: np.ndarray) -> None:
        """Set every knob; return once settled and verified, or raise PlantFault."""

    @abstractmethod
    def read(self) -> Readings:
        """Read every reading channel."""

    def close(self) -> None:
        """Release connections; a simulated plant has none."""

    def channels(self, values: np.ndarray) -> dict[str, float]:
        """Knob values as the machine knows them, by channel (a simulated plant: by knob name).

        Snapshots keep these, so a restore writes what was there whatever scale a
        machine file states later.
        """
        return {k.name: float(v) for k, v in zip(self.knobs, values)}

    def from_channels(self, channels: dict[str, float]) -> np.ndarray:
        """Knob values from :meth:`channels` values; ValueError naming a channel that is missing."""
        names = list(self.channels(np.zeros(len(self.knobs))))
        missing = [n for n in names if n not in channels]
        if missing:
            raise ValueError(f"snapshot has no value for {', '.join(missing)}")
        return np.array([channels[n] for n in names], dtype=float)

    def clip_to_limits(self, values: np.ndarray) -> np.ndarray:
        """Values limited to every knob's range (what a power supply does)."""
        lower, upper = knob_bounds(self.knobs)
        return np.clip(np.asarray(values, dtype=float), lower, upper)


def knob_bounds(knobs: list[KnobSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) limit arrays of `knobs`, in their order."""
    return np.array([k.lower for k in knobs], dtype=float), np.array([k.upper for k in knobs], dtype=float)


def knob_steps(knobs: list[KnobSpec]) -> np.ndarray:
    """Largest change per step of every knob."""
    return np.array([k.max_step for k in knobs], dtype=float)


def knob_tolerances(knobs: list[KnobSpec]) -> np.ndarray:
    """Read-back tolerance of every knob."""
    return np.array([k.tolerance for k in knobs], dtype=float)


class SimulatedPlant(Plant):
    """A plant backed by a simulator: ``reset(seed)`` draws a new machine.

    ``faults`` names the faults the simulator can inject (the virtual IOC serves one
    ``SIM:<name>`` PV for each); ``set_fault`` switches one on (non-zero) or off.
    """

    faults: tuple[str, ...] = ()
    # A plant whose every write runs one settlement period (a battery) sets the period's
    # length here: served by the virtual IOC, the periods run on the IOC's own clock.
    period_s: float | None = None

    def set_fault(self, name: str, value: int) -> None:
        raise KeyError(f"{type(self).__name__} has no fault {name!r}")

    def warm_up(self) -> None:
        """Do any one-off work (compiling) now, not in the first period a clock serves:
        a late first period would be caught up with back-to-back periods."""

    @abstractmethod
    def reset(self, seed: int | None = None) -> None:
        """Draw a new machine from the error model and set the knobs to zero."""

    @staticmethod
    def now(n: int) -> np.ndarray:
        return np.full(n, time.time())
