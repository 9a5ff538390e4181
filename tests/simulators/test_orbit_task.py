"""The orbit-correction task and environments."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from simulators.beamline.errors import ErrorModel, load_error_model
from simulators.beamline.lattice import load_lattice
from simulators.beamline.model import BeamlineModel
from simulators.beamline.task import (
    BatchedOrbitEnv, OrbitEnv, OrbitTaskConfig, orbit_reward, rms, trend_observation,
)


@pytest.fixture(scope="module")
def cm1():
    return load_lattice("cafe2-cm1")


def test_env_passes_gymnasium_checker(cm1):
    check_env(OrbitEnv(cm1, load_error_model("test")), skip_render_check=True)


def test_reward_follows_the_paper():
    cfg = OrbitTaskConfig()
    prev = np.array([2.0, -2.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    b = np.array([1.0, -1.0, 2.0, 2.0, 3.0, 2.0, 0.5, 0.5, 0.5, 0.5])
    reward, success = orbit_reward(prev, b, 4, cfg)
    improved, worse = 7, 3  # |B_i| equal counts as not decreased
    d = (improved * 1 - worse * 4) / 100
    assert reward == pytest.approx(-rms(b) + 0.4 * d)
    assert not success
    small = np.full(10, 0.3)
    reward, success = orbit_reward(prev, small, 4, cfg)
    assert success
    assert reward == pytest.approx(-0.3 + 0.4 * 0.1 + 50 + 3 * (50 - 4))


def test_reset_probe_and_trend_layout(cm1):
    env = OrbitEnv(cm1, load_error_model("train").model_copy(update={"bpm_noise_mm": 0.0}))
    obs, info = env.reset(seed=5)
    n = cm1.n_readings
    assert obs.shape == (3 * n,)
    b_before = env.task.initial_readings
    np.testing.assert_array_equal(env.plant.read_knobs(), np.full(cm1.n_correctors, 0.3))
    np.testing.assert_allclose(obs[:n], 0.0)
    np.testing.assert_allclose(obs[n:2 * n], obs[2 * n:] - b_before, atol=1e-5)
    action = np.linspace(-1, 1, cm1.n_correctors)
    prev_b = obs[2 * n:].astype(float)
    obs2, *_ = env.step(action)
    np.testing.assert_allclose(obs2[:n], obs[n:2 * n])
    np.testing.assert_allclose(obs2[n:2 * n], obs2[2 * n:] - prev_b, atol=1e-5)
    np.testing.assert_allclose(env.plant.read_knobs(), 0.3 + action)


def test_env_readings_equal_cheetah_tracking_without_noise(cm1):
    em = load_error_model("hard").model_copy(update={"bpm_noise_mm": 0.0})
    env = OrbitEnv(cm1, em)
    env.reset(seed=9)
    obs, *_ = env.step(np.full(cm1.n_correctors, 0.7))
    tracked = BeamlineModel(cm1).track(env.plant.errors, env.plant.read_knobs()[None, None])
    np.testing.assert_allclose(obs[-cm1.n_readings:], tracked.bpm_mm.flatten().numpy(), atol=1e-4)


def test_corrector_limits_are_enforced(cm1):
    env = OrbitEnv(cm1, load_error_model("train"), OrbitTaskConfig(action_scale=2.0))
    env.reset(seed=1)
    env.task.settings = np.full(cm1.n_correctors, cm1.corrector_limit - 0.5)
    proposed = env.task.proposed_settings(np.ones(cm1.n_correctors))
    np.testing.assert_array_equal(proposed, cm1.corrector_limit)
    proposed = env.task.proposed_settings(-5 * np.ones(cm1.n_correctors))  # actions beyond [-1, 1]
    np.testing.assert_array_equal(proposed, cm1.corrector_limit - 2.5)
    env.plant.write_knobs(np.full(cm1.n_correctors, 1e3))  # the power supply clamps too
    np.testing.assert_array_equal(env.plant.read_knobs(), cm1.corrector_limit)


def test_beam_loss_ends_the_episode_with_penalty(cm1):
    env = OrbitEnv(cm1, load_error_model("train"), OrbitTaskConfig(action_scale=40.0))
    env.reset(seed=2)
    before = float(np.sqrt(np.mean(env.task.readings ** 2)))
    _, reward, terminated, _, info = env.step(np.ones(cm1.n_correctors))
    # never cheaper than staying: the fixed penalty plus the RMS it had for every step left
    assert info["beam_lost"] and terminated and reward == pytest.approx(-100.0 - before * 49)


def test_episode_truncates_at_step_limit(cm1):
    env = OrbitEnv(cm1, load_error_model("train"), OrbitTaskConfig(max_steps=7))
    env.reset(seed=3)
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(np.zeros(cm1.n_correctors))
        steps += 1
        if terminated or truncated:
            break
    assert steps == 7 and truncated and not terminated


def test_same_seed_same_machine_and_noise(cm1):
    a, b = OrbitEnv(cm1, load_error_model("test")), OrbitEnv(cm1, load_error_model("test"))
    np.testing.assert_array_equal(a.reset(seed=42)[0], b.reset(seed=42)[0])
    act = np.full(cm1.n_correctors, 0.2)
    np.testing.assert_array_equal(a.step(act)[0], b.step(act)[0])
    assert not np.array_equal(a.reset(seed=43)[0], b.reset(seed=42)[0])


def test_batched_env_matches_task_semantics(cm1):
    env = BatchedOrbitEnv(cm1, ErrorModel(bpm_noise_mm=0.0), n_envs=16, seed=0)
    obs = env.reset()
    assert obs.shape == (16, 3 * cm1.n_readings)
    settings_before = env.settings.copy()
    b_before = obs[:, -cm1.n_readings:].astype(float)
    actions = np.random.default_rng(0).uniform(-1, 1, (16, cm1.n_correctors))
    obs2, reward, terminated, truncated = env.step(actions)
    b = env.response.readings(settings_before + actions)
    expected_reward, success = orbit_reward(b_before, b, 1, env.config)
    np.testing.assert_allclose(obs2, trend_observation(obs[:, cm1.n_readings:2 * cm1.n_readings], b_before, b), atol=1e-5)
    np.testing.assert_allclose(reward, expected_reward)
    np.testing.assert_array_equal(terminated, success)


def test_opening_probe_is_bounded_by_the_largest_step_and_reduced_when_scraping():
    """Issue 13, item 4: the +0.3 probe on every corrector tripped machines that start near an aperture."""
    import dataclasses

    from core.registry import get_task
    from simulators.beamline.errors import ErrorModel

    orbit = get_task("orbit")
    lattice = orbit.load_setup("cafe2-cm1")
    plant = orbit.sim_plant(lattice, orbit.load_errors("test"))
    plant.reset(1)
    knobs = [dataclasses.replace(k, max_step=0.1) for k in plant.knobs]
    task = orbit.make_task(lattice, knobs, plant.readings, OrbitTaskConfig())
    task.start(plant)
    np.testing.assert_allclose(plant.read_knobs(), 0.1)  # 0.3 asked, 0.1 allowed
    scraping = orbit.sim_plant(lattice, ErrorModel(beam_offset_mm=12.0, bpm_noise_mm=0.0))
    seed = next(s for s in range(200) if (scraping.reset(s), 0.0 < scraping.beam_current() < 0.999)[1])
    task = orbit.make_task(lattice, plant.knobs, plant.readings, OrbitTaskConfig())
    task.start(scraping)
    # the beam is already scraping: a third of the probe (enough to check the response)
    np.testing.assert_allclose(scraping.read_knobs(), 0.1), seed
