"""RFQ transmission tuning: error model, simulated plant, task and Gymnasium environment.

The paper does not publish knobs, observation or reward for this task; the choices:

- knobs: the two solenoid fields (T) and two H/V steerer pairs (mrad) of the LEBT;
- observation: a trend of the last steps (transmission change and the knob change
  behind it), the local slope of the transmission over the knobs (least squares over
  the recent steps), the readings [ACCT / nominal, cup / nominal, transmission], the
  knob offsets from the start, the way back to the best setting so far, the budget used;
- action: knob changes in [-1, 1], times each knob's largest change per step (from the
  lattice: the last solenoid before the RFQ needs much finer steps than the steerers);
- reward: ``T_t - 1 + 5 (T_t - T_{t-1})``: every step below full transmission costs,
  and improvements are paid at once; 30 steps per episode (the acceptance budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat

from simulators.plant import KnobSpec, Plant, ReadingSpec, Readings, SimulatedPlant

from .model import InjectorLattice, InjectorModel, SourceErrors


class InjectorErrorModel(BaseModel):
    """Source and LEBT imperfections, redrawn at every reset (half-widths of uniforms)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    # Calibrated so untuned injectors start like the paper's (median transmission ~0.65).
    offset_mm: NonNegativeFloat = 4.0
    angle_mrad: NonNegativeFloat = 20.0
    beta_error: float = Field(0.5, ge=0, lt=1, description="beta x (1 + U(-r, r))")
    alpha_shift: NonNegativeFloat = 1.0
    current_error: float = Field(0.1, ge=0, lt=1)
    solenoid_error: float = Field(0.0, ge=0, lt=0.5, description="field calibration, relative")
    reading_noise: float = Field(0.005, ge=0, description="relative noise of ACCT and cup")

    def draw(self, rng: np.random.Generator, n_solenoids: int) -> SourceErrors:
        u = lambda r, n=None: rng.uniform(-r, r, n)  # noqa: E731
        return SourceErrors(
            offset_mm=tuple(u(self.offset_mm, 2)), angle_mrad=tuple(u(self.angle_mrad, 2)),
            beta_scale=1.0 + u(self.beta_error), alpha_shift=u(self.alpha_shift),
            current_scale=1.0 + u(self.current_error),
            solenoid_scale=tuple(1.0 + u(self.solenoid_error, n_solenoids)),
        )


INJECTOR_PRESETS = {
    "train": InjectorErrorModel(name="train"),
    "test": InjectorErrorModel(name="test", solenoid_error=0.05),
}


def load_injector_errors(name: str) -> InjectorErrorModel:
    from simulators.config import ConfigError

    if name not in INJECTOR_PRESETS:
        raise ConfigError(f"injector error model {name!r}: expected one of {', '.join(INJECTOR_PRESETS)}")
    return INJECTOR_PRESETS[name]


DESIGN_SOLENOIDS_T = (0.354, 0.303)  # best settings for the design beam (Nelder-Mead)


class InjectorSimPlant(SimulatedPlant):
    """A simulated injector: knobs are the LEBT settings, readings ACCT and cup (mA)."""

    def __init__(self, lattice: InjectorLattice, errors: InjectorErrorModel):
        self.lattice, self.error_model = lattice, errors
        self.knobs = [
            KnobSpec(n, "T" if ":" not in n else "mrad", lo, hi, step)
            for n, (lo, hi), step in zip(lattice.knob_names, lattice.knob_limits, lattice.knob_steps)
        ]
        self.readings = [ReadingSpec("ACCT", "mA", 0.0, 100.0), ReadingSpec("FC", "mA", 0.0, 100.0)]
        self.model: InjectorModel | None = None
        self._settings = self.initial_settings()
        self._rng = np.random.default_rng()

    def initial_settings(self) -> np.ndarray:
        """Where operators start: the design solenoid fields, steerers off."""
        values, sol = [], iter(DESIGN_SOLENOIDS_T)
        for name in self.lattice.knob_names:
            values.append(next(sol) if ":" not in name else 0.0)
        return np.array(values)

    def reset(self, seed: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        n_sol = sum(":" not in n for n in self.lattice.knob_names)
        errors = self.error_model.draw(rng, n_sol)
        self.model = InjectorModel(self.lattice, errors, seed=int(rng.integers(2**31)))
        self._rng = rng
        self._settings = self.initial_settings()

    def read_knobs(self) -> np.ndarray:
        return self._settings.copy()

    def write_knobs(self, values: np.ndarray) -> None:
        self._settings = self.clip_to_limits(values)

    def true_transmission(self, settings: np.ndarray | None = None) -> float:
        return self.model.currents(self._settings if settings is None else settings).transmission

    def read(self) -> Readings:
        c = self.model.currents(self._settings)
        noise = 1.0 + self._rng.normal(0.0, self.error_model.reading_noise, 2)
        values = np.array([c.acct_ma, c.cup_ma]) * noise
        transmission = values[1] / values[0] if values[0] > 0 else 0.0
        return Readings(values, self.now(2), np.ones(2, dtype=bool), {"transmission": float(transmission)})


@dataclass(frozen=True)
class TransmissionTaskConfig:
    max_steps: int = 30
    improvement_weight: float = 5.0
    target_transmission: float = 0.85  # reported (steps to 85 %), not an episode end
    # End on the best measured setting when it read this much more than the present one
    # (about 1.5 sigma of the difference of two readings at 0.5 % noise on ACCT and cup).
    return_margin: float = 0.01


@dataclass
class TransmissionTask:
    """Readings -> trend observation and reward; actions -> knob settings.

    A transmission reading is one number, so unlike the orbit task the state must
    carry the history that makes a direction visible: the trend holds, for each of the
    last ``HISTORY`` steps, the change of transmission and the knob change that caused
    it (the TBSAC trend of readings, extended by the actions), then the local slope of
    the transmission over the knobs (ridge least squares over the last ``SLOPE_POINTS``
    settings, in action units: the direction a tuner would push), the present readings,
    the knob offsets from the start, the distance to the best setting measured so far
    (the operator would go back to it) and the budget used.
    """

    HISTORY = 3
    SLOPE_POINTS = 8
    SLOPE_RIDGE = 0.1  # in (action units)^2: keeps the slope finite along unexplored directions

    knobs: list[KnobSpec]
    nominal_current_ma: float
    config: TransmissionTaskConfig = field(default_factory=TransmissionTaskConfig)

    def __post_init__(self) -> None:
        n = len(self.knobs)
        self.lower = np.array([k.lower for k in self.knobs])
        self.upper = np.array([k.upper for k in self.knobs])
        self.step_size = np.array([k.max_step for k in self.knobs])
        self.tolerance = np.array([k.tolerance for k in self.knobs])
        size = self.HISTORY * (1 + n) + n + 3 + n + 1 + n + 1
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (n,), np.float32)
        self.steps = 0

    def _r(self, plant: Plant) -> np.ndarray:
        r = plant.read()
        self.last_readings = r.values[:2].copy()
        acct, cup = r.values[:2]
        t = cup / acct if acct > 0 else 0.0
        return np.array([acct / self.nominal_current_ma, cup / self.nominal_current_ma, t])

    # Offsets are in units of 10 steps, transmission changes in units of 0.1: both O(1).
    def _offset(self, settings: np.ndarray) -> np.ndarray:
        return (settings - self.start_settings) / (10 * self.step_size)

    def _slope(self) -> np.ndarray:
        """dT per action unit of every knob, fitted to the recent (settings, T) points."""
        x = np.array([p for p, _ in self._points[-self.SLOPE_POINTS:]])
        t = np.array([v for _, v in self._points[-self.SLOPE_POINTS:]])
        dx, dt = x - x[-1], t - t[-1]
        return np.linalg.solve(dx.T @ dx + self.SLOPE_RIDGE * np.eye(x.shape[1]), dx.T @ dt)

    def _obs(self) -> np.ndarray:
        history = np.concatenate([np.concatenate([[10 * dt], a]) for dt, a in self._history])
        return np.concatenate([
            history, 10 * self._slope(), self._r_now, self._offset(self.settings),
            [10 * (self._best[0] - self._r_now[2])], self._offset(self._best[1]) - self._offset(self.settings),
            [self.steps / self.config.max_steps],
        ]).astype(np.float32)

    def start(self, plant: Plant) -> np.ndarray:
        self.steps = 0
        self.settings = self.start_settings = plant.read_knobs()
        self._r_now = self._r(plant)
        n = len(self.knobs)
        self._history = [(0.0, np.zeros(n))] * self.HISTORY
        self._best = (float(self._r_now[2]), self.settings.copy())
        self.best_step = 0
        self.return_target: np.ndarray | None = None
        self._points = [(self.settings / self.step_size, float(self._r_now[2]))]
        self.initial_transmission = float(self._r_now[2])
        return self._obs()

    @property
    def transmission(self) -> float:
        return float(self._r_now[2])

    @property
    def best_measured(self) -> tuple[float, np.ndarray]:
        """The highest transmission read so far and the settings it was read at."""
        return self._best[0], self._best[1].copy()

    def steps_to(self, target: np.ndarray) -> int:
        """Writes needed to reach `target` from the present settings, one step per knob per write.

        A knob within its read-back tolerance of the target is there (a real supply never
        reads back exactly what was written).
        """
        distance = np.maximum(np.abs(target - self.settings) - self.tolerance, 0.0)
        return int(np.ceil(np.max(distance / self.step_size) - 1e-9))

    def return_action(self) -> np.ndarray | None:
        """The next move back to the best measured setting, or None while the agent keeps tuning.

        An operator ends on the best setting seen; the agent is not trained to go back,
        so the walk back starts when the remaining writes are just enough to arrive, and
        only if that setting read clearly more than the present one (``return_margin``).
        Once started it goes on to the end; each move is an ordinary action (at most one
        step per knob), so the safety layer treats it like any other.
        """
        if self.return_target is None:
            needed = self.steps_to(self._best[1])
            remaining = self.config.max_steps - self.steps
            if needed == 0 or needed < remaining - 1 or self._best[0] - self.transmission <= self.config.return_margin:
                return None
            self.return_target = self._best[1].copy()
        return np.clip((self.return_target - self.settings) / self.step_size, -1.0, 1.0)

    @property
    def returned(self) -> bool:
        """The walk back has arrived: the episode is over."""
        return self.return_target is not None and self.steps_to(self.return_target) == 0

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(action, dtype=float), -1, 1)
        return np.clip(self.settings + a * self.step_size, self.lower, self.upper)

    def step(self, plant: Plant, action: np.ndarray):
        plant.write_knobs(self.proposed_settings(action))
        before = self.settings
        self.settings = plant.read_knobs()
        self.steps += 1
        r_prev, self._r_now = self._r_now, self._r(plant)
        t, t_prev = self._r_now[2], r_prev[2]
        # The knob change actually made (after clipping), in action units.
        self._history = [(t - t_prev, (self.settings - before) / self.step_size)] + self._history[:-1]
        self._points.append((self.settings / self.step_size, float(t)))
        if t > self._best[0]:
            self._best = (float(t), self.settings.copy())
            self.best_step = self.steps
        reward = t - 1.0 + self.config.improvement_weight * (t - t_prev)
        truncated = self.steps >= self.config.max_steps
        return self._obs(), float(reward), False, truncated, {"transmission": float(t)}


class TransmissionEnv(gym.Env):
    """Gymnasium environment: :class:`TransmissionTask` on a simulated injector."""

    metadata = {"render_modes": []}

    def __init__(self, lattice: InjectorLattice, errors: InjectorErrorModel, config: TransmissionTaskConfig | None = None):
        self.plant = InjectorSimPlant(lattice, errors)
        self.task = TransmissionTask(self.plant.knobs, lattice.beam.current_ma, config or TransmissionTaskConfig())
        self.observation_space, self.action_space = self.task.observation_space, self.task.action_space
        self._seeds = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._seeds = np.random.default_rng(seed)
        self.plant.reset(seed if seed is not None else int(self._seeds.integers(2**63)))
        obs = self.task.start(self.plant)
        return obs, {"transmission": self.task.transmission}

    def step(self, action):
        return self.task.step(self.plant, action)
