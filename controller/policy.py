"""Policy files: the deterministic actor of a trained agent plus everything needed to trust it.

A policy file is a small ``torch.save`` archive (loaded with ``weights_only=True``, so
loading cannot execute code) holding the actor's weights and metadata: task, lattice
fingerprint, error model, observation layout, action scaling, training run and package
versions. Loading for another task, or for a setup with other knobs or readings, is
refused with a one-line :class:`ConfigError`.
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
from stable_baselines3.td3.policies import TD3Policy

from core.config import ConfigError
from core.task import TaskDefinition

from .agents import policy_kwargs

FORMAT = "tbsac-policy/1"
# An autonomous session needs a policy that reached the target on at least this fraction
# of its own evaluation machines: one that fails in its own simulation (e.g. a fine-tuning
# that did not take on a calibrated foreign lattice) pushed real orbits into the beam-loss
# interlock (benchmarks/foreign.py, seeds 15 and 18: 0 % recorded, both tripped).
MIN_SUCCESS_FOR_AUTO = 0.8
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
    def load(cls, path: str | Path, definition: TaskDefinition | None = None, setup=None, variant: str = "") -> "Policy":
        """Load a policy file; with a task (and setup), refuse one trained for another task or layout."""
        path = resolve_policy_path(path, setup, variant)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad archive
            raise ConfigError(f"{path}: not a tbsac policy file ({type(exc).__name__})") from None
        meta = blob.get("metadata") if isinstance(blob, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{path}: field 'metadata.format': expected {FORMAT!r}")
        if not isinstance(meta.get("task"), str):
            raise ConfigError(f"{path}: field 'metadata.task': missing (which task the policy was trained for)")
        if definition is not None:
            check_compatible(meta, definition, setup, path)
        try:
            obs_space, act_space = _spaces(meta)
            arch = policy_kwargs(meta.get("arch"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: field 'metadata': {exc.args[0] if isinstance(exc, ValueError) else f'missing or malformed {exc}'}") from None
        # float32 whatever the process default is (importing Xopt/BoTorch makes it float64)
        policy_class = TD3Policy if meta.get("algorithm") == "ddpg" else SACPolicy  # DDPG's actor is deterministic
        sac_policy = policy_class(obs_space, act_space, lambda _: 0.0, **arch).float()
        weights = blob.get("actor")
        if not isinstance(weights, dict):
            raise ConfigError(f"{path}: field 'actor': no actor weights")
        try:
            sac_policy.actor.load_state_dict(weights)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: field 'actor': weights do not fit the declared network "
                              f"({' '.join(str(exc).split())[:240]})") from None
        policy = cls(sac_policy, meta, path)
        policy.check_finite()
        return policy

    def check_finite(self) -> None:
        """Refuse a policy whose weights or answers are not finite numbers (ConfigError)."""
        bad = [k for k, v in self.sac_policy.actor.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        probe = np.random.default_rng(0).normal(size=(8, self.metadata["observation"]["size"])).astype(np.float32)
        if bad or not np.all(np.isfinite(self.act(probe))):
            where = f" (weights {', '.join(bad[:3])})" if bad else ""
            raise ConfigError(f"{self.path}: field 'actor': the policy's outputs are not finite{where}")

    @property
    def task(self) -> str:
        """The registered task the policy was trained for."""
        return self.metadata["task"]

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
        batch = x[None] if single else x
        if isinstance(self.sac_policy, TD3Policy):
            action = self.sac_policy.actor(batch).numpy()
        else:
            action = self.sac_policy.actor(batch, deterministic=True).numpy()
        return action[0] if single else action


def unfit_for_auto(policy, min_success: float = MIN_SUCCESS_FOR_AUTO) -> str | None:
    """Why `policy` must not run unattended (None if nothing says so): the evaluation
    recorded with it, on simulated machines of its own lattice, reached the target in
    fewer than `min_success` of them. Policy files from before the record existed, tasks
    without a success rate and stand-ins without metadata are not judged."""
    metadata = getattr(policy, "metadata", None) or {}
    summary = (metadata.get("evaluation") or {}).get("summary") or {}
    rate = summary.get("success_rate")
    if not isinstance(rate, (int, float)) or rate >= min_success:
        return None
    training = metadata.get("training") or {}
    episodes = training.get("eval_episodes")
    on = f"{episodes} simulated machines" if episodes else "the simulated machines"
    lattice = (metadata.get("lattice") or {}).get("name")
    return (f"policy {getattr(policy, 'path', None) or ''}: in its own evaluation (step {training.get('checkpoint_step', '?')}, "
            f"{on} of {'lattice ' + lattice if lattice else 'its lattice'}) it reached the target in {rate:.0%}, below the "
            f"{min_success:.0%} an autonomous session needs: train or fine-tune it further, or run it with --mode approve")


def refuse_unfit_for_mode(policy, mode: str) -> str | None:
    """ConfigError before anything is written or recorded if `mode` is auto and the
    policy's own recorded evaluation says it must not run unattended; in the other modes
    that reason (None if there is none), for the operator to see."""
    problem = unfit_for_auto(policy)
    if problem and mode == "auto":
        raise ConfigError(problem)
    return problem


def check_compatible(meta: dict, definition: TaskDefinition, setup, path: Path) -> None:
    """Raise ConfigError if the policy's task or layout differs from `setup`'s."""
    task = meta["task"]
    if task != definition.name:
        where = f"lattice {setup.name} is" if setup is not None else "the machine is"
        raise ConfigError(f"{path}: field 'metadata.task': policy is for task {task!r}, {where} for {definition.name!r}")
    problem = definition.check_policy(meta, setup) if setup is not None else None
    if problem:
        raise ConfigError(f"{path}: {problem}")


def resolve_policy_path(path: str | Path, setup=None, variant: str = "") -> Path:
    """`pretrained` -> the shipped policy for the setup (lattice; ``<name>-<variant>.pt``
    for a variant such as a comparison algorithm's); otherwise a file path."""
    if str(path) == "pretrained":
        if setup is None:
            raise ConfigError("--policy pretrained needs a lattice to choose the shipped policy")
        # A calibrated setup runs its origin's shipped policy (through a knob map, see session_knob_map).
        for name in dict.fromkeys(n for n in (setup.name, getattr(setup, "derived_from", "")) if n):
            shipped = POLICY_DIR / (f"{name}-{variant}.pt" if variant else f"{name}.pt")
            if shipped.is_file():
                return Path(str(shipped))
        raise ConfigError(f"no pretrained {variant + ' ' if variant else ''}policy ships for lattice {setup.name!r}"
                          + (f" or {setup.derived_from!r}" if getattr(setup, "derived_from", "") else ""))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: policy file not found")
    return p


def resolve_init_policy(path: str | Path, setup) -> Path:
    """The policy a fine-tuning run starts from: a file, or `pretrained` = the shipped policy
    of the setup or of the setup it was calibrated from (``derived_from``)."""
    try:
        return resolve_policy_path(path, setup)
    except ConfigError as exc:
        raise ConfigError(f"--init-from {path}: {exc}") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
