"""Battery arbitrage as a task: one step = one 15-minute period, one episode = one day.

The plant (:class:`BatterySimPlant`) has one knob, the power setpoint in MW (> 0
discharges), and four readings, as a battery's EMS shows them over EPICS: the price of
the period that just settled, the state of charge in %, the power delivered in that
period (kW, after the battery management system's own limits) and the period of the
day (0-95). Each write holds the power for one period. Days follow one another (a
plant reset with seed ``s`` trades day ``s``, then ``s + 1``, ...), so a session may
start at any period, as on a real battery.

- observation: the last ``lookback`` settled prices and their first differences (the
  trend state generalised: [dB_{t-1}, dB_t, B_t] becomes a window of prices and their
  changes), state of charge, time of day (sin, cos), share of today's cycle budget
  used, last power;
- action ``a in [-1, 1]``: power setpoint ``a x rated power``; or, with ``base: mpc``
  (residual control), the rolling-horizon MPC's power (planned from the same readings
  on the training days' forecast, and observed) plus ``a x residual_scale x rated power``;
- reward: the period's profit (settled price x delivered energy) x ``reward_scale``,
  plus potential-based shaping (Ng et al. 1999) with the stored energy valued at
  ``stored_value_eur_per_mwh``: ``gamma x phi(s') - phi(s)``, phi = 0 after the last
  period. Charging cheaply is rewarded when it happens instead of hours later, and the
  optimal policy is unchanged (the shaping terms telescope to -phi(s_0)). With
  ``shaping_potential: sdp`` phi is instead the stochastic DP's value of the state
  (:mod:`simulators.battery.sdp`; training only). Risk
  aversion belongs to the agent (TQC's CVaR term), not to the reward;
- privileged features (training only, for the critics of an asymmetric actor-critic):
  the rest of today's prices, which the simulator knows and the actor never sees.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from core.config import ConfigError, reading_positions
from core.plant import KnobSpec, Plant, ReadingSpec, Readings, SimulatedPlant
from core.task import MetricSpec, Outcome, Task

from .baselines import Forecast, mpc_power
from .model import PERIOD_H, Battery, BatteryConfig
from .prices import PERIODS_PER_DAY, load_price_csv, synthetic_prices

PRICE_RANGE = (-1000.0, 3000.0)
SEED_SPAN = 10_000_000  # a preset's days are seed_offset + (seed mod SEED_SPAN): presets never share a day
READING_NAMES = ("price", "soc", "power_kw", "period")  # what the task reads, by name


class PriceModel(BaseModel):
    """Where a simulated day's prices come from: generator seeds ``offset + seed``, or the
    days of a price file (``csv``; day ``seed`` is the file's day ``1 + seed mod (days - 1)``,
    the day before it its history).

    Training and test presets use disjoint seed ranges (never the same day twice); with
    files, train and test on files of disjoint months."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "custom"
    seed_offset: int = Field(0, ge=0)
    csv: str | None = None

    def day_seed(self, seed: int) -> int:
        return self.seed_offset + int(seed) % SEED_SPAN


PRESETS = {"train": PriceModel(name="train", seed_offset=0), "test": PriceModel(name="test", seed_offset=SEED_SPAN)}


@functools.lru_cache(maxsize=8)
def _price_file(path: str):
    return load_price_csv(path)


def price_day(model: PriceModel, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the day before, the day) of prices for day `seed` of `model`."""
    if model.csv:
        series = _price_file(model.csv)
        if series.days < 2:
            raise ConfigError(f"{model.csv}: {series.days} whole day(s) of prices: at least 2 are needed (history and a day)")
        index = 1 + int(seed) % (series.days - 1)
        return series.day(index - 1), series.day(index)
    series = synthetic_prices(2, model.day_seed(seed))
    return series.day(0), series.day(1)


class BatterySimPlant(SimulatedPlant):
    """A simulated battery trading day after day of imbalance prices.

    Faults (the virtual IOC's ``SIM:`` PVs): ``INVERTER_FAULT`` (non-zero: the inverter
    trips, delivers nothing and reports it) and ``SOC_FAULT`` (non-zero ``v``: the BMS
    state-of-charge estimate jumps to ``v`` %, as after a recalibration)."""

    faults = ("INVERTER_FAULT", "SOC_FAULT")
    period_s = 1.0  # served by the virtual IOC a period lasts 1 s by default (--period-s)

    def __init__(self, config: BatteryConfig, prices: PriceModel):
        self.config, self.price_model = config, prices
        self.battery = Battery(config)
        power_kw = 1000.0 * config.power_mw
        self.knobs = [KnobSpec("power", "MW", -config.power_mw, config.power_mw, config.ramp_mw_per_period, 1e-9)]
        # The power reading's range is twice the rating: at full power it is not "saturated".
        self.readings = [ReadingSpec("price", "EUR/MWh", *PRICE_RANGE), ReadingSpec("soc", "%", 0.0, 100.0),
                         ReadingSpec("power_kw", "kW", -2 * power_kw, 2 * power_kw),
                         ReadingSpec("period", "period", 0.0, float(PERIODS_PER_DAY))]
        self.history = np.zeros(PERIODS_PER_DAY)
        self.today = np.zeros(PERIODS_PER_DAY)
        self.day_seed = 0
        self.period = 0
        self.setpoint = 0.0
        self.delivered_mw = 0.0
        self.inverter_fault = False
        self.soc_fault: float | None = None
        self.profits: list[float] = []
        self.powers: list[float] = []
        self.socs: list[float] = []

    def reset(self, seed: int | None = None) -> None:
        self.day_seed = int(np.random.default_rng().integers(SEED_SPAN)) if seed is None else int(seed)
        self.history, self.today = price_day(self.price_model, self.day_seed)
        self.battery.reset()
        self.period = 0
        self.setpoint = self.delivered_mw = 0.0
        self.inverter_fault, self.soc_fault = False, None
        self.profits, self.powers, self.socs = [], [], [self.battery.state.soc]

    def set_fault(self, name: str, value: int) -> None:
        if name == "INVERTER_FAULT":
            self.inverter_fault = bool(value)
        elif name == "SOC_FAULT":
            self.soc_fault = float(value) if value else None
        else:
            super().set_fault(name, value)

    def _next_day(self) -> None:
        self.day_seed += 1
        self.history = self.today
        self.today = price_day(self.price_model, self.day_seed)[1]
        self.period = 0
        self.battery.new_day()

    def read_knobs(self) -> np.ndarray:
        return np.array([self.setpoint])

    def write_knobs(self, values: np.ndarray) -> None:
        """Hold `values` for one settlement period and run it (the IOC runs periods on its own clock)."""
        self.setpoint = float(np.asarray(values, dtype=float)[0])
        requested = 0.0 if self.inverter_fault else self.setpoint
        power, profit = self.battery.step(requested, float(self.today[self.period]))
        self.delivered_mw = power
        self.powers.append(power)
        self.profits.append(profit)
        self.socs.append(self.battery.state.soc)
        self.period += 1
        if self.period == PERIODS_PER_DAY:
            self._next_day()

    def prices_ahead(self) -> np.ndarray:
        """Today's prices from the period to run next to the day's end (what only a
        simulator knows: an asymmetric critic's features in training)."""
        return self.today[self.period:].copy()

    def settled_price(self) -> float:
        return float(self.today[self.period - 1] if self.period else self.history[-1])

    def read(self) -> Readings:
        soc = 100.0 * self.battery.state.soc if self.soc_fault is None else self.soc_fault
        period_of_day = (self.period - 1) % PERIODS_PER_DAY  # the period that settled last
        values = np.array([self.settled_price(), soc, 1000.0 * self.delivered_mw, float(period_of_day)])
        interlocks = {"soc_pct": soc, "inverter_ok": 0.0 if self.inverter_fault else 1.0}
        return Readings(values, self.now(len(values)), np.ones(len(values), dtype=bool), interlocks)


class BatteryTaskConfig(BaseModel):
    """Task parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_steps: PositiveInt = PERIODS_PER_DAY  # one day
    lookback: PositiveInt = Field(8, le=96, description="settled prices in the observation")
    reward_scale: PositiveFloat = 0.01  # EUR -> reward
    stored_value_eur_per_mwh: NonNegativeFloat = Field(
        80.0, description="shaping potential: EUR per MWh stored (about the mean training price; 0 switches shaping off)")
    shaping_potential: Literal["stored_energy", "sdp"] = Field(
        "stored_energy", description="the shaping potential: the stored energy at stored_value_eur_per_mwh, or the "
        "stochastic DP's value of the state (the expected profit still to come today, on the price model fitted to "
        "the training days); training only")
    shaping_gamma: float = Field(0.999, gt=0, le=1, description="the agent's discount, for exact potential-based shaping")
    price_scale: PositiveFloat = Field(100.0, description="EUR/MWh per observation unit (before asinh)")
    profile_features: bool = Field(True, description="observe the training days' mean price ahead of now")
    profile: tuple[float, ...] = Field((), description="mean price of each period of the day on training days (96 "
                                       "values; empty: none); the observation carries it ahead of now")
    profile_ahead: tuple[PositiveInt, ...] = Field((1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
                                                   description="periods ahead whose profile price is observed")
    cycles_per_day: PositiveFloat = 2.0
    capacity_mwh: PositiveFloat = 2.0
    base: Literal["none", "mpc"] = Field("none", description="mpc: the action corrects the rolling-horizon MPC's "
                                         "power (residual control); none: the action is the power")
    residual_scale: float = Field(1.0, gt=0, le=2, description="base mpc: power added at action +-1, fraction of rated power")
    forecast_ar: float | None = Field(None, ge=0, lt=1, description="base mpc: the forecast's AR(1) decay (default: "
                                      "fitted on the training days)")
    battery: BatteryConfig | None = Field(None, description="base mpc: the battery the MPC plans for")


def profit_metric() -> MetricSpec:
    return MetricSpec("profit_eur", "EUR", higher_is_better=True, target=None, label="profit today")


def reading_indices(readings: list[ReadingSpec]) -> list[int]:
    """Positions of the readings the task needs (by name, any case); ConfigError naming the missing ones."""
    return reading_positions([r.name for r in readings], READING_NAMES, "battery")


@dataclass
class BatteryTask(Task):
    """Prices and state of charge in, power setpoint out; profit as reward.

    The books are kept from the readings (settled price x delivered power), so a session
    on a real battery counts what the battery did, not what was asked of it."""

    power_mw: float
    config: BatteryTaskConfig = field(default_factory=BatteryTaskConfig)
    indices: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    value_table: object | None = None  # simulators.battery.sdp.ValueTable (shaping_potential sdp, in training)

    def __post_init__(self) -> None:
        if self.config.profile and len(self.config.profile) != PERIODS_PER_DAY:
            raise ConfigError(f"battery task: profile has {len(self.config.profile)} values, expected {PERIODS_PER_DAY}")
        self._profile = np.arcsinh(np.asarray(self.config.profile, dtype=float) / self.config.price_scale)
        # The profile ahead of each period to decide (row: that period), looked up per step.
        ahead = np.asarray(self.config.profile_ahead, dtype=int) - 1  # the period to decide is 1 ahead
        self._ahead_table = (self._profile[(np.arange(PERIODS_PER_DAY)[:, None] + ahead[None, :]) % PERIODS_PER_DAY]
                             if self.config.profile_features and self.config.profile else None)
        self._forecast = None
        if self.config.base == "mpc":
            if not self.config.profile or self.config.forecast_ar is None or self.config.battery is None:
                raise ConfigError("battery task: base mpc needs the forecast's profile and AR decay and the battery")
            self._forecast = Forecast(np.asarray(self.config.profile, dtype=float), self.config.forecast_ar)
        n = (2 * self.config.lookback + 5 + (0 if self._ahead_table is None else self._ahead_table.shape[1])
             + (self._forecast is not None))
        self.observation_space = spaces.Box(-np.inf, np.inf, (n,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.privileged_size = PERIODS_PER_DAY
        self.metrics = (profit_metric(),)
        self.max_steps = self.config.max_steps
        self.trained_step = np.array([self.power_mw])
        self.steps = 0
        self.settings = np.zeros(1)
        self.prices = np.zeros(self.config.lookback)
        self.soc = 0.0
        self.period = 0
        self.profit = 0.0
        self.discharged_mwh = 0.0  # today (since the period of day last wrapped)
        self.discharged_total_mwh = 0.0  # this episode
        self.base_mw = 0.0  # the MPC's power for the period to decide (base mpc)
        self._delivered_mw = 0.0  # in the period that settled last
        self._phi = 0.0  # the shaping potential of the state just read
        self.initial_readings = self._last = np.zeros(max(self.indices) + 1)

    # -- readings -> observation ---------------------------------------------------
    def _observe(self) -> np.ndarray:
        # Filled in place with float scalars: this runs every simulated period, and a
        # concatenation of small numpy pieces cost more than the battery's physics.
        c, n = self.config, self.config.lookback
        obs = np.empty(self.observation_space.shape[0], dtype=np.float32)
        # asinh: ordinary prices stay nearly linear, spikes (up to ~25 x price_scale) stay within ~4
        scaled = np.arcsinh(self.prices / c.price_scale)
        obs[:n] = scaled
        obs[n] = 0.0  # the oldest price's difference (no price before it)
        np.subtract(scaled[1:], scaled[:-1], out=obs[n + 1:2 * n])
        decide = (self.period + 1) % PERIODS_PER_DAY  # the period to decide
        angle = 2 * math.pi * decide / PERIODS_PER_DAY
        obs[2 * n:2 * n + 5] = (self.soc / 100.0, math.sin(angle), math.cos(angle),
                                self.discharged_mwh / (c.cycles_per_day * c.capacity_mwh),
                                self.settings[0] / self.power_mw)
        end = 2 * n + 5
        if self._ahead_table is not None:
            obs[end:end + self._ahead_table.shape[1]] = self._ahead_table[decide]
            end += self._ahead_table.shape[1]
        if self._forecast is not None:
            obs[end] = self.base_mw / self.power_mw
        return obs

    def privileged(self, plant: BatterySimPlant) -> np.ndarray:
        """The rest of today's prices, scaled as the observation's, from the period to decide
        (slot 0) to the day's end (later slots 0): for the critics in training."""
        ahead = np.zeros(PERIODS_PER_DAY, dtype=np.float32)
        rest = plant.prices_ahead()
        ahead[: len(rest)] = np.arcsinh(rest / self.config.price_scale)
        return ahead

    def _plan(self) -> None:
        """The MPC's power for the period to decide, from what the task has read (base mpc)."""
        if self._forecast is not None:
            self.base_mw = mpc_power(self._forecast, self.config.battery, (self.period + 1) % PERIODS_PER_DAY,
                                     float(self.prices[-1]), self.soc / 100.0, self.discharged_mwh)

    def _potential(self, soc_pct: float) -> float:
        """phi of the state just read (EUR). With the SDP's table: the expected profit still
        to come today from here (period to decide, last price, stored energy, discharged
        today, power delivered); without a table (a policy's task) no shaping."""
        c = self.config
        if c.shaping_potential == "sdp":
            if self.value_table is None:
                return 0.0
            return self.value_table.value((self.period + 1) % PERIODS_PER_DAY, float(self.prices[-1]),
                                          soc_pct / 100.0 * c.capacity_mwh, self.discharged_mwh, self._delivered_mw)
        return c.stored_value_eur_per_mwh * soc_pct / 100.0 * c.capacity_mwh

    def _pick(self, readings: np.ndarray) -> np.ndarray:
        return np.asarray(readings, dtype=float)[self.indices]

    def start(self, plant: Plant) -> np.ndarray:
        self.steps, self.profit, self.discharged_mwh, self.discharged_total_mwh = 0, 0.0, 0.0, 0.0
        self.initial_readings = self._last = np.asarray(plant.read().values, dtype=float)
        first = self._pick(self._last)
        self.prices = np.full(self.config.lookback, first[0])
        self.soc, self.period = first[1], int(round(first[3]))
        self._delivered_mw = first[2] / 1000.0
        self.settings = plant.read_knobs()
        self._phi = self._potential(self.soc)
        self._plan()
        return self._observe()

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        a = min(max(float(np.asarray(action, dtype=float).reshape(-1)[0]), -1.0), 1.0)
        if self._forecast is None:
            return np.array([a * self.power_mw])
        power = self.base_mw + self.config.residual_scale * self.power_mw * a
        return np.array([min(max(power, -self.power_mw), self.power_mw)])

    def step(self, plant: Plant, action: np.ndarray):
        plant.write_knobs(self.proposed_settings(action))
        self.settings = plant.read_knobs()
        self.steps += 1
        self._last = np.asarray(plant.read().values, dtype=float)
        price, soc, power_kw, period = self._pick(self._last).tolist()
        self.prices[:-1] = self.prices[1:]
        self.prices[-1] = price
        if int(round(period)) < self.period:  # a new day: a new cycle budget
            self.discharged_mwh = 0.0
        self.soc, self.period, self._delivered_mw = soc, int(round(period)), power_kw / 1000.0
        energy = power_kw / 1000.0 * PERIOD_H  # delivered (> 0) or drawn in the period that settled
        period_profit = price * energy
        self.profit += period_profit
        self.discharged_mwh += max(energy, 0.0)
        self.discharged_total_mwh += max(energy, 0.0)
        c = self.config
        done = self.steps >= self.max_steps
        phi_before, self._phi = self._phi, 0.0 if done else self._potential(soc)
        reward = c.reward_scale * (period_profit + c.shaping_gamma * self._phi - phi_before)
        info = {"profit_eur": self.profit, "success": False, "discharged_mwh": self.discharged_total_mwh}
        if not done:
            self._plan()
        # The day is the objective (a fresh battery each day, as the evaluation and the LP
        # ceiling count): its end is terminal. Truncation would bootstrap the value of the
        # energy left at midnight, which the day's profit never sees.
        return self._observe(), float(reward), bool(done), False, info

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
        # Whatever happened, the battery stops injecting when the agent lets go of it.
        if self.steps >= self.max_steps:
            return Outcome(True, "completed", restore_reason=f"day traded (profit {self.profit:.2f} EUR); "
                           "the battery goes back to no power")
        return Outcome(False, "not_converged", restore_reason="the day was not traded to its end")
