"""Stochastic dynamic programming on a price model fitted to training prices.

The price model is the generator's own family, fitted from data (so it applies to price
files too): a Gaussian copula whose latent value is a daily shape plus an AR(1)
residual, mapped through the empirical quantile function of the training prices. Given
the last settled price, the residual is known (the quantile function is invertible), so
(period of the day, residual, stored energy, energy discharged today, last power) is
the whole state, and backward induction over a day on a grid gives the value of every
state and the best power for it: the best a policy can do that knows the price model,
not the prices (the LP ceiling knows the prices; the MPC plans on the expected prices).

Used as a baseline (``sdp``), its value table as a shaping potential for the agent's
training (``shaping_potential: sdp``; potential-based, so the best policy is unchanged,
Ng et al. 1999), and to show where a policy falls short of it (:func:`day_regrets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import ndtr, ndtri

from .model import PERIOD_H, BatteryConfig
from .prices import PERIODS_PER_DAY

# Probabilities at which the empirical quantile function is kept (denser in the tails,
# where the spikes that pay are).
QUANTILE_PROBS = np.unique(np.concatenate([[0.0, 0.0005, 0.001, 0.002, 0.005, 0.01], np.linspace(0.02, 0.98, 49),
                                           [0.99, 0.995, 0.998, 0.999, 0.9995, 1.0]]))
QUADRATURE_POINTS = 30  # Gauss-Hermite nodes for the next residual: the tails carry the spikes


@dataclass(frozen=True)
class CopulaFit:
    """Latent x = shape[period] + y, y_t = ar y_{t-1} + sqrt(1 - ar^2) sigma eps; price = Q(Phi(x))."""

    probs: np.ndarray
    prices: np.ndarray  # the quantile function's knots (strictly increasing)
    shape: np.ndarray  # (96,) mean latent value per period of the day
    ar: float
    sigma: float  # standard deviation of the residual y

    @classmethod
    def fit(cls, training_prices: np.ndarray) -> "CopulaFit":
        p = np.asarray(training_prices, dtype=float)
        p = p[: len(p) // PERIODS_PER_DAY * PERIODS_PER_DAY]
        knots = np.quantile(p, QUANTILE_PROBS)
        # Ties (a price repeated) would make the inverse ambiguous: nudge them apart.
        knots = knots + np.arange(len(knots)) * 1e-6 * max(1.0, float(np.ptp(knots)))
        ranks = (np.argsort(np.argsort(p, kind="stable"), kind="stable") + 0.5) / len(p)
        latent = ndtri(ranks).reshape(-1, PERIODS_PER_DAY)
        shape = latent.mean(axis=0)
        y = (latent - shape).ravel()
        ar = float(np.clip(np.dot(y[:-1], y[1:]) / np.dot(y[:-1], y[:-1]), 0.0, 0.99))
        return cls(QUANTILE_PROBS.copy(), knots, shape, ar, float(y.std()))

    def price(self, latent: np.ndarray) -> np.ndarray:
        return np.interp(ndtr(latent), self.probs, self.prices)

    def residual(self, price: float, period: int) -> float:
        """The residual y behind a settled price of `period` (index of the day)."""
        u = float(np.clip(np.interp(price, self.prices, self.probs), 1e-9, 1 - 1e-9))
        return float(ndtri(u)) - float(self.shape[period % PERIODS_PER_DAY])


@dataclass
class ValueTable:
    """V[t, y, stored, discharged, last power]: the expected profit (EUR) still to come in
    the day before deciding period t, on the grids below."""

    fit: CopulaFit
    config: BatteryConfig
    actions: np.ndarray  # MW
    y_grid: np.ndarray
    e_grid: np.ndarray  # stored MWh
    d_step: float  # MWh discharged per grid step
    values: np.ndarray  # (97, ny, ne, nd, na)
    nodes: np.ndarray
    weights: np.ndarray

    def _next_period(self, period: int, last_price: float):
        """(expected price of `period`, weights of the next residual on the grid) after `last_price` settled."""
        fit = self.fit
        y = fit.residual(last_price, period - 1)
        nxt = fit.ar * y + math.sqrt(1 - fit.ar ** 2) * fit.sigma * self.nodes
        expected_price = float(np.dot(self.weights, fit.price(fit.shape[period] + nxt)))
        return expected_price, self.weights @ interpolation_matrix(self.y_grid, nxt)

    def _value_of(self, period: int, expected_price: float, next_weights: np.ndarray, stored_mwh: float,
                  discharged_mwh: float, power_mw: float, taken: int | np.ndarray, delivered: bool = False) -> float | None:
        """Expected value of running `power_mw` in `period`, the table's last-power axis at index
        `taken` (or weighted by it, an array). None where the battery could not deliver it all
        or the day's budget would be spent, unless the power was `delivered` (then only the
        grid's rounding says so)."""
        c = self.config
        e = stored_mwh - (power_mw * PERIOD_H / c.eta if power_mw > 0 else power_mw * PERIOD_H * c.eta)
        if not delivered and (e < self.e_grid[0] - 1e-9 or e > self.e_grid[-1] + 1e-9):
            return None
        later = self.values[period + 1]
        d = int(math.ceil((discharged_mwh + max(power_mw, 0.0) * PERIOD_H) / self.d_step - 1e-6))
        if d >= later.shape[2]:
            if not delivered:
                return None
            d = later.shape[2] - 1
        e_weights = interpolation_matrix(self.e_grid, np.array([e]))[0]
        column = (later[:, :, d, taken] if isinstance(taken, int) else later[:, :, d, :] @ taken) @ e_weights
        return power_mw * PERIOD_H * expected_price + float(next_weights @ column)

    def _candidates(self, period: int, last_price: float, stored_mwh: float, discharged_mwh: float, last_power_mw: float,
                    upcoming: tuple[float, np.ndarray] | None = None):
        """(action, expected value of taking it) for every action feasible from this state
        (`upcoming`: the period's ``_next_period``, if the caller has it already)."""
        expected_price, next_weights = upcoming or self._next_period(period, last_price)
        for k, a in enumerate(self.actions):
            if abs(a - last_power_mw) > self.config.ramp_mw_per_period + 1e-9:
                continue
            value = self._value_of(period, expected_price, next_weights, stored_mwh, discharged_mwh, float(a), k)
            if value is not None:
                yield float(a), value

    def regret(self, period: int, last_price: float, stored_mwh: float, discharged_mwh: float, last_power_mw: float,
               delivered_mw: float) -> float:
        """Expected profit (EUR) lost by delivering `delivered_mw` in `period` instead of the
        table's best power, on the table's price model and grid: 0 for its own decision; a
        power between two grid powers counts as their interpolation (and may lose less than
        nothing: the table chooses among grid powers only)."""
        return float(self.regrets(period, last_price, stored_mwh, discharged_mwh, last_power_mw, [delivered_mw])[0])

    def regrets(self, period: int, last_price: float, stored_mwh: float, discharged_mwh: float, last_power_mw: float,
                delivered_mw) -> np.ndarray:
        """:meth:`regret` of each of several powers delivered from the same state (the
        period's outlook and the best power's value worked out once for all of them)."""
        upcoming = self._next_period(period, last_price)
        best = max((v for _, v in self._candidates(period, last_price, stored_mwh, discharged_mwh, last_power_mw, upcoming)),
                   default=0.0)
        powers = np.asarray(delivered_mw, dtype=float)
        taken = interpolation_matrix(self.actions, powers)
        return np.array([best - self._value_of(period, *upcoming, stored_mwh, discharged_mwh, float(p), weights, delivered=True)
                         for p, weights in zip(powers, taken)])

    def decide(self, period: int, last_price: float, stored_mwh: float, discharged_mwh: float, last_power_mw: float) -> float:
        """The best power (MW) for `period` of the day (0 if nothing is feasible)."""
        best = max(self._candidates(period, last_price, stored_mwh, discharged_mwh, last_power_mw),
                   key=lambda av: av[1], default=(0.0, 0.0))
        return best[0]

    def value(self, period: int, last_price: float, stored_mwh: float, discharged_mwh: float, last_power_mw: float) -> float:
        """Expected profit (EUR) still to come today before deciding `period` (0 at the day's end)."""
        if period >= PERIODS_PER_DAY:
            return 0.0
        return max((v for _, v in self._candidates(period, last_price, stored_mwh, discharged_mwh, last_power_mw)),
                   default=0.0)


def day_regrets(table: ValueTable, previous_price: float, prices, powers_mw, socs) -> np.ndarray:
    """Per period of a traded day, the expected profit (EUR) its delivered power lost against
    the table's best decision from the same state (:meth:`ValueTable.regret`): where a
    policy falls short of the SDP. `socs` holds the state of charge before each period."""
    c = table.config
    settled = np.concatenate([[previous_price], np.asarray(prices, dtype=float)[:-1]])
    powers = np.asarray(powers_mw, dtype=float)
    discharged = np.concatenate([[0.0], np.cumsum(np.clip(powers, 0.0, None) * PERIOD_H)[:-1]])
    last = np.concatenate([[0.0], powers[:-1]])
    return np.array([table.regret(t, settled[t], socs[t] * c.capacity_mwh, discharged[t], last[t], powers[t])
                     for t in range(len(powers))])


def interpolation_matrix(grid: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Rows: the linear-interpolation weights of `points` (clamped to the grid) on `grid`."""
    p = np.clip(points, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, p) - 1, 0, len(grid) - 2)
    f = (p - grid[i]) / (grid[i + 1] - grid[i])
    m = np.zeros((len(p), len(grid)))
    rows = np.arange(len(p))
    m[rows, i] += 1 - f
    m[rows, i + 1] += f
    return m


def solve(fit: CopulaFit, config: BatteryConfig, power_step: float = 0.25, y_points: int = 41,
          e_points: int = 181) -> ValueTable:
    """Backward induction over one day (a fresh battery every day: energy left at midnight is
    worth nothing, as the LP ceiling counts it). Powers on a grid of `power_step` x rated
    power; an action is allowed only where the battery would deliver all of it."""
    c = config
    actions = np.round(np.arange(-1.0, 1.0 + 1e-9, power_step), 9) * c.power_mw
    y_grid = np.linspace(-4.5, 4.5, y_points) * fit.sigma
    e_grid = np.linspace(c.soc_min * c.capacity_mwh, c.soc_max * c.capacity_mwh, e_points)
    d_step = power_step * c.power_mw * PERIOD_H
    nd = int(math.floor(c.daily_discharge_mwh / d_step + 1e-9)) + 1
    nodes, weights = hermegauss(QUADRATURE_POINTS)
    weights = weights / weights.sum()
    nxt = fit.ar * y_grid[:, None] + math.sqrt(1 - fit.ar ** 2) * fit.sigma * nodes[None, :]
    expectation = sum(weights[j] * interpolation_matrix(y_grid, nxt[:, j]) for j in range(len(nodes)))
    expected_price = np.array([(fit.price(fit.shape[t] + nxt) * weights).sum(axis=1) for t in range(PERIODS_PER_DAY)])
    ny, ne, na = len(y_grid), len(e_grid), len(actions)
    values = np.zeros((PERIODS_PER_DAY + 1, ny, ne, nd, na))
    moves = []
    for a in actions:
        e = e_grid - (a * PERIOD_H / c.eta if a > 0 else a * PERIOD_H * c.eta)
        inside = (e >= e_grid[0] - 1e-9) & (e <= e_grid[-1] + 1e-9)
        moves.append((inside, interpolation_matrix(e_grid, e), int(round(max(a, 0.0) * PERIOD_H / d_step))))
    ramp_ok = np.abs(actions[:, None] - actions[None, :]) <= c.ramp_mw_per_period + 1e-9  # (taken, last)
    for t in range(PERIODS_PER_DAY - 1, -1, -1):
        taken = np.full((na, ny, ne, nd), -np.inf)
        for k, (inside, e_weights, shift) in enumerate(moves):
            # stored energy after the period, interpolated (a matrix product: BLAS, not einsum)
            later = (values[t + 1][..., k].transpose(0, 2, 1) @ e_weights.T).transpose(0, 2, 1)
            cont = np.full_like(later, -np.inf)
            cont[:, :, :nd - shift] = np.tensordot(expectation, later[:, :, shift:], axes=(1, 0))
            cont[:, ~inside] = -np.inf
            taken[k] = actions[k] * PERIOD_H * expected_price[t][:, None, None] + cont
        for last in range(na):
            values[t][..., last] = taken[ramp_ok[:, last]].max(axis=0)
    return ValueTable(fit, config, actions, y_grid, e_grid, d_step, values, nodes, weights)


def sdp_decider(table: ValueTable):
    """The SDP's power for each period (a `run_day` decider)."""

    def decide(t: int, last_price: float, battery) -> float:
        s = battery.state
        return table.decide(t, last_price, s.soc * table.config.capacity_mwh, s.discharged_today_mwh, s.power_mw)

    return decide
