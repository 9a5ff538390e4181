"""A toy plant defined entirely under tests/ (it proves the task seam, see test_seam.py).

A 1-D thermal plant: one heater (W), one thermometer (degC), steady state.

T = T_ambient + gain * P. The task brings T to a target temperature. Everything the
tool needs to train, evaluate, serve, run, record, replay and show it is declared here
through the task contract; nothing of it lives in controller/, safety/, hardware/, ui/.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt

from core.config import ConfigError
from core.plant import KnobSpec, ReadingSpec, Readings, SimulatedPlant, knob_bounds
from core.task import EpisodeResult, MetricSpec, Task, TaskDefinition, TaskEnv


class Oven(BaseModel):
    """The setup: heater range and the thermometer's range."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "oven"
    max_power_w: PositiveFloat = 100.0
    step_w: PositiveFloat = 10.0
    nominal_gain_k_per_w: PositiveFloat = 0.5


class OvenErrors(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "custom"
    ambient_c: tuple[float, float] = (15.0, 25.0)
    gain_spread: float = 0.2  # relative
    noise_c: float = 0.05


PRESETS = {"train": OvenErrors(name="train"), "test": OvenErrors(name="test", gain_spread=0.3)}


class ThermalPlant(SimulatedPlant):
    faults = ("DOOR_OPEN",)  # the case temperature interlock sees a hot spot

    def __init__(self, setup: Oven, errors: OvenErrors):
        self.setup, self.errors = setup, errors
        self.knobs = [KnobSpec("heater", "W", 0.0, setup.max_power_w, setup.step_w, 1e-6)]
        self.readings = [ReadingSpec("temperature", "degC", -50.0, 150.0)]
        self._power = np.zeros(1)
        self._rng = np.random.default_rng()
        self.ambient, self.gain, self.door_open = 20.0, setup.nominal_gain_k_per_w, False

    def reset(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)
        self.ambient = float(self._rng.uniform(*self.errors.ambient_c))
        self.gain = self.setup.nominal_gain_k_per_w * (1 + float(self._rng.uniform(-1, 1)) * self.errors.gain_spread)
        self._power = np.zeros(1)

    def set_fault(self, name: str, value: int) -> None:
        if name != "DOOR_OPEN":
            super().set_fault(name, value)
        self.door_open = bool(value)

    def read_knobs(self) -> np.ndarray:
        return self._power.copy()

    def write_knobs(self, values: np.ndarray) -> None:
        self._power = self.clip_to_limits(values)

    def read(self) -> Readings:
        t = self.ambient + self.gain * float(self._power[0]) + self._rng.normal(0, self.errors.noise_c)
        case = t + (80.0 if self.door_open else 0.0)
        return Readings(np.array([t]), self.now(1), np.ones(1, dtype=bool), {"case_temperature": case})


class ThermalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    target_c: float = 50.0
    tolerance_c: PositiveFloat = 1.0
    max_steps: PositiveInt = 20


@dataclass
class ThermalTask(Task):
    """Observation: [error / 10, last change / 10, power / max]; action: power change in steps."""

    knobs: list
    config: ThermalConfig

    def __post_init__(self):
        self.lower, self.upper = knob_bounds(self.knobs)
        self.trained_step = np.array([k.max_step for k in self.knobs])
        self.max_steps = self.config.max_steps
        self.metrics = (MetricSpec("error_c", "K", higher_is_better=False, target=self.config.tolerance_c,
                                   label="temperature error"),)
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.steps = 0

    def measure(self, readings: np.ndarray) -> dict[str, float]:
        return {"error_c": float(abs(readings[0] - self.config.target_c))}

    def _obs(self, change: float) -> np.ndarray:
        return np.array([(self.config.target_c - self.last_readings[0]) / 10, change / 10,
                         self.settings[0] / self.upper[0]], dtype=np.float32)

    def start(self, plant) -> np.ndarray:
        self.steps = 0
        self.settings = plant.read_knobs()
        self.initial_readings = self.last_readings = plant.read().values.copy()
        return self._obs(0.0)

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        return np.clip(self.settings + np.clip(action, -1, 1) * self.trained_step, self.lower, self.upper)

    def untouched(self, readings: np.ndarray) -> bool:
        return self.metrics[0].reached(self.measure(readings)["error_c"])

    def step(self, plant, action: np.ndarray):
        plant.write_knobs(self.proposed_settings(action))
        self.settings = plant.read_knobs()
        self.steps += 1
        before = self.last_readings[0]
        self.last_readings = plant.read().values.copy()
        error = self.measure(self.last_readings)["error_c"]
        success = self.metrics[0].reached(error)
        reward = -error / 10 + (10.0 if success else 0.0)
        truncated = self.steps >= self.max_steps and not success
        return self._obs(self.last_readings[0] - before), reward, success, truncated, {"success": success}


class Proportional:
    """The baseline: move the heater by error / nominal gain, one step at most."""

    def __init__(self, setup: Oven):
        self.setup = setup

    def begin(self) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.clip([obs[0] * 10 / self.setup.nominal_gain_k_per_w / self.setup.step_w], -1, 1)


class ThermalDefinition(TaskDefinition):
    name = "thermal"
    description = "toy: bring an oven to a target temperature"
    metrics = (MetricSpec("error_c", "K", higher_is_better=False, target=1.0, label="temperature error"),)
    train_defaults = {"steps": 1000, "eval_every": 500, "eval_episodes": 5}
    baselines = ("proportional",)
    default_baselines = baselines
    safety_defaults = {"max_excursion": 100.0}
    sim_interlocks = [{"name": "case_temperature", "rule": "max", "threshold": 120.0}]
    summary_keys = ("success_rate", "final_error_c", "steps")
    scalars = {"eval/success_rate": ("success_rate",)}
    safe_state_label = "heater off"  # an oven's safe state is not where it started

    def safe_settings(self, knobs, start):
        return np.zeros(len(knobs))

    def shipped_setups(self) -> list[str]:
        return ["oven"]

    def load_setup(self, name_or_path):
        if str(name_or_path) == "oven":
            return Oven()
        raise ConfigError(f"oven {name_or_path!r}: only 'oven' exists")

    def error_presets(self) -> list[str]:
        return list(PRESETS)

    def load_errors(self, name_or_path):
        if name_or_path not in PRESETS:
            raise ConfigError(f"oven errors {name_or_path!r}: expected one of {', '.join(PRESETS)}")
        return PRESETS[name_or_path]

    def sim_plant(self, setup, errors) -> ThermalPlant:
        return ThermalPlant(setup, errors)

    def config_model(self) -> type:
        return ThermalConfig

    def make_task(self, setup, knobs, readings, config) -> ThermalTask:
        return ThermalTask(knobs, config)

    def policy_metadata(self, setup, errors, config, task) -> dict:
        return {"lattice": {"name": setup.name, "knob_names": ["heater"]},
                "observation": {"size": 3, "readings": ["temperature"]}, "action": {"size": 1, "step": [setup.step_w]}}

    def check_policy(self, metadata: dict, setup) -> str | None:
        if metadata.get("lattice", {}).get("knob_names") != ["heater"]:
            return "field 'metadata.lattice.knob_names': not an oven policy"
        return None

    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        return {"success_rate": float(np.mean([bool(e.info.get("success")) for e in episodes])),
                "final_error_c": {"median": float(np.median([e.final["error_c"] for e in episodes]))},
                "steps": {"median": float(np.median([e.steps for e in episodes]))}}

    def score(self, summary: dict) -> tuple:
        return (summary["success_rate"], -summary["steps"]["median"])

    def bar_met(self, summary: dict) -> bool:
        return summary["success_rate"] >= 0.8

    def evaluate(self, setup, errors, agent, episodes, seed, methods, budget=None):
        plant = ThermalPlant(setup, errors)
        config = ThermalConfig.model_validate(agent.metadata.get("task_config", {}) if agent else {})
        env = TaskEnv(plant, ThermalTask(plant.knobs, config))
        controllers = ({"agent": agent} if agent else {}) | {m: Proportional(setup) for m in methods}
        runs = {name: [self.run_evaluation_episode(env, c, seed + i, budget) for i in range(episodes)]
                for name, c in controllers.items()}
        return {"task": self.name, "lattice": setup.name, "errors": errors.name, "episodes": episodes, "seed": seed,
                "results": {n: self.summarise(r, {}) for n, r in runs.items()}}, runs

    def results_table(self, summary: dict):
        return (["method", "success", "final error median (K)", "steps median"],
                [[n, f"{r['success_rate']:.0%}", f"{r['final_error_c']['median']:.3f}", str(r["steps"]["median"])]
                 for n, r in summary["results"].items()])

    def panels(self, setup) -> list[dict]:
        return [{"kind": "bars", "title": "Oven temperature", "readings": ["temperature"], "value_title": "temperature (degC)"}]

    def wiring(self, setup, knobs):
        return [1.0], "W"
