"""The methods operators use today, as controllers acting on the same task as the agent.

Every controller sees only what the agent sees (the trend observation, whose last N
entries are the BPM readings in mm) and returns a normalised action in [-1, 1]^n, so
all methods run on the same environment, seeds and step limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from simulators.beamline.errors import MachineErrors
from simulators.beamline.lattice import Lattice
from simulators.beamline.model import BeamlineModel


class BaselineController(ABC):
    """Chooses an action from an observation; ``begin`` is called at each episode start."""

    def begin(self) -> None:
        """Forget everything about the previous machine."""

    @abstractmethod
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Normalised action for this observation."""


def fit_to_step(delta: np.ndarray, action_scale: float) -> np.ndarray:
    """Corrector change -> action; scaled down as a whole to keep its direction."""
    action = delta / action_scale
    peak = np.abs(action).max()
    return action / peak if peak > 1.0 else action


def truncated_pinv(r: np.ndarray, rcond: float = 1e-2) -> np.ndarray:
    """Pseudo-inverse dropping singular values below rcond * largest (noise amplifiers)."""
    return np.linalg.pinv(r, rcond=rcond)


class DoNothing(BaselineController):
    def __init__(self, n_actions: int):
        self.n_actions = n_actions

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(self.n_actions)


class SvdModel(BaselineController):
    """Iterative SVD orbit correction with the response matrix of the nominal model."""

    def __init__(self, lattice: Lattice, action_scale: float = 1.0, gain: float = 1.0):
        model = BeamlineModel(lattice)
        self.response_matrix = model.response(MachineErrors.nominal(lattice)).r[0]
        self.inverse = truncated_pinv(self.response_matrix)
        self.n_readings = lattice.n_readings
        self.action_scale = action_scale
        self.gain = gain

    def act(self, obs: np.ndarray) -> np.ndarray:
        b = np.asarray(obs[-self.n_readings :], dtype=float)
        return fit_to_step(-self.gain * self.inverse @ b, self.action_scale)


class SvdMeasured(BaselineController):
    """SVD correction with a response matrix measured on the machine itself.

    Each corrector is probed in turn by ``probe`` units (one step each, undoing the
    previous probe in the same step); the probe steps count as steps. Then iterative
    SVD correction with the measured matrix.
    """

    def __init__(self, lattice: Lattice, action_scale: float = 1.0, gain: float = 1.0, probe: float = 1.0):
        self.n_readings = lattice.n_readings
        self.n_actions = lattice.n_correctors
        self.action_scale = action_scale
        self.gain = gain
        self.probe = min(probe, action_scale)
        self.begin()

    def begin(self) -> None:
        self.k = 0
        self.base: np.ndarray | None = None
        self.response_matrix = np.zeros((self.n_readings, self.n_actions))
        self.inverse: np.ndarray | None = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        b = np.asarray(obs[-self.n_readings :], dtype=float)
        n = self.n_actions
        delta = np.zeros(n)
        if self.k == 0:
            self.base = b
        else:
            j = self.k - 1
            if j < n:
                self.response_matrix[:, j] = (b - self.base) / self.probe
        if self.k < n:
            delta[self.k] = self.probe
            if self.k > 0:
                delta[self.k - 1] = -self.probe
            self.k += 1
            return delta / self.action_scale
        if self.inverse is None:
            self.inverse = truncated_pinv(self.response_matrix)
            # Undo the last probe and correct the orbit as it was without it.
            delta[n - 1] = -self.probe
            b = b - self.response_matrix[:, n - 1] * self.probe
        self.k += 1
        return fit_to_step(delta - self.gain * self.inverse @ b, self.action_scale)
