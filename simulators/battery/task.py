"""Battery arbitrage as a task: one step = one 15-minute period, one episode = one day.

The plant (:class:`BatterySimPlant`) has one knob, the power setpoint in MW (> 0
discharges), and two readings: the price of the period that just settled and the state
of charge in %. Each write holds the power for one period. The task sees only that,
like on a real battery over EPICS: it keeps its own clock (periods since the start) and
its own count of the energy discharged today.

- observation: the last ``lookback`` settled prices and their first differences (the
  trend state generalised: [dB_{t-1}, dB_t, B_t] becomes a window of prices and their
  changes), state of charge, time of day (sin, cos), share of today's cycle budget
  used, last power;
- action ``a in [-1, 1]``: power setpoint ``a x rated power``;
- reward: the period's profit (settled price x delivered energy) x ``reward_scale``,
  minus ``risk_weight`` x the loss part of it (a simple downside penalty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from core.plant import KnobSpec, Plant, ReadingSpec, Readings, SimulatedPlant
from core.task import MetricSpec, Outcome, Task

from .model import PERIOD_H, Battery, BatteryConfig
from .prices import PERIODS_PER_DAY, synthetic_prices

PRICE_RANGE = (-1000.0, 3000.0)


class PriceModel(BaseModel):
    """Where a simulated day's prices come from: generator seeds ``offset + seed``.

    Training and test presets use disjoint seed ranges (never the same day twice)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "custom"
    seed_offset: int = Field(0, ge=0)


PRESETS = {"train": PriceModel(name="train", seed_offset=0), "test": PriceModel(name="test", seed_offset=10_000_000)}


class BatterySimPlant(SimulatedPlant):
    """A simulated battery on a day of imbalance prices (the day before is its history)."""

    def __init__(self, config: BatteryConfig, prices: PriceModel):
        self.config, self.price_model = config, prices
        self.battery = Battery(config)
        self.knobs = [KnobSpec("power", "MW", -config.power_mw, config.power_mw, config.ramp_mw_per_period, 1e-9)]
        self.readings = [ReadingSpec("price", "EUR/MWh", *PRICE_RANGE), ReadingSpec("soc", "%", 0.0, 100.0)]
        self.history = np.zeros(PERIODS_PER_DAY)
        self.today = np.zeros(PERIODS_PER_DAY)
        self.period = 0
        self.profits: list[float] = []
        self.powers: list[float] = []

    def reset(self, seed: int | None = None) -> None:
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else seed
        series = synthetic_prices(2, self.price_model.seed_offset + seed)
        self.history, self.today = series.day(0), series.day(1)
        self.battery.reset()
        self.period = 0
        self.profits, self.powers = [], []

    def read_knobs(self) -> np.ndarray:
        return np.array([self.battery.state.power_mw])

    def write_knobs(self, values: np.ndarray) -> None:
        requested = float(np.asarray(values, dtype=float)[0])
        if self.period >= PERIODS_PER_DAY:  # the day is over: the battery only idles
            self.battery.state.power_mw = 0.0
            return
        power, profit = self.battery.step(requested, float(self.today[self.period]))
        self.powers.append(power)
        self.profits.append(profit)
        self.period += 1

    def settled_price(self) -> float:
        return float(self.today[self.period - 1] if self.period else self.history[-1])

    def read(self) -> Readings:
        soc = 100.0 * self.battery.state.soc
        values = np.array([self.settled_price(), soc])
        return Readings(values, self.now(2), np.ones(2, dtype=bool), {"soc_pct": soc})


class BatteryTaskConfig(BaseModel):
    """Task parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_steps: PositiveInt = PERIODS_PER_DAY  # one day
    lookback: PositiveInt = Field(8, le=96, description="settled prices in the observation")
    reward_scale: PositiveFloat = 0.01  # EUR -> reward
    risk_weight: NonNegativeFloat = Field(0.0, description="extra weight of a period's loss (downside risk)")
    price_scale: PositiveFloat = Field(100.0, description="EUR/MWh per observation unit")
    cycles_per_day: PositiveFloat = 2.0
    capacity_mwh: PositiveFloat = 2.0


def profit_metric() -> MetricSpec:
    return MetricSpec("profit_eur", "EUR", higher_is_better=True, target=None, label="profit today")


@dataclass
class BatteryTask(Task):
    """Prices and state of charge in, power setpoint out; profit as reward."""

    power_mw: float
    config: BatteryTaskConfig = field(default_factory=BatteryTaskConfig)

    def __post_init__(self) -> None:
        n = 2 * self.config.lookback + 5
        self.observation_space = spaces.Box(-np.inf, np.inf, (n,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.metrics = (profit_metric(),)
        self.max_steps = self.config.max_steps
        self.trained_step = np.array([self.power_mw])
        self.steps = 0
        self.settings = np.zeros(1)
        self.prices = np.zeros(self.config.lookback)
        self.soc = 0.0
        self.profit = 0.0
        self.discharged_mwh = 0.0
        self.initial_readings = np.zeros(2)
        self._last = np.zeros(2)

    # -- readings -> observation ---------------------------------------------------
    def _observe(self) -> np.ndarray:
        c = self.config
        scaled = self.prices / c.price_scale
        diffs = np.diff(np.concatenate([[scaled[0]], scaled]))
        angle = 2 * np.pi * (self.steps % PERIODS_PER_DAY) / PERIODS_PER_DAY
        budget = self.discharged_mwh / (c.cycles_per_day * c.capacity_mwh)
        tail = [self.soc / 100.0, np.sin(angle), np.cos(angle), budget, self.settings[0] / self.power_mw]
        return np.concatenate([scaled, diffs, tail]).astype(np.float32)

    def _take(self, readings: np.ndarray) -> None:
        self._last = np.asarray(readings, dtype=float)
        self.prices = np.roll(self.prices, -1)
        self.prices[-1] = self._last[0]
        self.soc = self._last[1]

    def start(self, plant: Plant) -> np.ndarray:
        self.steps, self.profit, self.discharged_mwh = 0, 0.0, 0.0
        first = plant.read().values
        self.initial_readings = np.asarray(first, dtype=float)
        self.prices = np.full(self.config.lookback, float(first[0]))
        self.soc = float(first[1])
        self._last = self.initial_readings
        self.settings = plant.read_knobs()
        return self._observe()

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(action, dtype=float)[:1], -1.0, 1.0) * self.power_mw

    def step(self, plant: Plant, action: np.ndarray):
        plant.write_knobs(self.proposed_settings(action))
        self.settings = plant.read_knobs()
        self.steps += 1
        readings = plant.read().values
        self._take(readings)
        energy = float(self.settings[0]) * PERIOD_H  # delivered (> 0) or drawn in the period that settled
        period_profit = float(self._last[0]) * energy
        self.profit += period_profit
        self.discharged_mwh += max(energy, 0.0)
        c = self.config
        reward = c.reward_scale * (period_profit + c.risk_weight * min(period_profit, 0.0))
        done = self.steps >= self.max_steps
        info = {"profit_eur": self.profit, "success": False, "discharged_mwh": self.discharged_mwh}
        return self._observe(), float(reward), False, bool(done), info

    # -- metrics ---------------------------------------------------------------------
    def measure(self, readings: np.ndarray) -> dict[str, float]:
        return {"profit_eur": self.profit}

    def metric_values(self) -> dict[str, float]:
        return {"profit_eur": self.profit}

    @property
    def last_readings(self) -> np.ndarray:
        return self._last.copy()

    @property
    def ended(self) -> bool:
        return self.steps >= self.max_steps

    def untouched(self, readings: np.ndarray) -> bool:
        return False

    def outcome(self, initial: float, final: float, info: dict | None) -> Outcome:
        if self.steps >= self.max_steps:
            return Outcome(True, "completed", note=f"day traded: profit {self.profit:.2f} EUR")
        return Outcome(False, "not_converged", restore_reason="the day was not traded to its end")
