"""The battery as a registered task: environment, sessions through the safety layer, CLI."""

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from controller.session import run_session
from core.registry import get_task
from core.task import TaskEnv
from safety.guard import InterlockRule


@pytest.fixture(scope="module")
def battery():
    definition = get_task("battery")
    return definition, definition.load_setup("bess-1mw-2mwh")


def make_env(definition, setup, errors="train"):
    plant = definition.sim_plant(setup, definition.load_errors(errors))
    return TaskEnv(plant, definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()()))


def test_environment_follows_the_gymnasium_api_and_pays_the_settled_price(battery):
    definition, setup = battery
    env = make_env(definition, setup)
    check_env(env, skip_render_check=True)
    env.reset(seed=3)
    total, steps, done = 0.0, 0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(np.array([0.5 if steps % 8 < 4 else -0.5]))
        total += reward
        steps += 1
        done = terminated or truncated
    assert steps == 96
    assert info["profit_eur"] == pytest.approx(sum(env.plant.profits))  # the task's books match the battery's
    assert total == pytest.approx(0.01 * info["profit_eur"])


class ConstantPolicy:
    """Always asks for the same power (a test policy, not a trained one)."""

    task = "battery"
    path = None
    sha256 = ""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.metadata = {"task": "battery", "task_config": {}}

    def act(self, obs):
        return np.array([self.fraction])


def sim_battery(definition, setup, seed=5):
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    plant.reset(seed)
    return plant


def test_a_day_runs_to_its_end_and_then_stops_injecting(battery):
    definition, setup = battery
    plant = sim_battery(definition, setup)
    result = run_session(plant, ConstantPolicy(0.02), interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
    assert result.status == "completed" and result.success and result.steps == 96
    assert result.restored and plant.read_knobs()[0] == 0.0  # the agent let go: no power


def test_a_soc_trip_stops_injecting_instead_of_restoring_the_start(battery):
    definition, setup = battery
    plant = sim_battery(definition, setup)
    plant.write_knobs([0.6])  # found discharging at 0.6 MW
    # Discharging at full power empties it below 40 % within a few periods: the interlock trips.
    result = run_session(plant, ConstantPolicy(1.0), interlocks=[InterlockRule("soc_pct", "min", 40.0)])
    assert result.status == "tripped" and result.restored
    assert plant.read_knobs()[0] == 0.0  # safe state: no power (not the 0.6 MW it started with)
    assert any(e.kind == "restore" and e.reason.startswith("no power") for e in result.events)


def test_evaluate_battery_json_has_every_method_and_key(run_cli):
    proc = run_cli("evaluate", "battery", "--policy", "none", "--episodes", "3", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert set(results) == {"lp_ceiling", "mpc", "threshold", "nothing"}
    for r in results.values():
        assert set(r) == {"profit_eur", "fraction_of_ceiling", "cycles_per_day", "cvar5_daily_profit_eur", "trades"}
        assert r["cycles_per_day"]["max"] <= 2.0 + 1e-9
    assert results["lp_ceiling"]["fraction_of_ceiling"] == 1.0
    assert results["lp_ceiling"]["profit_eur"]["total"] >= max(results["mpc"]["profit_eur"]["total"],
                                                                results["threshold"]["profit_eur"]["total"])


def test_the_battery_has_no_virtual_ioc_yet_and_says_why(run_cli):
    proc = run_cli("ioc", "--lattice", "bess-1mw-2mwh", timeout=60)
    assert proc.returncode == 2 and "no virtual IOC yet" in proc.stderr
