"""The agents: TBSAC (stable-baselines3 SAC with the paper's trend-image features
extractor, or plain MLPs) and TQC from sb3-contrib (the distributional SAC), optionally
risk-averse (its actor maximises a mix of the mean and the CVaR of the return distribution)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.sac.policies import SACPolicy
from torch import nn

ARCHITECTURES = ("tbsac", "mlp", "mlp-small")
ALGORITHMS = ("sac", "tqc", "ddpg")


class TrendConvExtractor(BaseFeaturesExtractor):
    """Three parallel convolutions over the 3 x N trend image (Chen et al.).

    Kernels 3x1, 3x2 and 3x3 with ``channels`` filters each, no padding, leaky ReLU;
    their flattened outputs are concatenated. Works for any N >= 3 (any BPM count).
    """

    def __init__(self, observation_space: gym.spaces.Box, channels: int = 4):
        n = observation_space.shape[0] // 3
        if 3 * n != observation_space.shape[0] or n < 3:
            raise ValueError(f"trend observation must be 3 x N with N >= 3, got {observation_space.shape}")
        super().__init__(observation_space, features_dim=channels * (3 * n - 3))
        self.n = n
        self.convs = nn.ModuleList(nn.Conv2d(1, channels, kernel_size=(3, w)) for w in (1, 2, 3))
        self.activation = nn.LeakyReLU()

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        image = observations.reshape(-1, 1, 3, self.n)
        return torch.cat([self.activation(conv(image)).flatten(1) for conv in self.convs], dim=1)


class LeadingFeatures(BaseFeaturesExtractor):
    """The first `size` values of the observation (an asymmetric actor: the rest is the critics')."""

    def __init__(self, observation_space: gym.spaces.Box, size: int):
        super().__init__(observation_space, features_dim=size)
        self.size = size

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return observations[:, : self.size]


def asymmetric_policy(policy_class: type, actor_observation_size: int) -> type:
    """`policy_class` (SB3's SACPolicy or sb3-contrib's TQCPolicy) whose actor reads only
    the first `actor_observation_size` values of the observation, while its critics read
    all of it (asymmetric actor-critic, Pinto et al. 2018): the critics may be given what
    only a simulator knows; the actor, the part that is shipped, never depends on it.
    The actor's weights are those of a plain actor on the short observation."""

    class AsymmetricPolicy(policy_class):
        def make_actor(self, features_extractor=None):
            extractor = LeadingFeatures(self.observation_space, actor_observation_size)
            return super().make_actor(extractor)

    AsymmetricPolicy.__name__ = f"Asymmetric{policy_class.__name__}"
    return AsymmetricPolicy


def policy_kwargs(arch: str) -> dict:
    """SB3 policy kwargs for an architecture name (``tbsac`` or the ``mlp`` ablation)."""
    if arch == "tbsac":
        return dict(
            features_extractor_class=TrendConvExtractor,
            features_extractor_kwargs=dict(channels=4),
            net_arch=[256, 256],
            activation_fn=nn.LeakyReLU,
        )
    if arch == "mlp":
        return dict(net_arch=[256, 256], activation_fn=nn.ReLU)
    if arch == "mlp-small":  # low-dimensional observations: 4x fewer weights per layer, ~3x faster updates on CPU
        return dict(net_arch=[64, 64], activation_fn=nn.ReLU)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# Paper hyperparameters (seed-specs section 1), except the replay buffer (see README).
SAC_DEFAULTS = dict(
    learning_rate=2e-4,
    buffer_size=50_000,
    learning_starts=500,
    batch_size=256,
    tau=0.005,
    gamma=0.99,
    train_freq=1,
    gradient_steps=1,
    ent_coef="auto",
)


class SlowActorSAC(SAC):
    """SAC whose actor learns `actor_lr_factor` times slower than its critics.

    For fine-tuning a trained actor: fresh critics are wrong away from the actions they
    have seen, and an actor following them at the critics' pace forgets what it knew.
    """

    actor_lr_factor = 1.0

    def _update_learning_rate(self, optimizers) -> None:
        super()._update_learning_rate(optimizers)
        for group in self.actor.optimizer.param_groups:
            group["lr"] *= self.actor_lr_factor


# TQC (Kuznetsov et al. 2020): 2 critics x 10 quantiles, the top 1 per critic dropped
# from the target (10 %; the paper: 25 quantiles, top 2, 8 %). 25 quantiles made an
# update ~2.7x slower on this CPU (measured 35 vs 94 steps/s with 64-unit networks),
# which under a fixed training budget cost more than the finer distribution gave.
TQC_DEFAULTS = dict(top_quantiles_to_drop_per_net=1)
TQC_POLICY = dict(n_quantiles=10, n_critics=2)
CVAR_ALPHA = 0.25  # the risk term is the mean of the worst quarter of the return distribution


def risk_value(quantiles: torch.Tensor, risk_weight: float, alpha: float = CVAR_ALPHA) -> torch.Tensor:
    """(1 - w) x mean + w x CVaR_alpha of the pooled quantiles (batch x critics x quantiles -> batch x 1)."""
    pooled = quantiles.reshape(quantiles.shape[0], -1)
    mean = pooled.mean(dim=1, keepdim=True)
    if risk_weight == 0:
        return mean
    worst = torch.sort(pooled, dim=1).values[:, : max(1, int(round(alpha * pooled.shape[1])))]
    return (1 - risk_weight) * mean + risk_weight * worst.mean(dim=1, keepdim=True)


def _risk_averse_tqc(risk_weight: float):
    """TQC whose actor maximises :func:`risk_value` of its critics' quantiles.

    sb3-contrib's TQC.train computes the actor's objective as the mean of what the
    critic returns for the actor's own actions, the only critic call whose actions carry
    gradients (the critic's own loss uses stored actions, the target runs without
    gradients). For that call this critic returns every quantile replaced by the risk
    value, so their mean is the risk value and the critic's training is untouched.
    ``tests/controller/test_agents.py`` pins this against the installed sb3-contrib.
    """
    from sb3_contrib import TQC

    class RiskAverseTQC(TQC):
        def _setup_model(self) -> None:
            super()._setup_model()
            critic_forward = self.critic.forward

            def forward(obs, actions):
                quantiles = critic_forward(obs, actions)
                if not actions.requires_grad:
                    return quantiles
                return risk_value(quantiles, risk_weight).unsqueeze(-1).expand_as(quantiles)

            self.critic.forward = forward

    return RiskAverseTQC


DDPG_NOISE = 0.1  # exploration: Gaussian action noise (sigma, in the [-1, 1] action range)
SAC_ONLY = ("ent_coef", "target_entropy")  # a task's SAC settings that DDPG has no use for
ZERO_INIT_STD = 0.25  # a zero-initialised actor's spread (before the tanh; SB3's default starts at 1: near-random)


def make_sac(env: gym.Env, arch: str = "tbsac", seed: int = 0, tensorboard_log: str | None = None,
             actor_lr_factor: float = 1.0, algorithm: str = "sac", risk_weight: float = 0.0, zero_init_actor: bool = False,
             actor_observation_size: int | None = None, **overrides) -> SAC:
    """A TBSAC/MLP agent on `env`: SAC (the actor slower by `actor_lr_factor`), TQC
    (risk-averse with `risk_weight` in [0, 1)) or DDPG (deterministic, for comparison).

    `zero_init_actor`: the actor's mean starts at action 0 everywhere, its spread at
    ``ZERO_INIT_STD`` (sac/tqc), for residual tasks, whose action 0 is their base
    controller: training starts from it and explores near it.

    `actor_observation_size`: the actor reads only that many leading values of the
    environment's observation, the critics all of it (:func:`asymmetric_policy`; sac/tqc)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    kwargs = policy_kwargs(arch)
    settings = {**SAC_DEFAULTS, **overrides}
    if algorithm == "ddpg":  # the deterministic comparison (the bubble paper's algorithm): no entropy term
        if risk_weight or actor_lr_factor != 1.0 or zero_init_actor or actor_observation_size is not None:
            raise ValueError("a risk weight, a slower actor, a zero-initialised actor or an asymmetric actor-critic needs "
                             "algorithm sac/tqc, not ddpg")
        from stable_baselines3 import DDPG
        from stable_baselines3.common.noise import NormalActionNoise

        n = env.action_space.shape[0]
        settings = {k: v for k, v in settings.items() if k not in SAC_ONLY}
        return DDPG("MlpPolicy", env, policy_kwargs=kwargs, seed=seed, tensorboard_log=tensorboard_log, device="cpu",
                    verbose=0, action_noise=NormalActionNoise(np.zeros(n), np.full(n, DDPG_NOISE)), **settings)
    if algorithm == "tqc":
        if not 0 <= risk_weight < 1:
            raise ValueError(f"risk weight must be in [0, 1), got {risk_weight}")
        from sb3_contrib import TQC
        from sb3_contrib.tqc.policies import TQCPolicy

        policy_class = TQCPolicy
        cls = _risk_averse_tqc(risk_weight) if risk_weight else TQC
        kwargs = {**kwargs, **TQC_POLICY}
        settings = {**TQC_DEFAULTS, **settings}
    else:
        if risk_weight:
            raise ValueError("a risk weight needs the distributional agent (algorithm tqc)")
        cls = SAC
        if actor_lr_factor != 1.0:
            cls = type("SlowActorSAC", (SlowActorSAC,), {"actor_lr_factor": actor_lr_factor})
        policy_class = SACPolicy
    policy = "MlpPolicy"
    if actor_observation_size is not None:
        if not 0 < actor_observation_size <= env.observation_space.shape[0]:
            raise ValueError(f"actor observation size {actor_observation_size} outside 1..{env.observation_space.shape[0]} "
                             "(the environment's observation)")
        policy = asymmetric_policy(policy_class, actor_observation_size)
    model = cls(policy, env, policy_kwargs=kwargs, seed=seed, tensorboard_log=tensorboard_log, device="cpu",
                verbose=0, **settings)
    if zero_init_actor:
        with torch.no_grad():
            model.actor.mu.weight.zero_()
            model.actor.mu.bias.zero_()
            model.actor.log_std.weight.zero_()
            model.actor.log_std.bias.fill_(float(np.log(ZERO_INIT_STD)))
    return model
