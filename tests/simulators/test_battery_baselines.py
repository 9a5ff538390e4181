"""The battery baselines on held-out synthetic days: ordered as they must be."""

import numpy as np

from simulators.battery.baselines import (
    Forecast, mpc_decider, nothing_decider, run_day, threshold_decider, tune_thresholds,
)
from simulators.battery.model import BatteryConfig, perfect_foresight
from simulators.battery.prices import synthetic_prices


def days(series):
    p = series.eur_per_mwh
    return [(series.day(d), float(p[d * 96 - 1]) if d else float(p[0])) for d in range(1, series.days)]


def test_ceiling_above_mpc_and_threshold_above_nothing_on_held_out_days():
    config = BatteryConfig()
    train = synthetic_prices(60, 100)  # training generator seeds are disjoint from the test ones
    forecast = Forecast.fit(train.eur_per_mwh)
    assert 0.3 < forecast.ar < 0.9 and forecast.profile[76:80].mean() > forecast.profile[12:16].mean()
    low, high = tune_thresholds(days(train)[:20], config)
    assert low < high
    test = days(synthetic_prices(6, 900))
    totals = {name: 0.0 for name in ("ceiling", "mpc", "threshold", "nothing")}
    for prices, previous in test:
        totals["ceiling"] += perfect_foresight(prices, config).profit_eur
        totals["mpc"] += run_day(prices, previous, config, mpc_decider(forecast, config)).total
        totals["threshold"] += run_day(prices, previous, config, threshold_decider(low, high, config)).total
        result = run_day(prices, previous, config, nothing_decider)
        totals["nothing"] += result.total
        assert np.all(result.power_mw == 0)
    assert totals["ceiling"] >= max(totals["mpc"], totals["threshold"])
    assert totals["mpc"] > 0 and totals["threshold"] > totals["nothing"] == 0.0
    print({k: round(v) for k, v in totals.items()})
