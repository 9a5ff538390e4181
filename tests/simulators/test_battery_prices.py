"""The synthetic imbalance prices against the measured Belgian statistics, and price files."""

import datetime as dt

import numpy as np
import pytest

from core.config import ConfigError
from simulators.battery.prices import PERIODS_PER_DAY, load_price_csv, price_statistics, synthetic_prices

# target, tolerance over one simulated year (35 040 periods)
TARGETS = {
    "mean": (82, 8), "std": (161, 15), "median": (92, 5), "negative_share": (0.165, 0.015),
    "lag1_autocorrelation": (0.60, 0.03), "above_500_share": (0.0038, 0.0015), "above_1000_share": (0.0007, 0.0005),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_simulated_year_matches_the_measured_statistics(seed):
    stats = price_statistics(synthetic_prices(365, seed).eur_per_mwh)
    for name, (target, tolerance) in TARGETS.items():
        assert abs(stats[name] - target) <= tolerance, (name, stats[name])
    assert -999 <= stats["min"] and stats["max"] <= 2548


def test_prices_are_seeded_and_have_a_daily_shape():
    a, b = synthetic_prices(30, 7), synthetic_prices(30, 7)
    np.testing.assert_array_equal(a.eur_per_mwh, b.eur_per_mwh)
    assert not np.array_equal(a.eur_per_mwh, synthetic_prices(30, 8).eur_per_mwh)
    profile = synthetic_prices(365, 3).eur_per_mwh.reshape(-1, PERIODS_PER_DAY).mean(axis=0)
    evening, night = profile[76:80].mean(), profile[12:16].mean()  # 19:00-20:00 against 03:00-04:00
    assert evening > night + 50


def test_price_csv_round_trip_and_bad_rows(tmp_path):
    good = tmp_path / "prices.csv"
    series = synthetic_prices(2, 0)
    lines = ["timestamp,eur_per_mwh"]
    for i, p in enumerate(series.eur_per_mwh):
        lines.append(f"{(series.start + dt.timedelta(minutes=15 * i)).isoformat()},{p:.3f}")
    good.write_text("\n".join(lines) + "\n")
    loaded = load_price_csv(good)
    assert loaded.days == 2 and np.allclose(loaded.eur_per_mwh, series.eur_per_mwh, atol=1e-3)

    gap = tmp_path / "gap.csv"
    gap.write_text("\n".join(lines[:10] + lines[11:]) + "\n")
    with pytest.raises(ConfigError, match="row 11: a gap"):
        load_price_csv(gap)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:5] + [lines[5].split(",")[0] + ",cheap"] + lines[6:]) + "\n")
    with pytest.raises(ConfigError, match="row 6: price 'cheap' is not a number"):
        load_price_csv(bad)
    stamp = tmp_path / "stamp.csv"
    stamp.write_text("\n".join(lines[:3] + ["yesterday,12.0"] + lines[4:]) + "\n")
    with pytest.raises(ConfigError, match="row 4: timestamp 'yesterday'"):
        load_price_csv(stamp)
