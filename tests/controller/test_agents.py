"""The agents: TQC from sb3-contrib with the risk term, SAC; their actors load as policies."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from controller.agents import make_sac, risk_value


def test_risk_value_mixes_the_mean_and_the_worst_quarter():
    quantiles = torch.arange(8.0).reshape(1, 2, 4)  # pooled: 0..7
    assert risk_value(quantiles, 0.0).item() == pytest.approx(3.5)
    assert risk_value(quantiles, 1.0).item() == pytest.approx(0.5)  # mean of the worst 2 of 8
    assert risk_value(quantiles, 0.5).item() == pytest.approx(2.0)


def test_the_risk_averse_tqc_changes_only_the_actors_objective():
    """Pins how sb3-contrib's TQC calls its critic: raw quantiles for the critic loss and
    the target, the risk value for the actor (the only call with gradients on the actions)."""
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    model = make_sac(env, arch="mlp-small", algorithm="tqc", risk_weight=0.5, learning_starts=64, batch_size=32)
    obs = torch.zeros(3, 3)
    stored = torch.zeros(3, 1)
    raw = model.critic(obs, stored)
    assert raw.shape == (3, 2, 10) and raw.std() > 0  # quantiles, as the critic loss needs them
    actions = torch.zeros(3, 1, requires_grad=True)
    risky = model.critic(obs, actions)
    assert torch.allclose(risky.mean(dim=(1, 2)), risk_value(raw, 0.5).squeeze(1), atol=1e-6)
    model.learn(200)  # the whole update runs through the installed TQC.train
    assert all(torch.isfinite(p).all() for p in model.actor.parameters())


def test_the_risk_weight_needs_the_distributional_agent():
    with pytest.raises(ValueError, match="tqc"):
        make_sac(gym.make("Pendulum-v1"), arch="mlp-small", algorithm="sac", risk_weight=0.3)


def test_a_tqc_actor_is_a_policy_like_any_other(tmp_path):
    from controller.policy import Policy

    env = gym.make("MountainCarContinuous-v0")  # actions in [-1, 1], like every task's
    model = make_sac(env, arch="mlp-small", algorithm="tqc")
    meta = {"task": "none", "arch": "mlp-small", "observation": {"size": 2}, "action": {"size": 1}}
    policy = Policy.from_sac(model.policy, meta)
    obs = np.array([0.1, -0.02], dtype=np.float32)
    expected, _ = model.predict(obs, deterministic=True)
    assert np.allclose(policy.act(obs), expected, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["sac", "tqc"])
def test_a_zero_initialised_actor_starts_at_action_zero_and_still_explores(algorithm):
    """Residual tasks: action 0 is their base controller, so training starts from it."""
    env = gym.make("MountainCarContinuous-v0")
    model = make_sac(env, arch="mlp-small", algorithm=algorithm, zero_init_actor=True)
    obs = np.array([[0.3, 0.01], [-1.0, -0.05]], dtype=np.float32)
    assert np.all(model.predict(obs, deterministic=True)[0] == 0.0)
    assert np.any(model.predict(obs, deterministic=False)[0] != 0.0)  # the stochastic policy still explores
    with pytest.raises(ValueError, match="zero-initialised"):
        make_sac(env, arch="mlp-small", algorithm="ddpg", zero_init_actor=True)


@pytest.mark.parametrize("algorithm", ["sac", "tqc"])
def test_an_asymmetric_actor_reads_the_observation_and_its_critics_the_privileged_rest_too(algorithm, tmp_path):
    """The critics see what only the simulator knows; the shipped actor does not, and loads
    as a plain policy on the short observation."""
    from controller.policy import Policy

    env = gym.make("Pendulum-v1")  # observation 3: the actor reads the first 2, as if the third were privileged
    torch.manual_seed(0)
    model = make_sac(env, arch="mlp-small", algorithm=algorithm, actor_observation_size=2, learning_starts=64, batch_size=32)
    model.learn(200)  # updates run with the short actor
    full = torch.tensor([[0.3, -0.2, 0.5], [0.3, -0.2, -4.0]])
    with torch.no_grad():
        actions = model.actor(full, deterministic=True)
        assert torch.allclose(actions[0], actions[1], atol=1e-6)  # the privileged value never reaches the actor
        assert not torch.equal(model.critic(full, actions)[0], model.critic(full, actions)[1])  # it reaches the critics
    meta = {"task": "none", "arch": "mlp-small", "observation": {"size": 2}, "action": {"size": 1}}
    path = Policy.from_sac(model.policy, meta).save(tmp_path / "p.pt")
    loaded = Policy.load(path)
    assert np.allclose(loaded.act(np.array([0.3, -0.2], dtype=np.float32)), actions[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="asymmetric"):
        make_sac(env, arch="mlp-small", algorithm="ddpg", actor_observation_size=2)
    with pytest.raises(ValueError, match="outside"):
        make_sac(env, arch="mlp-small", algorithm=algorithm, actor_observation_size=4)


def test_a_recorded_evaluation_is_plain_json_that_a_policy_file_and_the_store_keep(tmp_path):
    import json

    from conftest import for_setup
    from controller.policy import Policy, unfit_for_auto
    from controller.store import Store
    from controller.training import recorded_evaluation
    from simulators.beamline.lattice import load_lattice

    record = recorded_evaluation({"success_rate": np.float64(0.5), "steps": {"median": float("nan"), "all": [np.int64(3)]}},
                                 np.bool_(False))
    assert record == {"summary": {"success_rate": 0.5, "steps": {"median": None, "all": [3]}}, "bar_met": False}
    json.dumps(record, allow_nan=False)  # the store's JSON column has no NaN
    policy = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm1")))
    policy.metadata = dict(policy.metadata, evaluation=record)
    loaded = Policy.load(policy.save(tmp_path / "p.pt"))  # torch's weights-only unpickler accepts it
    assert loaded.metadata["evaluation"] == record and unfit_for_auto(loaded) is not None
    row = Store(f"sqlite:///{tmp_path / 's.sqlite'}").add_policy(loaded.path, loaded.sha256, loaded.metadata)
    assert row.meta["evaluation"] == record
