"""The battery as a registered task: environment, sessions through the safety layer, CLI."""

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from conftest import for_setup
from controller.session import run_session
from core.config import ConfigError
from core.registry import get_task
from core.task import TaskEnv
from safety.guard import InterlockRule


@pytest.fixture(scope="module")
def battery():
    definition = get_task("battery")
    return definition, definition.load_setup("bess-1mw-2mwh")


def make_env(definition, setup, errors="train", **config):
    plant = definition.sim_plant(setup, definition.load_errors(errors))
    return TaskEnv(plant, definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()(**config)))


def trade_a_day(env) -> tuple[float, dict]:
    env.reset(seed=3)
    total, steps, done = 0.0, 0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(np.array([0.5 if steps % 8 < 4 else -0.5]))
        total += reward
        steps += 1
        done = terminated or truncated
    assert steps == 96
    return total, info


def test_environment_follows_the_gymnasium_api_and_pays_the_settled_price(battery):
    definition, setup = battery
    env = make_env(definition, setup, stored_value_eur_per_mwh=0.0)  # no shaping: the reward is the profit
    check_env(env, skip_render_check=True)
    total, info = trade_a_day(env)
    assert info["profit_eur"] == pytest.approx(sum(env.plant.profits))  # the task's books match the battery's
    assert total == pytest.approx(0.01 * info["profit_eur"])


def test_reward_shaping_telescopes_to_the_starting_potential(battery):
    definition, setup = battery
    env = make_env(definition, setup, stored_value_eur_per_mwh=80.0, shaping_gamma=1.0)
    total, info = trade_a_day(env)
    assert info["profit_eur"] == pytest.approx(sum(env.plant.profits))  # the task's books match the battery's
    start_potential = 80.0 * setup.soc_start * setup.capacity_mwh
    assert total == pytest.approx(0.01 * (info["profit_eur"] - start_potential))


def test_the_critics_privileged_features_are_the_rest_of_todays_prices(battery):
    """Training only: the observation (the actor's) is followed by the prices still to come today."""
    definition, setup = battery
    plant = definition.sim_plant(setup, definition.load_errors("train"))
    task = definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()())
    env, plain = TaskEnv(plant, task, privileged=True), make_env(definition, setup)
    n = plain.observation_space.shape[0]
    assert env.observation_space.shape == (n + 96,)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert np.allclose(obs[n:], np.arcsinh(plant.today / 100.0))  # period 0 decides next: the whole day ahead
    for _ in range(90):
        obs, *_ = env.step(np.array([0.2]))
    assert np.allclose(obs[n:n + 6], np.arcsinh(plant.today[90:] / 100.0)) and not obs[n + 6:].any()
    reference, _ = plain.reset(seed=3)
    assert np.array_equal(env.reset(seed=3)[0][:n], reference)  # the actor's part is the task's observation


def test_a_residual_task_at_action_zero_trades_exactly_as_the_mpc(battery):
    """base mpc: the action corrects the MPC's power; the zero correction is the MPC itself,
    planned from what the task read (not from the simulator's state)."""
    from simulators.battery.baselines import mpc_decider, run_day
    from simulators.battery.definition import training_forecast
    from simulators.battery.task import price_day

    definition, setup = battery
    env = make_env(definition, setup, errors="test", base="mpc")
    assert env.observation_space.shape[0] == make_env(definition, setup).observation_space.shape[0] + 1
    for seed in (0, 7):
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(np.zeros(1))
            done = terminated or truncated
        before, today = price_day(definition.load_errors("test"), seed)
        mpc = run_day(today, float(before[-1]), setup, mpc_decider(training_forecast(), setup))
        np.testing.assert_allclose(env.plant.powers, mpc.power_mw, atol=1e-9)
        assert info["profit_eur"] == pytest.approx(mpc.total)
    # A correction moves the power away from the plan, within the rating.
    env.reset(seed=1)
    planned = env.task.base_mw
    assert env.task.proposed_settings(np.array([0.5]))[0] == pytest.approx(np.clip(planned + 0.5, -1, 1))
    assert env.task.proposed_settings(np.array([1.0]))[0] <= setup.power_mw


def test_a_residual_policy_records_what_its_mpc_plans_with(battery):
    definition, setup = battery
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    task = definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()(base="mpc"))
    recorded = json.loads(json.dumps(task.config.model_dump()))  # as a policy file stores it
    again = definition.task_for_policy(plant.knobs, plant.readings, {"task_config": recorded})
    assert again.config == task.config and again.config.battery == setup and again.config.forecast_ar > 0
    del recorded["battery"]
    with pytest.raises(ConfigError, match="battery its MPC plans for"):
        definition.task_for_policy(plant.knobs, plant.readings, {"task_config": recorded})


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
    assert set(results) == {"lp_ceiling", "mpc", "sdp", "threshold", "nothing"}
    for r in results.values():
        assert set(r) == {"profit_eur", "fraction_of_ceiling", "cycles_per_day", "cvar5_daily_profit_eur", "trades"}
        assert r["cycles_per_day"]["max"] <= 2.0 + 1e-9
    assert results["lp_ceiling"]["fraction_of_ceiling"] == 1.0
    assert results["lp_ceiling"]["profit_eur"]["total"] >= max(results[m]["profit_eur"]["total"]
                                                                for m in ("mpc", "sdp", "threshold"))


class Cycling:
    """Discharges at full power until the SoC is low, then charges until it is high (a test
    policy that would spend the day's cycle budget by mid-day)."""

    task, path, sha256 = "battery", None, ""
    metadata = {"task": "battery", "task_config": {}}

    def __init__(self):
        self.discharging = True

    def act(self, obs):
        soc = obs[-5]
        if soc < 0.1:
            self.discharging = False
        elif soc > 0.9:
            self.discharging = True
        return np.array([1.0 if self.discharging else -1.0])


def test_the_guard_holds_the_daily_discharge_budget_before_the_battery_would(battery):
    from controller.session import default_safety

    definition, setup = battery
    plant = sim_battery(definition, setup)
    policy = Cycling()
    safety = default_safety(policy)
    assert safety.budgets[0].limit == setup.max_cycles_per_day * setup.capacity_mwh == 4.0
    result = run_session(plant, policy, safety=safety, interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
    assert result.status == "completed"
    clamps = [e for e in result.events if e.kind == "clamp" and e.reason.startswith("daily discharge budget")]
    assert clamps  # the guard cut the discharge, the battery's own limit never had to
    written = np.array([r.safe[0] for r in result.step_records])
    assert np.clip(written, 0, None).sum() * 0.25 == pytest.approx(4.0, abs=1e-9)
    assert sum(max(p, 0.0) for p in plant.powers) * 0.25 <= 4.0 + 1e-9


def test_a_budget_the_ramp_limit_cannot_honour_trips_and_stops_injecting(battery):
    from safety.guard import CumulativeLimit, SafetyConfig
    from simulators.battery.model import BatteryConfig

    definition, _ = battery
    plant = definition.sim_plant(BatteryConfig(ramp_mw_per_period=0.2), definition.load_errors("test"))
    plant.reset(5)
    budget = CumulativeLimit(knob="power", per_write=0.25, limit=0.3, window_writes=96, unit="MWh", label="test budget")
    result = run_session(plant, ConstantPolicy(1.0), safety=SafetyConfig(max_excursion_steps=10, budgets=[budget]))
    # Ramping up (0.2, 0.4, 0.6 MW) spends 0.3 MWh; the next write must be 0 but the ramp allows 0.4 at least.
    assert result.status == "tripped" and "cumulative budget" in result.trips[0] and result.steps == 3
    assert result.restored and plant.read_knobs()[0] == 0.0  # ramped down within the ramp limit
    assert sum(max(r.safe[0], 0.0) for r in result.step_records) * 0.25 == pytest.approx(0.3)


def test_ioc_refuses_a_bad_period(run_cli):
    proc = run_cli("ioc", "--lattice", "bess-1mw-2mwh", "--period-s", "0", timeout=60)
    assert proc.returncode == 2 and "--period-s" in proc.stderr
    # a plant that follows its settings at once has no periods: the option is refused, not ignored
    proc = run_cli("ioc", "--lattice", "cafe2-cm1", "--period-s", "1", timeout=60)
    assert proc.returncode == 2 and "does not run in periods" in proc.stderr and "Traceback" not in proc.stderr


def write_prices(path, days: int, bad_row: int | None = None):
    import datetime as dt

    from simulators.battery.prices import synthetic_prices

    series = synthetic_prices(days, 77)
    start = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
    rows = ["timestamp,eur_per_mwh"]
    for i, v in enumerate(series.eur_per_mwh):
        rows.append(f"{(start + dt.timedelta(minutes=15 * i)).isoformat()},{'n/a' if i == bad_row else round(v, 2)}")
    path.write_text("\n".join(rows) + "\n")
    return series


def test_evaluate_on_a_price_file_trades_its_days(run_cli, tmp_path):
    prices = tmp_path / "march.csv"
    series = write_prices(prices, 3)
    proc = run_cli("evaluate", "battery", "--policy", "none", "--errors", str(prices), "--episodes", "2", "--seed", "0",
                   "--methods", "lp_ceiling,nothing", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    from core.registry import get_task
    from simulators.battery.model import perfect_foresight

    setup = get_task("battery").load_setup("bess-1mw-2mwh")
    expected = sum(perfect_foresight(series.day(d), setup).profit_eur for d in (1, 2))  # the file's days 1 and 2
    assert json.loads(proc.stdout)["results"]["lp_ceiling"]["profit_eur"]["total"] == pytest.approx(expected, abs=0.01)


def test_a_bad_price_file_is_refused_naming_the_row(run_cli, tmp_path):
    prices = tmp_path / "bad.csv"
    write_prices(prices, 2, bad_row=100)
    proc = run_cli("evaluate", "battery", "--policy", "none", "--errors", str(prices), "--episodes", "1", "--json", timeout=120)
    assert proc.returncode == 2 and "row 102" in proc.stderr and "not a number" in proc.stderr


def test_a_session_on_real_15_minute_periods_may_last_a_day(tmp_path):
    """The session's wall-clock limit follows the machine's period clock: a real battery's
    periods take 900 s (clock timeout 1000 s), not the virtual IOC's compressed second."""
    import yaml

    from controller.policy import Policy
    from controller.session import default_safety
    from hardware.epics_plant import EpicsPlant
    from hardware.machine import MACHINE_DIR, load_machine

    data = yaml.safe_load((MACHINE_DIR / "virtual-bess.yaml").read_text())
    agent = Policy.load("pretrained", *for_setup("bess-1mw-2mwh"))
    limits = {}
    for timeout in (5.0, 1000.0):
        data["clock"]["timeout_s"] = timeout
        path = tmp_path / f"bess-{timeout}.yaml"
        path.write_text(yaml.safe_dump(data))
        machine, path = load_machine(path)
        limits[timeout] = default_safety(agent, EpicsPlant(machine, path, ["MW"])).max_duration_s
    assert limits[5.0] == 3600.0  # the task's default covers the compressed clock
    assert limits[1000.0] >= 96 * 1000.0  # a whole traded day of real periods
    assert default_safety(agent).max_duration_s == 3600.0  # a simulated battery has no clock
