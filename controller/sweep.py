"""Training sweeps on Ray Tune: setups x error presets x seeds x hyperparameters.

A sweep file (YAML) names one task and what to vary; every trial trains and evaluates
through the same code as ``tbsac train`` and ``tbsac evaluate`` (:mod:`controller.api`)
and records itself in the store (training run with its curve, policy with its bytes,
evaluation), so a trial on another host of a cluster needs only the database. Ray Tune
schedules the trials: one CPU and a declared memory each, a failed trial retried once,
and one that fails again reported, never dropped.
"""

from __future__ import annotations

import itertools
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.config import ConfigError, load_yaml_model
from core.registry import get_task, task_names

from .agents import ALGORITHMS, SAC_DEFAULTS

# What a sweep may vary besides setups, presets and seeds: SB3's SAC settings, the agent
# (algorithm, risk weight for TQC) and the network.
HYPERPARAMETERS = (*SAC_DEFAULTS, "algorithm", "risk_weight", "arch")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SweepTraining(BaseModel):
    """How each trial trains (defaults: the task's, as ``tbsac train``)."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=100)
    eval_every: int | None = Field(None, ge=50)
    eval_episodes: int | None = Field(None, ge=1)
    eval_errors: str | None = None
    stop_at_bar: bool = False
    max_minutes: float | None = Field(None, gt=0)


class SweepEvaluation(BaseModel):
    """The evaluation of each trial's policy against the task's baselines (``tbsac evaluate``)."""

    model_config = ConfigDict(extra="forbid")
    episodes: int = Field(20, ge=1)
    seed: int = 1000
    errors: str = "test"
    methods: list[str] | None = None  # default: the task's baselines
    budget: int | None = Field(None, ge=2)


class SweepResources(BaseModel):
    """What one trial asks of Ray: CPUs and memory (GiB)."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, gt=0)
    memory_gb: float = Field(2.0, gt=0)


class SweepFile(BaseModel):
    """A sweep: the grid of trials and how each trains and is evaluated."""

    model_config = ConfigDict(extra="forbid")
    name: str
    task: str
    lattices: list[str] = Field(default_factory=list, description="setups; default the task's default setup")
    errors: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    hyperparameters: dict[str, list[Any]] = Field(default_factory=dict)
    train: SweepTraining = Field(default_factory=SweepTraining)
    evaluate: SweepEvaluation | None = None
    resources: SweepResources = Field(default_factory=SweepResources)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("letters, digits, '_', '.' and '-' only (it names directories and store rows)")
        return value

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown task {value!r}; expected one of {', '.join(task_names())}")
        return value

    @field_validator("hyperparameters")
    @classmethod
    def _hyperparameters(cls, value: dict[str, list]) -> dict[str, list]:
        for key, values in value.items():
            if key not in HYPERPARAMETERS:
                raise ValueError(f"unknown hyperparameter {key!r}; expected one of {', '.join(HYPERPARAMETERS)}")
            if not values:
                raise ValueError(f"{key}: give at least one value")
            if key == "algorithm" and set(values) - set(ALGORITHMS):
                raise ValueError(f"algorithm: expected values from {', '.join(ALGORITHMS)}")
        return value


@dataclass
class Trial:
    """One point of the grid."""

    name: str
    lattice: str | None
    errors: str
    seed: int
    hyperparameters: dict = field(default_factory=dict)


def load_sweep(path: Path) -> SweepFile:
    """A sweep file, validated (ConfigError naming the file and field); setups and presets are
    resolved so that a typo fails here, before Ray starts."""
    sweep = load_yaml_model(SweepFile, Path(path))
    # Trials run in their own directories (Ray Tune changes into them): files named
    # relative to here become absolute paths.
    sweep.lattices = [str(Path(v).resolve()) if Path(v).is_file() else v for v in sweep.lattices]
    sweep.errors = [str(Path(v).resolve()) if Path(v).is_file() else v for v in sweep.errors]
    definition = get_task(sweep.task)
    for lattice in sweep.lattices:
        definition.load_setup(lattice)
    for preset in {*sweep.errors, *([sweep.train.eval_errors] if sweep.train.eval_errors else []),
                   *([sweep.evaluate.errors] if sweep.evaluate else [])}:
        definition.load_errors(preset)
    arches = sweep.hyperparameters.get("arch", [])
    if set(arches) - set(definition.architectures):
        raise ConfigError(f"{path}: hyperparameters.arch: task {sweep.task} has {', '.join(definition.architectures)}")
    if sweep.evaluate and sweep.evaluate.methods:
        unknown = set(sweep.evaluate.methods) - set(definition.baselines)
        if unknown:
            raise ConfigError(f"{path}: evaluate.methods: unknown {sorted(unknown)}; task {sweep.task} has "
                              f"{', '.join(definition.baselines) or 'no baselines'}")
    return sweep


def trials(sweep: SweepFile) -> list[Trial]:
    """The grid, in a stable order: lattice, errors, hyperparameters, then seed."""
    keys = list(sweep.hyperparameters)
    grid = list(itertools.product(*(sweep.hyperparameters[k] for k in keys))) or [()]
    out = []
    for lattice in sweep.lattices or [None]:
        for errors in sweep.errors:
            for values in grid:
                for seed in sweep.seeds:
                    hyper = dict(zip(keys, values))
                    label = "-".join([Path(lattice).stem if lattice else "default", Path(errors).stem,
                                      *(f"{k}={v}" for k, v in hyper.items()), f"seed{seed}"])
                    out.append(Trial(f"{len(out):03d}-{label}"[:120], lattice, errors, seed, hyper))
    return out


def run_trial(config: dict) -> None:
    """A Ray Tune trainable: trains (``api.train``) and evaluates (``api.evaluate``) one trial,
    reporting each periodic evaluation to Tune; the store records everything."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    # The sweep's store reaches the trial as TBSAC_DATABASE_URL in Ray's runtime environment
    # (not in the trial's config, which Tune writes to disk: a URL may carry a password).
    from . import api

    sweep, trial = config["sweep"], config["trial"]
    hyper = dict(trial["hyperparameters"])
    arch = hyper.pop("arch", None)
    training = sweep["train"]

    def report(row: dict, scalars: dict) -> None:
        tune.report({"step": row["step"], "wall_s": row["wall_s"],
                     **{k: float(v) for k, v in scalars.items() if isinstance(v, (int, float))}})

    out = Path(config["out"]) / trial["name"]
    result = api.train(sweep["task"], trial["lattice"], trial["errors"], training["eval_errors"], training["steps"],
                       trial["seed"], out, arch, training["eval_every"], training["eval_episodes"], training["stop_at_bar"],
                       hyper or None, progress=False, max_minutes=training["max_minutes"], on_evaluation=report,
                       sweep=sweep["name"], trial=trial["name"])
    final = {"step": result.curves[-1]["step"] if result.curves else 0, "training_run_id": result.run_id,
             "policy_id": result.policy_id, "bar_met": result.first_bar_step is not None, "done": 1}
    if sweep["evaluate"]:
        ev = sweep["evaluate"]
        methods = tuple(ev["methods"]) if ev["methods"] is not None else None
        evaluation = api.evaluate(sweep["task"], trial["lattice"], str(result.policy_path), ev["episodes"], ev["seed"],
                                  ev["errors"], methods, ev["budget"])
        final["evaluation_id"] = evaluation.evaluation_id
    tune.report(final)


@dataclass
class TrialOutcome:
    """What a sweep reports per trial."""

    trial: Trial
    status: str  # completed or failed
    metrics: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    outcomes: list[TrialOutcome]
    wall_seconds: float
    storage: Path

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.status != "completed"]


# Module state: Tune pickles its callbacks, not a console. Through Ray Client the callback
# runs on the cluster, where this stays the default: stderr, forwarded to the submitter's.
_progress_sink: list[Callable[[str], None]] = [lambda line: print(line, file=sys.stderr, flush=True)]


def _progress(line: str) -> None:
    _progress_sink[0](line)


def _progress_callback():
    from ray import tune

    class Progress(tune.Callback):
        """One line per periodic evaluation, retry and failure, as they happen."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("done"):
                return
            values = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if "/" in k and isinstance(v, float))
            _progress(f"{trial.config['trial']['name']}: step {result.get('step')} ({result.get('wall_s')} s) {values}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            _progress(f"{trial.config['trial']['name']}: done")

        def on_trial_recover(self, iteration, trials, trial, **info):
            _progress(f"{trial.config['trial']['name']}: FAILED ({_error_line(trial.error_file)}); retrying once")

        def on_trial_error(self, iteration, trials, trial, **info):
            _progress(f"{trial.config['trial']['name']}: FAILED again ({_error_line(trial.error_file)})")

    return Progress()


def _last_line(text: str) -> str:
    """The exception line of a Ray error text (its last non-empty line), at most 300 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _error_line(error_file: str | None) -> str:
    """The exception line of a Ray error file."""
    try:
        return _last_line(Path(error_file).read_text())
    except (OSError, TypeError):
        return "no error file"


def run_sweep(sweep: SweepFile, out: Path, store_url: str, address: str | None = None, max_concurrent: int | None = None,
              on_progress: Callable[[str], None] = print) -> SweepResult:
    """Run every trial of `sweep` on Ray Tune (local Ray, or the cluster at `address`)."""
    from .cluster import ray_runtime

    grid = trials(sweep)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _progress_sink[0] = on_progress
    with ray_runtime(address, env={"TBSAC_DATABASE_URL": store_url}):
        from ray import tune

        trainable = tune.with_resources(run_trial, {"cpu": sweep.resources.cpus,
                                                    "memory": int(sweep.resources.memory_gb * 2**30)})
        space = {"sweep": sweep.model_dump(), "out": str(out),
                 "trial": tune.grid_search([t.__dict__ for t in grid])}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(out / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1), callbacks=[_progress_callback()]),
        )
        results = tuner.fit()
    by_name = {t.name: t for t in grid}
    outcomes = []
    for result in results:
        trial = by_name[result.config["trial"]["name"]]
        metrics = dict(result.metrics or {})
        if result.error is not None or not metrics.get("done"):
            outcomes.append(TrialOutcome(trial, "failed", metrics, _last_line(str(result.error or "no result reported"))))
        else:
            outcomes.append(TrialOutcome(trial, "completed", metrics))
    outcomes.sort(key=lambda o: o.trial.name)
    return SweepResult(sweep.name, outcomes, round(time.perf_counter() - start, 1), out / "ray" / sweep.name)
