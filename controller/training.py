"""Training TBSAC agents in simulation, with periodic evaluation and small policy files."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from core.config import ConfigError
from core.task import TaskDefinition, TaskEnv

from .agents import make_sac
from .policy import Policy
from .recording import finite_or_none

log = logging.getLogger(__name__)


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
    run_id: int | None = None  # the store's training run and policy (set by controller.api.train)
    policy_id: int | None = None


class PolicyEvalCallback(BaseCallback):
    """Evaluates the deterministic policy every `every` steps; keeps the best as policy.pt
    (with `keep_last`, the latest: for a task whose evaluation cannot tell its checkpoints
    apart, where the best scored is the luckiest, not the best).

    `evaluate(policy) -> summary`, `score(summary)` (higher is better) and `bar(summary)`
    (the acceptance bar is met) make it task-agnostic; `scalars` names the summary
    values logged to TensorBoard.
    """

    def __init__(self, make_policy, evaluate, score, bar, scalars: dict, out: Path, every: int, stop_at_bar: bool,
                 max_seconds: float | None = None, on_evaluation=None, keep_last: bool = False):
        super().__init__()
        self.keep_last = keep_last
        self.max_seconds, self.on_evaluation = max_seconds, on_evaluation
        self.make_policy, self.evaluate, self.score, self.bar, self.scalars = make_policy, evaluate, score, bar, scalars
        self.out, self.every, self.stop_at_bar = out, every, stop_at_bar
        self.curves: list[dict] = []
        self.best: tuple | None = None
        self.best_step = 0
        self.best_summary: dict = {}
        self.first_bar: tuple[int, float] | None = None
        self.evaluation_seconds = 0.0  # how long the last evaluation took (what to keep of the budget)
        self.start = time.perf_counter()

    def _on_step(self) -> bool:
        # The budget is checked every step, not only at evaluations (a crop season-level
        # step is a whole season and evaluations are 100 seasons apart): when what is left
        # would not fit the last evaluation's duration, the run evaluates now and stops.
        out_of_time = (self.max_seconds is not None
                       and time.perf_counter() - self.start + self.evaluation_seconds >= self.max_seconds)
        if self.num_timesteps % self.every and not out_of_time:
            return True
        began = time.perf_counter()
        policy = self.make_policy(self.num_timesteps)
        summary = self.evaluate(policy)
        elapsed = time.perf_counter() - self.start
        self.evaluation_seconds = time.perf_counter() - began
        self.curves.append({"step": self.num_timesteps, "wall_s": round(elapsed, 1), **summary})
        for key, value_of in self.scalars.items():
            value = value_of(summary)
            self.logger.record(key, np.nan if value is None else value)
        policy.metadata["evaluation"] = recorded_evaluation(summary, self.bar(summary))
        policy.save(self.out / "checkpoints" / f"step_{self.num_timesteps:07d}.pt")
        if self.keep_last or self.best is None or self.score(summary) > self.best:
            self.best, self.best_step, self.best_summary = self.score(summary), self.num_timesteps, summary
            policy.save(self.out / "policy.pt")
        log.info("step %d: %s", self.num_timesteps, summary)
        if self.on_evaluation:  # e.g. a sweep's live progress
            self.on_evaluation(self.curves[-1], {key: value_of(summary) for key, value_of in self.scalars.items()})
        if self.bar(summary) and self.first_bar is None:
            self.first_bar = (self.num_timesteps, elapsed)
            if self.stop_at_bar:
                return False
        if out_of_time or (self.max_seconds is not None and elapsed >= self.max_seconds):
            log.info("time budget of %.0f s used: stopping with the best checkpoint so far", self.max_seconds)
            return False
        return True


def recorded_evaluation(summary: dict, bar_met: bool) -> dict:
    """What a policy file keeps of its checkpoint's evaluation: plain JSON types (policy
    files load with torch's weights-only unpickler; the store keeps the metadata as JSON,
    which has no NaN: a non-finite number becomes None)."""
    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "item"):  # numpy scalars
            value = value.item()
        value = finite_or_none(value)
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return {"summary": plain(summary), "bar_met": bool(bar_met)}


# Fine-tuning from a trained policy: its actor, fresh critics that first learn its value
# while the actor is frozen, then only the actor's output layers learn, ten times slower
# than the critics, with a small fixed entropy weight (tuned automatically, the weight
# grows without bound while the frozen actor cannot raise its entropy; the unfrozen
# actor then turned random: every beam lost). Still weak, measured on a calibrated
# foreign cryomodule (README, "Bringing up a new machine"): once it learns, the actor
# degrades (whole actor at lr 1e-4, 3e-5 or 5e-6: beam lost; output layers only: final
# RMS ~2-4 mm), so a fine-tuning run returns its warm-up checkpoint, the best scored.
FINE_TUNE_CRITIC_WARMUP = 3000
FINE_TUNE_OVERRIDES = {"learning_starts": 1000, "ent_coef": 0.01, "learning_rate": 1e-4, "actor_lr_factor": 0.1}
FINE_TUNE_LAYERS = ("mu.", "log_std.")  # the actor's output layers; its trend features stay


class FrozenActorWarmup(BaseCallback):
    """Keeps the actor's weights fixed for the first `steps` environment steps; after
    them only the parameters whose names start with one of `tune` learn (all if empty)."""

    def __init__(self, steps: int, tune: tuple[str, ...] = ()):
        super().__init__()
        self.steps, self.tune = steps, tune

    def _set(self, warm: bool) -> None:
        for name, p in self.model.policy.actor.named_parameters():
            p.requires_grad_(warm and (not self.tune or name.startswith(self.tune)))

    def _on_training_start(self) -> None:
        self._set(False)

    def _on_step(self) -> bool:
        if self.num_timesteps == self.steps:
            self._set(True)
        return True

    def _on_training_end(self) -> None:
        for p in self.model.policy.actor.parameters():
            p.requires_grad_(True)


def _learn(model, callbacks, callback: PolicyEvalCallback, steps: int, out: Path, progress: bool, record: dict) -> TrainResult:
    """Run SAC with the evaluation callback; write sac_model.zip and training.json."""
    start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=callbacks, progress_bar=progress, tb_log_name="sac")
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


def _path(summary: dict, keys: tuple[str, ...]):
    """A value in a nested summary, e.g. ("steps", "median")."""
    for k in keys:
        summary = summary[k]
    return summary


def policy_metadata(definition: TaskDefinition, setup, errors, config, arch: str, training: dict) -> dict:
    """Everything a policy file records about how it was trained (the task fills in its layout)."""
    plant = definition.sim_plant(setup, errors)
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    # The task's own config: make_task may complete it from the setup (a battery's size,
    # the training days' price profile), and a policy must rebuild exactly that task.
    effective = getattr(task, "config", None)
    effective = effective if isinstance(effective, type(config)) else config
    return {"task": definition.name, "arch": arch, **definition.policy_metadata(setup, errors, config, task),
            "error_model": errors.model_dump(), "task_config": effective.model_dump(), "training": training}


# Overrides that shape the training loop or its environment, not the SAC/TQC model.
TRAINING_ONLY_OVERRIDES = ("frozen_actor_steps", "privileged_critic", "action_repeat", "paired_reference", "keep_last",
                           "eval_every")


def evaluation_interval(definition: TaskDefinition, overrides: dict) -> int:
    """Environment steps between checkpoint evaluations: the task's default unless its
    training overrides say otherwise (a task config may make one step a whole season)."""
    return int(overrides.get("eval_every", definition.train_defaults["eval_every"]))


def train(
    definition: TaskDefinition,
    setup,
    errors,
    steps: int,
    seed: int,
    out: Path,
    arch: str | None = None,
    eval_errors=None,
    eval_every: int | None = None,
    eval_episodes: int | None = None,
    config=None,
    progress: bool = True,
    stop_at_bar: bool = False,
    sac_overrides: dict | None = None,
    init_policy: Policy | None = None,
    max_seconds: float | None = None,
    on_evaluation=None,
) -> TrainResult:
    """Train an agent on any registered task; writes checkpoints, TensorBoard logs and policy.pt.

    The periodic evaluation runs the deterministic policy through the one episode loop
    on machines ``definition.eval_seed_base + i`` (never the documented test seeds) and
    keeps the checkpoint the task scores best. With `init_policy` (fine-tuning) the actor
    starts from that policy's weights and stays frozen while the fresh critics learn its
    value (``FINE_TUNE_CRITIC_WARMUP`` steps): an untrained critic would otherwise pull the
    actor away from what it knew. `on_evaluation(curve_row, scalars)` is called after each
    periodic evaluation.
    """
    torch.set_num_threads(1)  # two threads on two busy cores made SAC up to 100x slower
    arch = arch or definition.default_arch
    config = config or definition.config_model()()
    overrides = {**definition.sac_overrides, **definition.training_overrides(config), **(sac_overrides or {})}
    eval_every = eval_every or evaluation_interval(definition, overrides)
    eval_episodes = eval_episodes or definition.train_defaults["eval_episodes"]
    out.mkdir(parents=True, exist_ok=True)

    # An asymmetric actor-critic: the training environment adds what only the simulator
    # knows to the critics' observation; the actor (and every evaluation) reads the task's.
    privileged = bool(overrides.get("privileged_critic", False))
    # Frame skipping in training only: evaluations (and every deployed run) act each step.
    action_repeat = int(overrides.get("action_repeat", 1))
    # Rewards relative to the task's reference policy on the same episode (a twin plant):
    # training only, a variance reduction for critics that must see small effects.
    paired = bool(overrides.get("paired_reference", False))

    def environment(error_model, privileged: bool = False, action_repeat: int = 1, paired: bool = False) -> TaskEnv:
        def plant_and_task():
            plant = definition.sim_plant(setup, error_model)
            return plant, definition.make_task(setup, plant.knobs, plant.readings, config)

        return TaskEnv(*plant_and_task(), privileged, action_repeat, reference=plant_and_task() if paired else None)

    env = environment(errors, privileged, action_repeat, paired)
    if privileged and not env.privileged:
        raise ConfigError(f"privileged_critic: task {definition.name} has no privileged features for the critics")
    env.reset(seed=seed)
    eval_model = eval_errors or errors
    eval_env = environment(eval_model)
    seeds = [definition.eval_seed_base + i for i in range(eval_episodes)]
    context = definition.evaluation_context(setup, eval_model, seeds)
    if init_policy is not None:
        if init_policy.metadata.get("arch") != arch:
            raise ConfigError(f"--init-from: policy has architecture {init_policy.metadata.get('arch')!r}, training uses {arch!r}")
        overrides = {**FINE_TUNE_OVERRIDES, **overrides}
    frozen_actor_steps = int(overrides.get("frozen_actor_steps", 0))
    if env.privileged:
        overrides = {**overrides, "actor_observation_size": int(env.task.observation_space.shape[0])}
    model = make_sac(env, arch=arch, seed=seed, tensorboard_log=str(out / "tensorboard"),
                     **{k: v for k, v in overrides.items() if k not in TRAINING_ONLY_OVERRIDES})
    callbacks = []
    if frozen_actor_steps and init_policy is None:  # e.g. a residual task's critics learn its base controller's value first
        callbacks.append(FrozenActorWarmup(frozen_actor_steps))
    if init_policy is not None:
        try:
            model.policy.actor.load_state_dict(init_policy.sac_policy.actor.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"--init-from: the policy's network does not fit this task's ({' '.join(str(exc).split())[:200]})") from None
        callbacks.append(FrozenActorWarmup(FINE_TUNE_CRITIC_WARMUP, FINE_TUNE_LAYERS))
    training = {"steps": steps, "seed": seed, "errors": errors.name, "eval_errors": eval_model.name,
                "eval_episodes": eval_episodes}
    if init_policy is not None:
        training["init_from"] = {"path": str(init_policy.path), "sha256": init_policy.sha256,
                                 "lattice": init_policy.metadata.get("lattice", {}).get("name")}
    if overrides:
        training["sac_overrides"] = overrides
    base_meta = policy_metadata(definition, setup, errors, config, arch, training)
    base_meta["algorithm"] = overrides.get("algorithm", "sac")

    def make_policy(step: int) -> Policy:
        return Policy.from_sac(model.policy, dict(base_meta, training=dict(training, checkpoint_step=step)))

    def evaluate(policy: Policy) -> dict:
        episodes = [definition.run_evaluation_episode(eval_env, policy, s) for s in seeds]
        return definition.summarise(episodes, context)

    scalars = {name: (lambda m, keys=keys: _path(m, keys)) for name, keys in definition.scalars.items()}
    callback = PolicyEvalCallback(make_policy, evaluate, definition.score, definition.bar_met, scalars, out, eval_every, stop_at_bar,
                                  max_seconds, on_evaluation, keep_last=bool(overrides.get("keep_last", False)))
    return _learn(model, CallbackList([*callbacks, callback]) if callbacks else callback, callback, steps, out, progress, {
        "task": definition.name, "lattice": setup.name, "errors": errors.name, "eval_errors": eval_model.name,
        "arch": arch, "seed": seed})
