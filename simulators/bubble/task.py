"""Bubble position control as a task (Klapcsik et al.): two pressure amplitudes in, the
bubble's position (from imaging) and the experimenter's target out.

- plant (:class:`BubbleSimPlant`): knobs ``P1`` (25 kHz) and ``P2`` (50 kHz) in bar,
  [0, 1]; each write holds them for one control interval (10 acoustic cycles of the
  base frequency, 400 us) and runs it. Readings: ``position`` (x / lambda0, as imaged,
  with noise; invalid once the bubble leaves the imaging's field of view) and ``target``
  (x_T / lambda0, set by the experimenter); interlocks ``solver_ok`` (0 after a solver
  failure) and ``in_view`` (0 when the imaging loses the bubble).
- observation: the trend state generalised: [target, position, the two previous
  positions] and their differences, the distance to the target;
- action in [-1, 1]^2 -> amplitudes (a + 1) / 2 x the maximum amplitude (1 bar);
- reward (as published): -(|x - x_T| / max(0.25 - x_T, x_T - 0.05))^0.5, +10 and done
  within 0.01, -10 and done on a solver failure; a lost bubble (out of the imaging's view)
  -10 and done and -1 for each step of the episode it forfeits; 128 actions per episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from core.plant import KnobSpec, Plant, ReadingSpec, Readings, SimulatedPlant
from core.task import MetricSpec, Outcome, Task

from .model import FAILURES, BubbleBatch, Drive

CYCLES_PER_ACTION = 10.0
TARGET_RANGE = (0.05, 0.25)
FIELD_OF_VIEW = (0.0, 0.3)  # x / lambda0 the imaging sees; outside it the bubble is lost


class BubbleErrors(BaseModel):
    """What differs from one bubble (episode) to the next: R0, start, target, calibration.

    Presets ``train`` and ``test`` draw from the same ranges with disjoint seeds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "custom"
    seed_offset: int = Field(0, ge=0)
    r0_scale: tuple[float, float] = Field((0.95, 1.05), description="true / nominal R0")
    start: tuple[float, float] = TARGET_RANGE
    target: tuple[float, float] = TARGET_RANGE
    amplitude_scale: tuple[float, float] = Field((0.95, 1.05), description="true / nominal amplitude (calibration)")
    position_noise: float = Field(2e-4, ge=0, description="imaging noise, x / lambda0 (1 sigma)")


PRESETS = {"train": BubbleErrors(name="train"), "test": BubbleErrors(name="test", seed_offset=10_000_000)}


class BubbleSetup(BaseModel):
    """The lab: nominal bubble size, the two frequencies, the amplitude range."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    r0_um: PositiveFloat = 60.0
    f1_hz: PositiveFloat = 25e3
    f2_hz: PositiveFloat = 50e3
    max_amplitude_bar: PositiveFloat = 1.0

    @property
    def drive(self) -> Drive:
        return Drive(f1_hz=self.f1_hz, f2_hz=self.f2_hz)


class BubbleSimPlant(SimulatedPlant):
    """One bubble in the dual-frequency field, one control interval per write."""

    faults = ("SOLVER_FAILURE", "BUBBLE_LOST")
    period_s = 0.05  # served by the virtual IOC: one control interval (400 us) per 50 ms

    def __init__(self, setup: BubbleSetup, errors: BubbleErrors):
        self.setup, self.errors = setup, errors
        top = setup.max_amplitude_bar
        self.knobs = [KnobSpec("P1", "bar", 0.0, top, top, 1e-9), KnobSpec("P2", "bar", 0.0, top, top, 1e-9)]
        self.readings = [ReadingSpec("position", "x/lambda", *FIELD_OF_VIEW), ReadingSpec("target", "x/lambda", *FIELD_OF_VIEW)]
        self.settings = np.zeros(2)
        self.rng = np.random.default_rng(0)
        self.bubble: BubbleBatch | None = None
        self.r0_m = 60e-6
        self.target = 0.15
        self.scale = 1.0
        self.lost = False
        self.forced_failure = False
        self.positions: list[float] = []
        self.amplitudes: list[list[float]] = []

    def reset(self, seed: int | None = None) -> None:
        e = self.errors
        self.rng = np.random.default_rng(None if seed is None else e.seed_offset + int(seed))
        self.r0_m = self.setup.r0_um * self.rng.uniform(*e.r0_scale) * 1e-6
        start, self.target = self.rng.uniform(*e.start), self.rng.uniform(*e.target)
        self.scale = self.rng.uniform(*e.amplitude_scale)
        self.bubble = BubbleBatch(np.array([self.r0_m]), np.array([start]), drive=self.setup.drive)
        self.settings = np.zeros(2)
        self.lost = self.forced_failure = False
        self.positions = [start]
        self.amplitudes: list[list[float]] = []  # bar, per control interval

    def warm_up(self) -> None:
        """Compile the integrator (numba; seconds on a cold cache) on a throwaway bubble."""
        BubbleBatch(np.array([self.setup.r0_um * 1e-6]), np.array([0.1]), drive=self.setup.drive).advance([0.0, 0.0], 0.1)

    def set_fault(self, name: str, value: int) -> None:
        if name == "SOLVER_FAILURE":
            self.forced_failure = bool(value)
        elif name == "BUBBLE_LOST":
            self.lost = bool(value)
        else:
            super().set_fault(name, value)

    @property
    def failure(self) -> str:
        """Why the solver failed ('' if it did not)."""
        if self.forced_failure:
            return "solver failure (injected)"
        status = int(self.bubble.status[0])
        return f"solver failure ({FAILURES[status]})" if status else ""

    def read_knobs(self) -> np.ndarray:
        return self.settings.copy()

    def write_knobs(self, values: np.ndarray) -> None:
        """Hold the amplitudes (bar) for one control interval and run it."""
        self.settings = np.clip(np.asarray(values, dtype=float), 0.0, self.setup.max_amplitude_bar)
        self.bubble.advance(self.settings * 1e5 * self.scale, CYCLES_PER_ACTION)
        self.amplitudes.append(self.settings.tolist())
        self.positions.append(float(self.bubble.state[0, 2]))

    def read(self) -> Readings:
        """Imaged position (noisy; invalid after a solver failure or out of the field of
        view) and target; interlocks ``solver_ok`` and ``in_view`` (the imaging finds it)."""
        x_true = float(self.bubble.state[0, 2])
        solver_ok = not self.failure
        in_view = solver_ok and not self.lost and FIELD_OF_VIEW[0] <= x_true <= FIELD_OF_VIEW[1]
        x = x_true + self.rng.normal(0.0, self.errors.position_noise)
        values = np.array([x if in_view else np.nan, self.target])
        problems = {}
        if not solver_ok:
            problems["position"] = self.failure
        elif not in_view:
            problems["position"] = "bubble lost from the field of view"
        return Readings(values, self.now(2), np.array([in_view, True]),
                        {"solver_ok": float(solver_ok), "in_view": float(in_view)}, problems)


class BubbleTaskConfig(BaseModel):
    """Task parameters (the published ones by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_steps: PositiveInt = 128
    tolerance: PositiveFloat = 0.01  # |x - x_T| / lambda0 for success
    success_bonus: float = 10.0
    failure_penalty: float = 10.0
    # A lost bubble also forfeits the rest of the episode, each step at the reward of the
    # farthest target (-1): with the penalty alone, throwing a hard bubble out of view
    # (-10) paid better than holding it off target (about -0.9 a step for 100+ steps),
    # and agents learnt to give up that way.
    lost_step_penalty: float = Field(1.0, ge=0)
    position_scale: PositiveFloat = 4.0  # x / lambda0 in [0, 0.25] -> [0, 1]
    change_scale: PositiveFloat = 100.0  # per-step changes (~1e-3) -> ~0.1


def distance_metric(tolerance: float) -> MetricSpec:
    return MetricSpec("distance", "x/lambda", higher_is_better=False, target=tolerance, label="distance to target")


@dataclass
class BubbleTask(Task):
    """Amplitudes out, position and target in; reward as published."""

    config: BubbleTaskConfig = field(default_factory=BubbleTaskConfig)
    amplitude_max: float = 1.0  # bar at action +1 (the knobs' upper limit)

    def __post_init__(self) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (7,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.metrics = (distance_metric(self.config.tolerance),)
        self.max_steps = self.config.max_steps
        self.trained_step = np.ones(2)
        self.steps = 0
        self.settings = np.zeros(2)
        self.history = np.zeros(3)  # positions, newest last
        self.target = 0.15
        self.reached = self.failed = False
        self.initial_readings = self._last = np.zeros(2)

    def _observe(self) -> np.ndarray:
        c = self.config
        h = self.history
        return np.array([self.target * c.position_scale, h[2] * c.position_scale, h[1] * c.position_scale,
                         h[0] * c.position_scale, (h[2] - h[1]) * c.change_scale, (h[1] - h[0]) * c.change_scale,
                         (self.target - h[2]) * c.position_scale], dtype=np.float32)

    def start(self, plant: Plant) -> np.ndarray:
        self.steps, self.reached, self.failed = 0, False, False
        self.initial_readings = self._last = np.asarray(plant.read().values, dtype=float)
        self.target = float(self._last[1])
        self.history = np.full(3, self._last[0])
        self.settings = plant.read_knobs()
        return self._observe()

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        return (np.clip(np.asarray(action, dtype=float)[:2], -1.0, 1.0) + 1.0) / 2.0 * self.amplitude_max

    def distance(self) -> float:
        return abs(self.history[2] - self.target)

    def step(self, plant: Plant, action: np.ndarray):
        c = self.config
        plant.write_knobs(self.proposed_settings(action))
        self.settings = plant.read_knobs()
        self.steps += 1
        readings = plant.read()
        self._last = np.asarray(readings.values, dtype=float)
        if not np.isfinite(self._last[0]):  # solver failure or bubble lost (a guarded machine trips before this)
            self.failed = True
            why = readings.problems.get("position", "no position reading")
            solver_failure = why.startswith("solver failure")
            forfeit = 0.0 if solver_failure else c.lost_step_penalty * max(self.max_steps - self.steps, 0)
            return self._observe(), -c.failure_penalty - forfeit, True, False, {
                "success": False, "solver_failure": solver_failure,
                "failure": why, "distance": float("nan")}
        self.history = np.roll(self.history, -1)
        self.history[2] = self._last[0]
        d = self.distance()
        scale = max(TARGET_RANGE[1] - self.target, self.target - TARGET_RANGE[0])
        reward = -((d / scale) ** 0.5)
        self.reached = d < c.tolerance
        if self.reached:
            reward += c.success_bonus
        truncated = self.steps >= self.max_steps and not self.reached
        return self._observe(), float(reward), self.reached, truncated, {"success": self.reached, "distance": d,
                                                                        "solver_failure": False}

    def measure(self, readings: np.ndarray) -> dict[str, float]:
        return {"distance": abs(float(readings[0]) - float(readings[1]))}

    def metric_values(self) -> dict[str, float]:
        return {"distance": self.distance()}

    @property
    def last_readings(self) -> np.ndarray:
        return self._last.copy()

    @property
    def ended(self) -> bool:
        return self.reached or self.failed or self.steps >= self.max_steps

    def untouched(self, readings: np.ndarray) -> bool:
        return False  # even a bubble at the target needs the field to stay there

    def outcome(self, initial: float, final: float, info: dict | None) -> Outcome:
        if self.reached:
            return Outcome(True, "completed", note=f"bubble within {self.config.tolerance} of the target after "
                           f"{self.steps} steps; the amplitudes stay to hold it there")
        return Outcome(False, "not_converged", restore_reason="target not reached: the drive goes to zero")
