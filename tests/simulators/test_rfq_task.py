"""RFQ transmission task and its baselines (issue 6 groundwork)."""

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from simulators.injector.baselines import MeasurementBudget, run_nelder_mead, run_random
from simulators.injector.model import load_injector
from simulators.injector.task import TransmissionEnv, TransmissionTask, TransmissionTaskConfig, load_injector_errors
from conftest import for_setup


@pytest.fixture(scope="module")
def lpi():
    return load_injector("lpi")


def test_env_passes_gymnasium_checker(lpi):
    check_env(TransmissionEnv(lpi, load_injector_errors("test")), skip_render_check=True)


def test_observation_reward_and_budget(lpi):
    env = TransmissionEnv(lpi, load_injector_errors("test"))
    obs, info = env.reset(seed=4)
    history = TransmissionTask.HISTORY * 7  # per past step: 10 dT and six knob changes
    readings = history + 6  # after the transmission slope over the six knobs
    assert obs.shape == (readings + 3 + 6 + 1 + 6 + 1,)
    assert obs[readings + 2] == pytest.approx(info["transmission"], abs=1e-6)
    assert not obs[:history].any()
    before = info["transmission"]
    action = np.zeros(6)
    action[0] = 1.0
    obs, reward, terminated, truncated, info = env.step(action)
    assert env.plant.read_knobs()[0] == pytest.approx(0.354 + lpi.knob_steps[0])
    assert reward == pytest.approx(info["transmission"] - 1 + 5 * (info["transmission"] - before), abs=1e-6)
    # The newest trend entry: the transmission change and the knob change (action units) behind it.
    assert obs[0] == pytest.approx(10 * (info["transmission"] - before), abs=1e-5)
    np.testing.assert_allclose(obs[1:7], action, atol=1e-6)
    assert obs[readings + 3] == pytest.approx(0.1)  # SOL1 one step (a tenth of ten) from the start
    # Two points: the slope along SOL1 is the transmission change per step (ridge-shrunk).
    assert obs[history] == pytest.approx(10 * (info["transmission"] - before) / 1.1, abs=1e-4)
    assert not obs[history + 1:readings].any()
    steps = 1
    while not truncated:
        *_, truncated, _ = env.step(np.zeros(6))
        steps += 1
    assert steps == 30 and not terminated


def test_untuned_injectors_start_like_the_paper(lpi):
    env = TransmissionEnv(lpi, load_injector_errors("test"))
    starts = [env.reset(seed=s)[1]["transmission"] for s in range(60)]
    assert 0.5 < np.median(starts) < 0.8


def test_optimisers_spend_exactly_their_budget_and_improve(lpi):
    env = TransmissionEnv(lpi, load_injector_errors("test"))
    env.reset(seed=11)
    start = env.plant.true_transmission()
    nm = run_nelder_mead(env, 30)
    assert len(nm.trace) == 30
    assert env.plant.true_transmission(nm.best[1]) > start
    env.reset(seed=11)
    rs = run_random(env, 30, np.random.default_rng(0))
    assert len(rs.trace) == 30


def test_measured_plant_refuses_beyond_budget(lpi):
    env = TransmissionEnv(lpi, load_injector_errors("test"))
    env.reset(seed=1)
    m = MeasurementBudget(env, 2)
    m.measure(env.plant.read_knobs())
    m.measure(env.plant.read_knobs())
    with pytest.raises(Exception):
        m.measure(env.plant.read_knobs())


@pytest.mark.slow  # 13 s; the JSON schema of `tbsac evaluate` is checked on orbit by default
def test_evaluate_rfq_cli_json(run_cli):
    proc = run_cli("evaluate", "rfq", "--policy", "none", "--episodes", "1", "--seed", "5", "--methods", "nelder_mead,random", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "rfq" and set(out["results"]) == {"nelder_mead", "random"}
    r = out["results"]["nelder_mead"]
    assert {"final_transmission", "steps_to_85", "steps_to_90pct_best", "fraction_of_best"} <= set(r)
    assert 0.5 < out["best_achievable"]["median"] <= 0.97


def test_evaluate_rfq_rejects_unknown_method(run_cli):
    proc = run_cli("evaluate", "rfq", "--methods", "gradient_descent")
    assert proc.returncode == 2 and "gradient_descent" in proc.stderr


def test_xopt_bayesian_optimisation_spends_its_budget(lpi):
    from simulators.injector.baselines import run_xopt

    env = TransmissionEnv(lpi, load_injector_errors("test"))
    env.reset(seed=12)
    bo = run_xopt(env, 6, seed=3)
    assert len(bo.trace) == 6
    assert bo.best[0] >= 0.0


@pytest.mark.slow  # 25 s; the generic training path also runs in test_seam.py and test_cli.py
def test_short_rfq_training_writes_a_policy_the_cli_can_evaluate(run_cli, tmp_path, lpi):
    from controller.policy import Policy

    out = tmp_path / "run"
    proc = run_cli("train", "rfq", "--steps", "1000", "--seed", "2", "--out", str(out), "--eval-every", "500",
                   "--eval-episodes", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "training.json").read_text())
    assert [c["step"] for c in record["curves"]] == [500, 1000]
    assert {"fraction_of_best", "steps_to_85"} <= set(record["curves"][0])
    meta = Policy.load(out / "policy.pt", *for_setup(lpi)).metadata
    assert meta["task"] == "rfq" and meta["lattice"]["knob_names"] == lpi.knob_names
    assert meta["action"]["step"] == lpi.knob_steps and meta["observation"]["size"] == 44
    proc = run_cli("evaluate", "rfq", "--policy", str(out / "policy.pt"), "--episodes", "1", "--methods", "random",
                   "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["results"]) == {"agent", "random"}


def test_rfq_training_refuses_the_trend_image_architecture(run_cli, tmp_path):
    proc = run_cli("train", "rfq", "--arch", "tbsac", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--arch" in proc.stderr


def test_summary_counts_unreached_as_beyond_budget_and_collapses():
    from simulators.injector.baselines import RfqEpisode, summarise_rfq

    episodes = [RfqEpisode(1, 0.6, [0.2, 0.9], 0.9, 0.95), RfqEpisode(2, 0.6, [0.5, 0.7], 0.7, 0.95)]
    r = summarise_rfq(episodes)
    assert r["steps_to_85"] == {"median": None, "reached": 1}
    assert r["collapses"] == 1  # 0.2 is below half of the starting 0.6
    assert r["fraction_of_best"]["median"] == pytest.approx((0.9 / 0.95 + 0.7 / 0.95) / 2, abs=1e-4)


def test_agent_episode_ends_on_its_best_measured_setting(lpi):
    """Evaluation runs the agent as a session does: a late walk back to the best setting it read."""
    from controller.policy import Policy
    from simulators.injector.baselines import run_agent

    env = TransmissionEnv(lpi, load_injector_errors("test"), TransmissionTaskConfig(max_steps=30))
    env.reset(seed=11)
    trace = run_agent(env, Policy.load("pretrained", *for_setup(lpi)), 30)
    target = env.task.return_target
    assert target is not None and len(trace) <= 30
    np.testing.assert_allclose(env.plant.read_knobs(), target)
    assert env.task.steps_to(target) == 0 and env.task.returned
    # Without the walk (margin above any gain) the agent would have used all 30 steps and ended elsewhere.
    env.reset(seed=11)
    env.task.config = TransmissionTaskConfig(max_steps=30, return_margin=1.0)
    assert len(run_agent(env, Policy.load("pretrained", *for_setup(lpi)), 30)) == 30 and env.task.return_target is None


def test_walk_back_counts_a_knob_within_its_readback_tolerance_as_there(lpi):
    import dataclasses

    env = TransmissionEnv(lpi, load_injector_errors("test"))
    env.reset(seed=4)
    knobs = [dataclasses.replace(k, tolerance=0.1 * k.max_step) for k in env.plant.knobs]
    task = TransmissionTask(knobs, lpi.beam.current_ma)
    task.start(env.plant)
    step = task.step_size
    assert task.steps_to(task.settings + 0.05 * step) == 0
    assert task.steps_to(task.settings + 0.5 * step) == 1
    assert task.steps_to(task.settings - np.array([0, 0, 0, 2.5, 0, 0]) * step) == 3
