"""Imbalance prices, 15-minute settlement periods: a seeded synthetic generator and CSV files.

The generator is a Gaussian copula: a latent standard-normal process (a daily shape
plus an AR(1) part) mapped through the quantile function of the measured price
distribution. The marginal distribution is therefore the measured one by construction
(quantiles, negative share, tails up to the price cap), the daily shape and the
persistence of spikes come from the latent process, and its AR coefficient is set so
the *price* series has the measured lag-1 autocorrelation. Calibration targets:
Belgian single imbalance prices 2024-25 (issue 15): mean 82, std 161, median 92 EUR/MWh,
16.5 % negative, lag-1 autocorrelation 0.60, 0.38 % above 500, 0.07 % above 1000,
range about -999..2548.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from core.config import ConfigError

PERIODS_PER_DAY = 96
PERIOD_H = 0.25

# Quantile function of the price (EUR/MWh) as knots (probability, price), linear between.
# The fixed knots are the measured statistics (0 at 16.5 %, 92 at the median, 500 at
# 1 - 0.38 %, 1000 at 1 - 0.07 %, the floor and the cap); the others were tuned
# (tests/simulators/test_battery_prices.py checks every target over a year) so the mean
# is 82 and the standard deviation 161.
QUANTILE_KNOTS = (
    (0.0, -999.0), (0.0005, -801.0), (0.004, -551.0), (0.02, -308.0), (0.06, -131.0), (0.165, 0.0),
    (0.30, 45.0), (0.50, 92.0), (0.70, 109.0), (0.90, 228.0), (0.97, 389.0), (0.9962, 500.0),
    (0.9993, 1000.0), (0.99985, 2005.0), (1.0, 2548.0),
)
DAILY_SHAPE_WEIGHT = 0.35  # share of the latent variance in the daily shape
LATENT_AR = 0.50  # AR(1) coefficient of the latent residual (gives price lag-1 autocorrelation ~0.60)


@dataclass
class PriceSeries:
    """Prices per 15-minute period with their start times (UTC)."""

    start: dt.datetime
    eur_per_mwh: np.ndarray

    @property
    def days(self) -> int:
        return len(self.eur_per_mwh) // PERIODS_PER_DAY

    def day(self, index: int) -> np.ndarray:
        return self.eur_per_mwh[index * PERIODS_PER_DAY:(index + 1) * PERIODS_PER_DAY]


def price_quantile(u: np.ndarray) -> np.ndarray:
    """The calibrated quantile function (probability -> EUR/MWh)."""
    p, q = np.array(QUANTILE_KNOTS).T
    return np.interp(u, p, q)


def daily_shape() -> np.ndarray:
    """Standardised daily shape over 96 periods: night trough, morning and evening peaks,
    a midday solar dip."""
    h = (np.arange(PERIODS_PER_DAY) + 0.5) * PERIOD_H
    shape = (0.9 * np.exp(-0.5 * ((h - 8.0) / 1.5) ** 2) + 1.2 * np.exp(-0.5 * ((h - 19.0) / 2.0) ** 2)
             - 0.8 * np.exp(-0.5 * ((h - 13.5) / 2.0) ** 2) - 0.5 * np.exp(-0.5 * ((h - 3.5) / 2.5) ** 2))
    return (shape - shape.mean()) / shape.std()


def synthetic_prices(days: int, seed: int, start: dt.datetime | None = None) -> PriceSeries:
    """`days` days of synthetic imbalance prices from generator seed `seed`."""
    rng = np.random.default_rng(seed)
    n = days * PERIODS_PER_DAY
    innovations = rng.standard_normal(n) * math.sqrt(1 - LATENT_AR ** 2)
    residual = np.empty(n)
    residual[0] = rng.standard_normal()
    for t in range(1, n):  # a plain loop: 35 040 steps a year take milliseconds
        residual[t] = LATENT_AR * residual[t - 1] + innovations[t]
    shape = np.tile(daily_shape(), days)
    latent = math.sqrt(DAILY_SHAPE_WEIGHT) * shape + math.sqrt(1 - DAILY_SHAPE_WEIGHT) * residual
    prices = price_quantile(ndtr(latent))
    return PriceSeries(start or dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc), prices)


def price_statistics(prices: np.ndarray) -> dict[str, float]:
    """The statistics the generator is calibrated to."""
    p = np.asarray(prices, dtype=float)
    return {
        "mean": float(p.mean()), "std": float(p.std()), "median": float(np.median(p)),
        "negative_share": float(np.mean(p < 0)), "lag1_autocorrelation": float(np.corrcoef(p[:-1], p[1:])[0, 1]),
        "above_500_share": float(np.mean(p > 500)), "above_1000_share": float(np.mean(p > 1000)),
        "min": float(p.min()), "max": float(p.max()),
    }


def load_price_csv(path: str | Path) -> PriceSeries:
    """Prices from a CSV file with columns ``timestamp`` (ISO 8601) and ``eur_per_mwh``
    (or a second column of prices), one row per 15-minute period, whole days.

    ConfigError naming the row for a bad timestamp or price, a gap or a duplicate.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: price file not found")
    times, values = [], []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{path}: empty file (expected a header: timestamp,eur_per_mwh)")
        for line, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ConfigError(f"{path}: row {line}: expected timestamp and price, got {row!r}"[:300])
            try:
                when = dt.datetime.fromisoformat(row[0].strip())
            except ValueError:
                raise ConfigError(f"{path}: row {line}: timestamp {row[0][:40]!r} is not ISO 8601") from None
            try:
                price = float(row[1])
            except ValueError:
                raise ConfigError(f"{path}: row {line}: price {row[1][:40]!r} is not a number") from None
            if not math.isfinite(price):
                raise ConfigError(f"{path}: row {line}: price is not finite")
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
            if times:
                step = when - times[-1]
                if step != dt.timedelta(minutes=15):
                    what = "a gap" if step > dt.timedelta(minutes=15) else "a duplicate or out-of-order row"
                    raise ConfigError(f"{path}: row {line}: {what} ({times[-1].isoformat()} -> {when.isoformat()}; "
                                      "expected one row every 15 minutes)")
            times.append(when)
            values.append(price)
    if len(values) < PERIODS_PER_DAY:
        raise ConfigError(f"{path}: {len(values)} periods: at least one whole day (96) is needed")
    whole = len(values) // PERIODS_PER_DAY * PERIODS_PER_DAY
    return PriceSeries(times[0], np.array(values[:whole]))
