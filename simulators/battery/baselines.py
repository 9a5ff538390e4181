"""What a battery operator runs today: a threshold rule, rolling-horizon MPC, nothing.

Under single imbalance pricing a period's price is known only once it has ended, so
every method decides the power of period t from the prices up to t-1 (the ceiling,
:func:`simulators.battery.model.perfect_foresight`, is the only one that knows them).
The forecast and the thresholds are fitted on training prices only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Battery, BatteryConfig, perfect_foresight
from .prices import PERIODS_PER_DAY


@dataclass
class Forecast:
    """Mean daily profile plus an AR(1) decay of today's deviation from it."""

    profile: np.ndarray  # (96,) EUR/MWh
    ar: float

    @classmethod
    def fit(cls, training_prices: np.ndarray) -> "Forecast":
        days = np.asarray(training_prices, dtype=float)[: len(training_prices) // PERIODS_PER_DAY * PERIODS_PER_DAY]
        profile = days.reshape(-1, PERIODS_PER_DAY).mean(axis=0)
        deviation = days - np.tile(profile, len(days) // PERIODS_PER_DAY)
        ar = float(np.dot(deviation[:-1], deviation[1:]) / np.dot(deviation[:-1], deviation[:-1]))
        return cls(profile, float(np.clip(ar, 0.0, 0.99)))

    def predict(self, last_period: int, last_price: float, horizon: int) -> np.ndarray:
        """Prices of the `horizon` periods after `last_period` (index of the day), given its price."""
        steps = np.arange(1, horizon + 1)
        future = (last_period + steps) % PERIODS_PER_DAY
        deviation = last_price - self.profile[last_period % PERIODS_PER_DAY]
        return self.profile[future] + self.ar ** steps * deviation


@dataclass
class DayResult:
    power_mw: np.ndarray
    profit_eur: np.ndarray  # per period
    soc: np.ndarray

    @property
    def total(self) -> float:
        return float(self.profit_eur.sum())


def run_day(prices: np.ndarray, previous_price: float, config: BatteryConfig, decide) -> DayResult:
    """One day on a fresh battery; `decide(t, last_price, battery) -> requested MW`."""
    battery = Battery(config)
    powers, profits, socs = [], [], []
    last = previous_price
    for t, price in enumerate(prices):
        p, profit = battery.step(decide(t, last, battery), price)
        powers.append(p)
        profits.append(profit)
        socs.append(battery.state.soc)
        last = price
    return DayResult(np.array(powers), np.array(profits), np.array(socs))


def mpc_power(forecast: Forecast, config: BatteryConfig, period: int, last_price: float, soc: float,
              discharged_today_mwh: float) -> float:
    """The rolling-horizon MPC's power (MW) for `period` of the day: the first power of the
    LP solved on the forecast from the last settled price to the day's end, from state of
    charge `soc` (fraction) with what is left of today's discharge budget."""
    n = PERIODS_PER_DAY - period  # the day ends: the rest of the day is the horizon
    expected = forecast.predict(period - 1, last_price, n)
    left = BatteryConfig(**{**config.model_dump(), "soc_start": min(max(soc, config.soc_min), config.soc_max),
                            "max_cycles_per_day": max(1e-6, (config.daily_discharge_mwh - discharged_today_mwh)
                                                      / config.capacity_mwh)})
    return float(perfect_foresight(expected, left).power_mw[0])


def mpc_decider(forecast: Forecast, config: BatteryConfig):
    """Rolling horizon: re-solve the LP on the forecast every period, apply its first power."""

    def decide(t: int, last_price: float, battery: Battery) -> float:
        return mpc_power(forecast, config, t, last_price, battery.state.soc, battery.state.discharged_today_mwh)

    return decide


def threshold_decider(low: float, high: float, config: BatteryConfig):
    """Charge at full power after a period priced below `low`, discharge after one above `high`."""

    def decide(t: int, last_price: float, battery: Battery) -> float:
        if last_price <= low:
            return -config.power_mw
        if last_price >= high:
            return config.power_mw
        return 0.0

    return decide


def tune_thresholds(training_days: list[tuple[np.ndarray, float]], config: BatteryConfig) -> tuple[float, float]:
    """The (low, high) pair with the most profit on training days (grid over price quantiles)."""
    prices = np.concatenate([d for d, _ in training_days])
    candidates = np.quantile(prices, np.linspace(0.02, 0.98, 25))
    best, best_pair = -np.inf, (float(candidates[0]), float(candidates[-1]))
    for i, low in enumerate(candidates):
        for high in candidates[i + 1:]:
            total = sum(run_day(day, prev, config, threshold_decider(low, high, config)).total for day, prev in training_days)
            if total > best:
                best, best_pair = total, (float(low), float(high))
    return best_pair


def nothing_decider(t: int, last_price: float, battery: Battery) -> float:
    return 0.0
