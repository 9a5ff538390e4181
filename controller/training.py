"""Training TBSAC agents in simulation, with periodic evaluation and small policy files."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from simulators.beamline.errors import ErrorModel
from simulators.beamline.lattice import Lattice
from simulators.beamline.plant import OrbitSimPlant
from simulators.beamline.task import OrbitEnv, OrbitTaskConfig

from .agents import make_sac
from .evaluation import run_episode, summarise
from .policy import Policy

log = logging.getLogger(__name__)

# Training-time evaluation machines; far from the seeds documented for `evaluate`.
EVAL_SEED_BASE = 5_000_000


@dataclass
class Bar:
    """The acceptance bar a checkpoint must meet."""

    success_rate: float = 0.99
    final_rms_p95_mm: float = 0.5
    median_steps: float = 6.0

    def met(self, summary: dict) -> bool:
        p95 = summary["final_rms_mm"]["p95"]
        return (
            summary["success_rate"] >= self.success_rate
            and p95 is not None and p95 <= self.final_rms_p95_mm
            and summary["steps"]["median"] <= self.median_steps
        )


def _score(summary: dict) -> tuple:
    """Higher is better: success first, then fewer steps, then lower RMS."""
    return (summary["success_rate"], -summary["steps"]["median"], -(summary["final_rms_mm"]["p95"] or 1e9))


@dataclass
class TrainResult:
    out: Path
    policy_path: Path
    best_step: int
    best_summary: dict
    first_bar_step: int | None
    first_bar_seconds: float | None
    wall_seconds: float
    curves: list[dict] = field(default_factory=list)


class PolicyEvalCallback(BaseCallback):
    """Evaluates the deterministic policy every `every` steps; keeps the best as policy.pt."""

    def __init__(self, make_policy, eval_env: OrbitEnv, out: Path, every: int, episodes: int, bar: Bar, stop_at_bar: bool):
        super().__init__()
        self.make_policy, self.eval_env, self.out = make_policy, eval_env, out
        self.every, self.episodes, self.bar, self.stop_at_bar = every, episodes, bar, stop_at_bar
        self.curves: list[dict] = []
        self.best: tuple | None = None
        self.best_step = 0
        self.best_summary: dict = {}
        self.first_bar: tuple[int, float] | None = None
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every:
            return True
        policy = self.make_policy(self.num_timesteps)
        eps = [run_episode(self.eval_env, policy, EVAL_SEED_BASE + i) for i in range(self.episodes)]
        summary = summarise(eps)
        elapsed = time.perf_counter() - self.start
        self.curves.append({"step": self.num_timesteps, "wall_s": round(elapsed, 1), **summary})
        for key, value in (
            ("eval/success_rate", summary["success_rate"]),
            ("eval/median_steps", summary["steps"]["median"]),
            ("eval/final_rms_p95_mm", summary["final_rms_mm"]["p95"] or np.nan),
        ):
            self.logger.record(key, value)
        policy.save(self.out / "checkpoints" / f"step_{self.num_timesteps:07d}.pt")
        if self.best is None or _score(summary) > self.best:
            self.best, self.best_step, self.best_summary = _score(summary), self.num_timesteps, summary
            policy.save(self.out / "policy.pt")
        log.info("step %d: %s", self.num_timesteps, summary)
        if self.bar.met(summary) and self.first_bar is None:
            self.first_bar = (self.num_timesteps, elapsed)
            if self.stop_at_bar:
                return False
        return True


def orbit_metadata(lattice: Lattice, error_model: ErrorModel, config: OrbitTaskConfig, arch: str, training: dict) -> dict:
    n = lattice.n_readings
    return {
        "task": "orbit",
        "arch": arch,
        "lattice": lattice.fingerprint(),
        "error_model": error_model.model_dump(),
        "observation": {
            "size": 3 * n,
            "layout": "[dB_{t-1}, dB_t, B_t], each over readings in mm",
            "readings": lattice.reading_names,
        },
        "action": {"size": lattice.n_correctors, "scale": config.action_scale, "unit": "simulator units per step"},
        "task_config": config.__dict__,
        "training": training,
    }


def train_orbit(
    lattice: Lattice,
    error_model: ErrorModel,
    steps: int,
    seed: int,
    out: Path,
    arch: str = "tbsac",
    eval_error_model: ErrorModel | None = None,
    eval_every: int = 1000,
    eval_episodes: int = 100,
    config: OrbitTaskConfig | None = None,
    progress: bool = True,
    stop_at_bar: bool = False,
) -> TrainResult:
    """Train an orbit-correction agent; writes checkpoints, TensorBoard logs and policy.pt."""
    torch.set_num_threads(1)  # two threads on two busy cores made SAC up to 100x slower
    config = config or OrbitTaskConfig()
    out.mkdir(parents=True, exist_ok=True)
    env = OrbitEnv(lattice, error_model, config, plant=OrbitSimPlant(lattice, error_model))
    env.reset(seed=seed)
    eval_model = eval_error_model or error_model
    eval_env = OrbitEnv(lattice, eval_model, config)
    model = make_sac(env, arch=arch, seed=seed, tensorboard_log=str(out / "tensorboard"))
    training = {"steps": steps, "seed": seed, "errors": error_model.name, "eval_errors": eval_model.name}

    def make_policy(step: int) -> Policy:
        meta = orbit_metadata(lattice, error_model, config, arch, dict(training, checkpoint_step=step))
        return Policy.from_sac(model.policy, meta)

    callback = PolicyEvalCallback(make_policy, eval_env, out, eval_every, eval_episodes, Bar(), stop_at_bar)
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=callback, progress_bar=progress, tb_log_name="sac")
    wall = time.perf_counter() - start
    model.save(out / "sac_model.zip")
    result = TrainResult(
        out=out,
        policy_path=out / "policy.pt",
        best_step=callback.best_step,
        best_summary=callback.best_summary,
        first_bar_step=callback.first_bar[0] if callback.first_bar else None,
        first_bar_seconds=round(callback.first_bar[1], 1) if callback.first_bar else None,
        wall_seconds=round(wall, 1),
        curves=callback.curves,
    )
    (out / "training.json").write_text(json.dumps({
        "lattice": lattice.name, "errors": error_model.name, "eval_errors": eval_model.name,
        "arch": arch, "steps": steps, "seed": seed, "best_step": result.best_step,
        "best_summary": result.best_summary, "first_bar_step": result.first_bar_step,
        "first_bar_seconds": result.first_bar_seconds, "wall_seconds": result.wall_seconds,
        "curves": result.curves,
    }, indent=2))
    return result
