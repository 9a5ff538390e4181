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
