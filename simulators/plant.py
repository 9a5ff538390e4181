"""The plant interface: anything with knobs and readings.

A task drives a plant; a simulated plant (here), an EPICS plant (``hardware``) and a
guarded plant (``safety``) all implement this same small interface, so deployment is
literally swapping the plant under the same task code.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

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

    def clip_to_limits(self, values: np.ndarray) -> np.ndarray:
        """Values limited to every knob's range (what a power supply does)."""
        lower = np.array([k.lower for k in self.knobs])
        upper = np.array([k.upper for k in self.knobs])
        return np.clip(np.asarray(values, dtype=float), lower, upper)


class SimulatedPlant(Plant):
    """A plant backed by a simulator: ``reset(seed)`` draws a new machine."""

    @abstractmethod
    def reset(self, seed: int | None = None) -> None:
        """Draw a new machine from the error model and set the knobs to zero."""

    @staticmethod
    def now(n: int) -> np.ndarray:
        return np.full(n, time.time())
