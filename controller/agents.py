"""TBSAC: stable-baselines3 SAC with the paper's trend-image features extractor."""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

ARCHITECTURES = ("tbsac", "mlp")


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


def make_sac(env: gym.Env, arch: str = "tbsac", seed: int = 0, tensorboard_log: str | None = None,
             actor_lr_factor: float = 1.0, **overrides) -> SAC:
    """A TBSAC (or MLP ablation) SAC model on `env` (the actor slower by `actor_lr_factor`)."""
    cls = SAC
    if actor_lr_factor != 1.0:
        cls = type("SlowActorSAC", (SlowActorSAC,), {"actor_lr_factor": actor_lr_factor})
    return cls(
        "MlpPolicy",
        env,
        policy_kwargs=policy_kwargs(arch),
        seed=seed,
        tensorboard_log=tensorboard_log,
        device="cpu",
        verbose=0,
        **{**SAC_DEFAULTS, **overrides},
    )
