"""The stochastic DP on the price model fitted to training days: the fit recovers the
generator, the value table predicts what its policy then earns, the policy keeps the
battery's limits, and as a shaping potential it telescopes."""

import math

import numpy as np
import pytest

from core.registry import get_task
from simulators.battery.baselines import run_day, threshold_decider
from simulators.battery.definition import training_value_table
from simulators.battery.prices import DAILY_SHAPE_WEIGHT, LATENT_AR, daily_shape, synthetic_prices
from simulators.battery.sdp import CopulaFit, day_regrets, sdp_decider
from simulators.battery.task import PRESETS, BatteryTaskConfig, price_day


@pytest.fixture(scope="module")
def battery():
    definition = get_task("battery")
    setup = definition.load_setup("bess-1mw-2mwh")
    return definition, setup, training_value_table(setup.model_dump_json())


def test_the_fitted_price_model_recovers_the_generator():
    fit = CopulaFit.fit(synthetic_prices(365, 7).eur_per_mwh)
    assert fit.ar == pytest.approx(LATENT_AR, abs=0.03)
    assert fit.sigma == pytest.approx(math.sqrt(1 - DAILY_SHAPE_WEIGHT), abs=0.04)
    assert np.max(np.abs(fit.shape - math.sqrt(DAILY_SHAPE_WEIGHT) * daily_shape())) < 0.2
    assert fit.price(np.array([0.0]))[0] == pytest.approx(92.0, abs=6.0)  # the median
    for price, period in ((-300.0, 10), (95.0, 40), (800.0, 76)):  # a settled price maps back to itself
        assert fit.price(fit.shape[period] + fit.residual(price, period)) == pytest.approx(price, rel=1e-6)


def test_the_value_table_predicts_what_its_policy_earns_within_the_limits(battery):
    _, setup, table = battery
    days = [(today, float(before[-1])) for before, today in (price_day(PRESETS["test"], s) for s in range(40))]
    predicted = np.array([table.value(0, previous, setup.soc_start * setup.capacity_mwh, 0.0, 0.0) for _, previous in days])
    results = [run_day(prices, previous, setup, sdp_decider(table)) for prices, previous in days]
    earned = np.array([r.total for r in results])
    # Unbiased up to the grid: the mean earned within 3 standard errors of the mean predicted.
    assert abs(earned.mean() - predicted.mean()) < 3 * earned.std() / math.sqrt(len(earned))
    for r in results:
        assert np.all(np.abs(r.power_mw) <= setup.power_mw + 1e-9)
        assert np.all(np.abs(np.diff(np.concatenate([[0.0], r.power_mw]))) <= setup.ramp_mw_per_period + 1e-9)
        assert np.all((r.soc >= setup.soc_min - 1e-9) & (r.soc <= setup.soc_max + 1e-9))
        assert np.clip(r.power_mw, 0, None).sum() * 0.25 <= setup.daily_discharge_mwh + 1e-9


def test_the_sdp_potential_telescopes_and_a_policys_task_keeps_plain_books(battery):
    definition, setup, _ = battery
    plant = definition.sim_plant(setup, definition.load_errors("train"))
    config = BatteryTaskConfig(shaping_potential="sdp", shaping_gamma=1.0)
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    rng = np.random.default_rng(3)
    plant.reset(11)
    task.start(plant)
    start_value = task._phi
    assert start_value > 100.0  # a day's expected profit from a half-full battery
    shaped, done = [], False
    while not done:
        _, reward, done, _, info = task.step(plant, rng.uniform(-1, 1, 1))
        shaped.append(reward)
    # phi telescopes: the shaped day is the profit less the value of the start
    assert sum(shaped) == pytest.approx(0.01 * (info["profit_eur"] - start_value), abs=1e-6)
    policy_task = definition.task_for_policy(plant.knobs, plant.readings, {"task_config": config.model_dump()})
    plant.reset(11)
    policy_task.start(plant)
    _, reward, _, _, _ = policy_task.step(plant, np.array([0.5]))
    assert reward == pytest.approx(0.01 * policy_task.profit)  # no table: no shaping, no solve


def test_a_policys_regrets_against_the_table_add_up_to_what_it_earns_less(battery):
    """The SDP's own days lose nothing against its table; another policy's regrets are
    negative only for powers off the table's grid (a battery at its limit delivers part of a
    step) and add up (performance difference) to the table's value of the start less what
    the policy earned, within the noise of the days' prices."""
    _, setup, table = battery
    days = [(today, float(before[-1])) for before, today in (price_day(PRESETS["test"], s) for s in range(40))]
    for prices, previous in days[:5]:
        own = run_day(prices, previous, setup, sdp_decider(table))
        socs = np.concatenate([[setup.soc_start], own.soc])
        assert np.abs(day_regrets(table, previous, prices, own.power_mw, socs)).max() < 1e-6
    shortfall, lost = [], []
    for prices, previous in days:
        rule = run_day(prices, previous, setup, threshold_decider(20.0, 150.0, setup))
        regrets = day_regrets(table, previous, prices, rule.power_mw, np.concatenate([[setup.soc_start], rule.soc]))
        steps = rule.power_mw / (table.actions[1] - table.actions[0])
        off_grid = np.abs(steps - np.round(steps)) > 1e-9
        assert np.all((regrets > -1e-6) | off_grid)
        lost.append(regrets.sum())
        shortfall.append(table.value(0, previous, setup.soc_start * setup.capacity_mwh, 0.0, 0.0) - rule.total)
    lost, shortfall = np.array(lost), np.array(shortfall)
    assert lost.mean() > 100.0  # a crude rule loses a lot each day
    assert abs(lost.mean() - shortfall.mean()) < 3 * np.std(shortfall - lost) / math.sqrt(len(days))
