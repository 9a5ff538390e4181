"""A grid battery settled on imbalance prices, 15-minute periods, and its perfect-foresight LP.

Sign convention: power > 0 discharges (delivers to the grid), < 0 charges. Delivered
energy in a period is ``power * 0.25 h``; the state of charge falls by delivered /
eta_discharge and rises by drawn * eta_charge, with eta_charge = eta_discharge =
sqrt(round-trip efficiency). Settlement: profit = price x delivered energy (charging
pays the price) minus a degradation cost per MWh of throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

PERIOD_H = 0.25


class BatteryConfig(BaseModel):
    """A battery as YAML configures it (defaults: 1 MW / 2 MWh, 90 % round trip)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "bess-1mw-2mwh"
    power_mw: PositiveFloat = 1.0
    capacity_mwh: PositiveFloat = 2.0
    round_trip_efficiency: float = Field(0.9, gt=0, le=1)
    soc_min: float = Field(0.05, ge=0, lt=1, description="usable state of charge, fraction of capacity")
    soc_max: float = Field(0.95, gt=0, le=1)
    soc_start: float = Field(0.5, ge=0, le=1)
    ramp_mw_per_period: PositiveFloat = Field(1.0, description="largest power change from one period to the next")
    max_cycles_per_day: PositiveFloat = Field(2.0, description="full equivalent cycles (discharged energy / capacity)")
    degradation_eur_per_mwh: float = Field(0.0, ge=0, description="cost per MWh of throughput (charged + discharged)")

    @model_validator(mode="after")
    def _soc_order(self) -> "BatteryConfig":
        if not self.soc_min < self.soc_max:
            raise ValueError(f"soc_min ({self.soc_min}) must be below soc_max ({self.soc_max})")
        if not self.soc_min <= self.soc_start <= self.soc_max:
            raise ValueError("soc_start must be within [soc_min, soc_max]")
        return self

    @property
    def eta(self) -> float:
        """One-way efficiency (charge and discharge alike)."""
        return math.sqrt(self.round_trip_efficiency)

    @property
    def daily_discharge_mwh(self) -> float:
        return self.max_cycles_per_day * self.capacity_mwh


@dataclass
class BatteryState:
    soc: float  # fraction of capacity
    power_mw: float = 0.0  # last period's power
    discharged_today_mwh: float = 0.0


class Battery:
    """The physics and the limits: every requested power is cut to what is feasible."""

    def __init__(self, config: BatteryConfig | None = None):
        self.config = config or BatteryConfig()
        self.state = BatteryState(self.config.soc_start)

    def reset(self, soc: float | None = None) -> None:
        self.state = BatteryState(self.config.soc_start if soc is None else soc)

    def new_day(self) -> None:
        self.state.discharged_today_mwh = 0.0

    def feasible_power(self, requested_mw: float) -> float:
        """The power closest to `requested_mw` within power, ramp, SoC and cycle limits.

        The SoC and cycle limits win over the ramp limit: a battery at its SoC limit or
        out of its daily budget stops injecting at once (its safe direction is zero)."""
        c, s = self.config, self.state
        # Plain float min/max: this runs every simulated period (numpy's clip costs 5x on scalars).
        p = min(max(float(requested_mw), -c.power_mw), c.power_mw)
        p = min(max(p, s.power_mw - c.ramp_mw_per_period), s.power_mw + c.ramp_mw_per_period)
        stored = s.soc * c.capacity_mwh
        most_out = max(0.0, (stored - c.soc_min * c.capacity_mwh) * c.eta / PERIOD_H)  # MW the SoC allows out
        most_in = max(0.0, (c.soc_max * c.capacity_mwh - stored) / c.eta / PERIOD_H)  # MW it can take in
        budget = max(0.0, (c.daily_discharge_mwh - s.discharged_today_mwh) / PERIOD_H)
        return min(max(p, -most_in), min(most_out, budget))

    def step(self, requested_mw: float, price: float) -> tuple[float, float]:
        """Run one period at (the feasible part of) `requested_mw`; returns (power, profit EUR)."""
        c, s = self.config, self.state
        p = self.feasible_power(requested_mw)
        energy = p * PERIOD_H  # MWh delivered (> 0) or drawn (< 0)
        stored_change = -energy / c.eta if energy > 0 else -energy * c.eta
        s.soc = min(max(s.soc + stored_change / c.capacity_mwh, c.soc_min), c.soc_max)
        s.discharged_today_mwh += max(energy, 0.0)
        s.power_mw = p
        profit = price * energy - c.degradation_eur_per_mwh * abs(energy)
        return p, profit


@dataclass
class LpSolution:
    power_mw: np.ndarray
    soc: np.ndarray  # at the start of every period and after the last (n + 1)
    profit_eur: float


def perfect_foresight(prices: np.ndarray, config: BatteryConfig, soc_start: float | None = None) -> LpSolution:
    """The most any schedule could earn on these prices (HiGHS through scipy's linprog).

    Variables per period: charge c >= 0 and discharge d >= 0 (MW) and the stored energy;
    the battery's limits as constraints; the discharge budget per day. A relaxation: it
    may charge and discharge in the same period, which a battery cannot (so it is an
    upper bound even then).
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity, vstack

    prices = np.asarray(prices, dtype=float)
    n = len(prices)
    c_ = config
    eta, h = c_.eta, PERIOD_H
    soc0 = (c_.soc_start if soc_start is None else soc_start) * c_.capacity_mwh
    # x = [charge (n), discharge (n), stored after each period (n)]
    cost = np.concatenate([prices * h + c_.degradation_eur_per_mwh * h,
                           -prices * h + c_.degradation_eur_per_mwh * h, np.zeros(n)])
    eye = identity(n, format="csr")
    shift = csr_matrix((np.ones(n - 1), (np.arange(1, n), np.arange(n - 1))), shape=(n, n))
    # stored_t - stored_{t-1} - eta h c_t + h/eta d_t = 0 (stored_{-1} = soc0)
    a_eq = hstack([-eta * h * eye, (h / eta) * eye, eye - shift]).tocsr()
    b_eq = np.zeros(n)
    b_eq[0] = soc0
    rows, rhs = [], []
    # ramp: |(d_t - c_t) - (d_{t-1} - c_{t-1})| <= R (the first against zero)
    net = hstack([-eye, eye, csr_matrix((n, n))]).tocsr()
    diff = net - shift @ net
    rows += [diff, -diff]
    rhs += [np.full(n, c_.ramp_mw_per_period)] * 2
    # discharge budget per day (every 96 periods from the start; a partial day has the whole budget)
    days = int(math.ceil(n / 96))
    day_of = np.arange(n) // 96
    budget = csr_matrix((np.full(n, h), (day_of, np.arange(n))), shape=(days, n))
    rows.append(hstack([csr_matrix((days, n)), budget, csr_matrix((days, n))]).tocsr())
    rhs.append(np.full(days, c_.daily_discharge_mwh))
    bounds = ([(0, c_.power_mw)] * (2 * n) + [(c_.soc_min * c_.capacity_mwh, c_.soc_max * c_.capacity_mwh)] * n)
    result = linprog(cost, A_ub=vstack(rows).tocsr(), b_ub=np.concatenate(rhs), A_eq=a_eq, b_eq=b_eq,
                     bounds=bounds, method="highs")
    if not result.success:
        raise RuntimeError(f"perfect-foresight LP failed: {result.message}")
    charge, discharge, stored = result.x[:n], result.x[n:2 * n], result.x[2 * n:]
    return LpSolution(discharge - charge, np.concatenate([[soc0], stored]) / c_.capacity_mwh, float(-result.fun))
