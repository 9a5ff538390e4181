"""The bubble task: reward as published, success, solver failure."""

import numpy as np
import pytest

from core.task import TaskEnv
from simulators.bubble.baselines import linear_theory_amplitudes, mean_force_coefficients
from simulators.bubble.task import PRESETS, BubbleErrors, BubbleSetup, BubbleSimPlant, BubbleTask


def env(errors=PRESETS["train"]):
    return TaskEnv(BubbleSimPlant(BubbleSetup(name="lab"), errors), BubbleTask())


def test_reward_follows_the_published_formula():
    e = env(BubbleErrors(position_noise=0.0))
    obs, _ = e.reset(seed=4)
    target = e.task.target
    _, reward, terminated, _, info = e.step(np.array([-1.0, -1.0]))  # no drive: the bubble stays put
    x = e.task.history[2]
    expected = -((abs(x - target) / max(0.25 - target, target - 0.05)) ** 0.5)
    if info["success"]:
        expected += 10.0
    assert reward == pytest.approx(expected) and terminated == info["success"]
    assert obs.shape == (7,)


def test_a_bubble_started_on_its_target_succeeds_at_once():
    e = env(BubbleErrors(start=(0.2, 0.2), target=(0.2, 0.2), position_noise=0.0))
    e.reset(seed=0)
    _, reward, terminated, _, info = e.step(np.array([-1.0, -1.0]))
    assert terminated and info["success"] and reward == pytest.approx(10.0)


def test_a_solver_failure_ends_the_episode_with_the_penalty():
    e = env()
    e.reset(seed=1)
    e.plant.set_fault("SOLVER_FAILURE", 1)
    _, reward, terminated, _, info = e.step(np.array([0.0, 0.0]))
    assert terminated and reward == -10.0 and info["solver_failure"]


def test_linear_theory_balances_the_mean_forces_at_the_target():
    for target in (0.15, 0.2, 0.24):
        p1, p2 = linear_theory_amplitudes(target, level_bar=0.3)
        a1, a2 = mean_force_coefficients(60e-6, target)
        assert max(p1, p2) == pytest.approx(0.3)
        assert abs(a1 * p1 ** 2 + a2 * p2 ** 2) < 1e-9 * (abs(a1) * p1 ** 2 + abs(a2) * p2 ** 2)


def test_a_bubble_out_of_the_field_of_view_is_lost_not_misread():
    e = env(BubbleErrors(start=(0.29, 0.29), target=(0.2, 0.2), position_noise=0.0))
    e.reset(seed=0)
    e.plant.bubble.state[0, 2] = 0.31  # drifted past the imaging's window
    r = e.plant.read()
    assert not r.valid[0] and np.isnan(r.values[0]) and r.interlocks["in_view"] == 0.0
    assert r.problems["position"] == "bubble lost from the field of view"
    _, reward, terminated, _, info = e.step(np.array([-1.0, -1.0]))
    # the penalty and the 127 steps it forfeits at -1: giving a bubble up must not pay
    assert terminated and reward == -10.0 - 127.0 and not info["solver_failure"] and "field of view" in info["failure"]


def test_the_registered_task_evaluates_linear_theory_over_its_long_horizon():
    from controller import api

    ev = api.evaluate("bubble", None, None, 3, 0, "test", ("linear",))
    lin = ev.summary["results"]["linear"]
    assert set(lin) >= {"success_rate", "steps_to_target", "final_error", "solver_failures", "level_bar"}
    assert lin["steps_to_target"]["horizon"] == 1024 and lin["solver_failures"] == 0
    # success counts only targets reached within an episode (128 steps), "reached" within 1024
    assert lin["success_rate"] <= lin["steps_to_target"]["reached_within_horizon"]
    assert len(ev.runs["linear"]) == 3 and all(len(r["position"]) >= 2 for r in ev.runs["linear"])


def test_a_policy_trained_for_another_drive_is_refused():
    from core.registry import get_task

    definition = get_task("bubble")
    setup = definition.load_setup("dual-25-50khz")
    meta = {"lattice": {"f1_hz": 20e3, "f2_hz": 40e3, "max_amplitude_bar": 1.0}}
    problem = definition.check_policy(meta, setup)
    assert "f1_hz=20000.0" in problem and "f1_hz=25000.0" in problem
    assert definition.check_policy({"lattice": {"f1_hz": 25e3, "f2_hz": 50e3, "max_amplitude_bar": 1.0}}, setup) is None


def test_the_greedy_controller_takes_the_grid_pair_that_lands_nearest_on_an_exact_model():
    from simulators.bubble.baselines import GreedyOneStep

    exact = BubbleErrors(r0_scale=(1.0, 1.0), amplitude_scale=(1.0, 1.0), position_noise=0.0, start=(0.1, 0.1),
                         target=(0.2, 0.2))
    e = env(exact)
    obs, _ = e.reset(seed=0)
    greedy = GreedyOneStep(60e-6)
    action = greedy.act(obs)
    amplitudes = e.task.proposed_settings(action)
    assert all(any(abs(a - level) < 1e-9 for level in (0, 0.25, 0.5, 0.75, 1.0)) for a in amplitudes)
    e.step(action)
    moved = abs(e.task.history[2] - 0.2)
    assert moved < 0.1  # closer than the start, and as predicted: no other grid pair lands nearer
    for other in greedy.candidates:
        probe = env(exact)
        probe.reset(seed=0)
        probe.step(other * 2.0 - 1.0)
        assert abs(probe.task.history[2] - 0.2) >= moved - 1e-12
