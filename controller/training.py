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
    """Evaluates the deterministic policy every `every` steps; keeps the best as policy.pt.

    `evaluate(policy) -> summary`, `score(summary)` (higher is better) and `bar(summary)`
    (the acceptance bar is met) make it task-agnostic; `scalars` names the summary
    values logged to TensorBoard.
    """

    def __init__(self, make_policy, evaluate, score, bar, scalars: dict, out: Path, every: int, stop_at_bar: bool):
        super().__init__()
        self.make_policy, self.evaluate, self.score, self.bar, self.scalars = make_policy, evaluate, score, bar, scalars
        self.out, self.every, self.stop_at_bar = out, every, stop_at_bar
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
        summary = self.evaluate(policy)
        elapsed = time.perf_counter() - self.start
        self.curves.append({"step": self.num_timesteps, "wall_s": round(elapsed, 1), **summary})
        for key, value_of in self.scalars.items():
            value = value_of(summary)
            self.logger.record(key, np.nan if value is None else value)
        policy.save(self.out / "checkpoints" / f"step_{self.num_timesteps:07d}.pt")
        if self.best is None or self.score(summary) > self.best:
            self.best, self.best_step, self.best_summary = self.score(summary), self.num_timesteps, summary
            policy.save(self.out / "policy.pt")
        log.info("step %d: %s", self.num_timesteps, summary)
        if self.bar(summary) and self.first_bar is None:
            self.first_bar = (self.num_timesteps, elapsed)
            if self.stop_at_bar:
                return False
        return True


def _learn(model, callback: PolicyEvalCallback, steps: int, out: Path, progress: bool, record: dict) -> TrainResult:
    """Run SAC with the evaluation callback; write sac_model.zip and training.json."""
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
        **record, "steps": steps, "best_step": result.best_step,
        "best_summary": result.best_summary, "first_bar_step": result.first_bar_step,
        "first_bar_seconds": result.first_bar_seconds, "wall_seconds": result.wall_seconds,
        "curves": result.curves,
    }, indent=2))
    return result


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

    bar = Bar()

    def evaluate(policy: Policy) -> dict:
        return summarise([run_episode(eval_env, policy, EVAL_SEED_BASE + i) for i in range(eval_episodes)])

    scalars = {
        "eval/success_rate": lambda m: m["success_rate"],
        "eval/median_steps": lambda m: m["steps"]["median"],
        "eval/final_rms_p95_mm": lambda m: m["final_rms_mm"]["p95"],
    }
    callback = PolicyEvalCallback(make_policy, evaluate, _score, bar.met, scalars, out, eval_every, stop_at_bar)
    return _learn(model, callback, steps, out, progress, {
        "lattice": lattice.name, "errors": error_model.name, "eval_errors": eval_model.name, "arch": arch, "seed": seed})


def rfq_metadata(lattice, error_model, config, arch: str, knobs, training: dict) -> dict:
    """Policy metadata for the RFQ transmission task (see :class:`TransmissionTask`)."""
    from simulators.injector.task import TransmissionTask

    task = TransmissionTask(knobs, lattice.beam.current_ma, config)
    return {
        "task": "rfq",
        "arch": arch,
        "lattice": {"name": lattice.name, "knob_names": lattice.knob_names},
        "error_model": error_model.model_dump(),
        "observation": {
            "size": task.observation_space.shape[0],
            "layout": "see simulators.injector.task.TransmissionTask",
            "readings": ["ACCT", "FC"],
            "nominal_current_ma": lattice.beam.current_ma,
        },
        "action": {"size": len(knobs), "step": [k.max_step for k in knobs], "unit": [k.unit for k in knobs]},
        "task_config": config.__dict__,
        "training": training,
    }


# Training-time evaluation injectors; far from the seeds documented for `evaluate rfq`.
RFQ_EVAL_SEED_BASE = 7_000_000


@dataclass
class RfqBar:
    """The RFQ acceptance bar: median final / best achievable and median steps to 85 %."""

    fraction_of_best: float = 0.95
    steps_to_85: float = 15.0

    def met(self, summary: dict) -> bool:
        steps = summary["steps_to_85"]["median"]
        return summary["fraction_of_best"]["median"] >= self.fraction_of_best and steps is not None and steps <= self.steps_to_85


def _rfq_score(summary: dict) -> tuple:
    steps = summary["steps_to_85"]["median"]
    return (summary["fraction_of_best"]["median"], -(steps if steps is not None else 1e9))


def train_rfq(
    lattice,
    error_model,
    steps: int,
    seed: int,
    out: Path,
    arch: str = "mlp",
    eval_error_model=None,
    eval_every: int = 5000,
    eval_episodes: int = 20,
    config=None,
    progress: bool = True,
    stop_at_bar: bool = False,
    sac_overrides: dict | None = None,
) -> TrainResult:
    """Train an RFQ transmission agent; writes checkpoints, TensorBoard logs and policy.pt."""
    from simulators.injector.task import TransmissionEnv, TransmissionTaskConfig

    from .rfq import RfqEpisode, best_achievable, run_agent, summarise_rfq

    torch.set_num_threads(1)
    config = config or TransmissionTaskConfig()
    out.mkdir(parents=True, exist_ok=True)
    env = TransmissionEnv(lattice, error_model, config)
    env.reset(seed=seed)
    eval_model = eval_error_model or error_model
    eval_env = TransmissionEnv(lattice, eval_model, config)
    machines = []
    for i in range(eval_episodes):
        eval_env.reset(seed=RFQ_EVAL_SEED_BASE + i)
        best = best_achievable(eval_env.plant.model, lattice, [eval_env.plant.read_knobs()])
        machines.append((RFQ_EVAL_SEED_BASE + i, eval_env.plant.true_transmission(), best))
    model = make_sac(env, arch=arch, seed=seed, tensorboard_log=str(out / "tensorboard"), **(sac_overrides or {}))
    training = {"steps": steps, "seed": seed, "errors": error_model.name, "eval_errors": eval_model.name,
                "sac_overrides": sac_overrides or {}}

    def make_policy(step: int) -> Policy:
        meta = rfq_metadata(lattice, error_model, config, arch, env.plant.knobs, dict(training, checkpoint_step=step))
        return Policy.from_sac(model.policy, meta)

    def evaluate(policy: Policy) -> dict:
        episodes = []
        for machine, initial, best in machines:
            eval_env.reset(seed=machine)
            trace = run_agent(eval_env, policy, config.max_steps)
            episodes.append(RfqEpisode(machine, initial, trace, trace[-1], max(best, *trace)))
        return summarise_rfq(episodes)

    scalars = {
        "eval/fraction_of_best_median": lambda m: m["fraction_of_best"]["median"],
        "eval/final_transmission_median": lambda m: m["final_transmission"]["median"],
        "eval/steps_to_85_median": lambda m: m["steps_to_85"]["median"],
    }
    callback = PolicyEvalCallback(make_policy, evaluate, _rfq_score, RfqBar().met, scalars, out, eval_every, stop_at_bar)
    return _learn(model, callback, steps, out, progress, {
        "task": "rfq", "lattice": lattice.name, "errors": error_model.name, "eval_errors": eval_model.name,
        "arch": arch, "seed": seed})
