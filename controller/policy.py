"""Policy files: the deterministic actor of a trained agent plus everything needed to trust it.

A policy file is a small ``torch.save`` archive (loaded with ``weights_only=True``, so
loading cannot execute code) holding the actor's weights and metadata: task, lattice
fingerprint, error model, observation layout, action scaling, training run and package
versions. Loading against a lattice with other BPMs or correctors is refused with a
one-line :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.sac.policies import SACPolicy

from simulators.config import ConfigError

from .agents import policy_kwargs

FORMAT = "tbsac-policy/1"
POLICY_DIR = resources.files("controller") / "policies"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("tbsac", "torch", "stable-baselines3", "cheetah-accelerator", "gymnasium", "numpy"):
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def _spaces(meta: dict) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    obs = gym.spaces.Box(-np.inf, np.inf, (meta["observation"]["size"],), np.float32)
    act = gym.spaces.Box(-1.0, 1.0, (meta["action"]["size"],), np.float32)
    return obs, act


class Policy:
    """A trained agent's deterministic policy, ready for inference."""

    name = "agent"

    def __init__(self, sac_policy: SACPolicy, metadata: dict, path: Path | None = None):
        self.sac_policy = sac_policy.eval()
        self.metadata = metadata
        self.path = path

    @classmethod
    def from_sac(cls, sac_policy: SACPolicy, metadata: dict) -> "Policy":
        meta = dict(metadata, format=FORMAT, versions=package_versions())
        return cls(sac_policy, meta)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone() for k, v in self.sac_policy.actor.state_dict().items()}
        torch.save({"metadata": self.metadata, "actor": state}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, lattice=None) -> "Policy":
        """Load a policy file; with `lattice`, refuse one trained for another layout."""
        path = resolve_policy_path(path, lattice)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad archive
            raise ConfigError(f"{path}: not a tbsac policy file ({type(exc).__name__})") from None
        meta = blob.get("metadata") if isinstance(blob, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{path}: field 'metadata.format': expected {FORMAT!r}")
        if lattice is not None:
            check_compatible(meta, lattice, path)
        obs_space, act_space = _spaces(meta)
        # float32 whatever the process default is (importing Xopt/BoTorch makes it float64)
        sac_policy = SACPolicy(obs_space, act_space, lambda _: 0.0, **policy_kwargs(meta["arch"])).float()
        sac_policy.actor.load_state_dict(blob["actor"])
        return cls(sac_policy, meta, path)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path) if self.path else ""

    def begin(self) -> None:
        """Stateless: nothing to forget between episodes."""

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action for one observation (or a batch)."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        single = x.ndim == 1
        action = self.sac_policy.actor(x[None] if single else x, deterministic=True).numpy()
        return action[0] if single else action


def check_compatible(meta: dict, lattice, path: Path) -> None:
    """Raise ConfigError if the policy's task or lattice layout differs from `lattice`'s."""
    from simulators.injector.model import InjectorLattice

    task = meta.get("task", "orbit")
    wanted = "rfq" if isinstance(lattice, InjectorLattice) else "orbit"
    if task != wanted:
        raise ConfigError(f"{path}: field 'metadata.task': policy is for task {task!r}, lattice {lattice.name} is for {wanted!r}")
    trained = meta.get("lattice", {})
    if task == "rfq":
        if trained.get("knob_names") != lattice.knob_names:
            raise ConfigError(f"{path}: field 'metadata.lattice.knob_names': policy expects {trained.get('knob_names')}, "
                              f"lattice {lattice.name} has {lattice.knob_names}")
        return
    mine = lattice.fingerprint()
    for key, what in (("n_bpm", "BPMs"), ("n_correctors", "correctors")):
        if trained.get(key) != mine[key]:
            raise ConfigError(
                f"{path}: field 'metadata.lattice.{key}': policy was trained for "
                f"{trained.get(key)} {what} ({trained.get('name')}), lattice {lattice.name} has {mine[key]}"
            )
    for key in ("bpm_names", "corrector_names"):
        if trained.get(key) != mine[key]:
            raise ConfigError(
                f"{path}: field 'metadata.lattice.{key}': policy expects {trained.get(key)}, "
                f"lattice {lattice.name} has {mine[key]}"
            )


def resolve_policy_path(path: str | Path, lattice=None) -> Path:
    """`pretrained` -> the shipped policy for the lattice; otherwise a file path."""
    if str(path) == "pretrained":
        if lattice is None:
            raise ConfigError("--policy pretrained needs a lattice to choose the shipped policy")
        shipped = POLICY_DIR / f"{lattice.name}.pt"
        if not shipped.is_file():
            raise ConfigError(f"no pretrained policy ships for lattice {lattice.name!r}")
        return Path(str(shipped))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: policy file not found")
    return p


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
