"""Acoustic bubble position control as a registered task (``tbsac train bubble``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from core.config import ConfigError, load_preset_or_file, load_shipped_or_file, shipped_yaml_names
from core.plant import KnobSpec, ReadingSpec
from core.task import EpisodeResult, TaskDefinition, TaskEnv, concat_parts

from .baselines import LINEAR_LEVEL_BAR, GreedyOneStep, run_linear_theory
from .task import PRESETS, BubbleErrors, BubbleSetup, BubbleSimPlant, BubbleTask, BubbleTaskConfig, distance_metric

SETUP_DIR = resources.files("simulators.bubble") / "setups"
LINEAR_HORIZON = 1024  # linear theory is slow: it gets 8 episodes' worth of steps to reach the target
PLOTTED_EPISODES = 4


def method_summary(steps: np.ndarray, final: np.ndarray, failures: np.ndarray, horizon: int, episode_steps: int) -> dict:
    """Summary of one method; `steps` per episode, -1 where the target was not reached
    within `horizon` (counted as `horizon` in the percentiles: a lower bound)."""
    steps = np.asarray(steps)
    counted = np.where(steps > 0, steps, horizon).astype(float)
    return {
        "success_rate": round(float(np.mean((steps > 0) & (steps <= episode_steps))), 4),
        "steps_to_target": {"median": float(np.median(counted)), "p95": float(np.percentile(counted, 95)),
                            "horizon": horizon, "reached_within_horizon": round(float(np.mean(steps > 0)), 4)},
        # a failed episode (solver, bubble lost) has no final position: the median of the others
        "final_error": {"median": round(float(np.nanmedian(final)), 5) if np.isfinite(final).any() else None},
        "solver_failures": int(np.sum(failures)),
    }


def speedup(method_steps: np.ndarray, method_horizon: int, linear_steps: np.ndarray) -> dict:
    """Per-episode linear-theory steps / method steps, misses counted at each horizon."""
    m = np.where(method_steps > 0, method_steps, method_horizon).astype(float)
    lin = np.where(linear_steps > 0, linear_steps, LINEAR_HORIZON).astype(float)
    ratio = lin / m
    return {"median": round(float(np.median(ratio)), 2), "p5": round(float(np.percentile(ratio, 5)), 2),
            "of_medians": round(float(np.median(lin) / np.median(m)), 2)}


class BubbleDefinition(TaskDefinition):
    """A bubble moved to a target position by the two amplitudes of a dual-frequency standing wave."""

    name = "bubble"
    description = "acoustic bubble position control (two pressure amplitudes; imaged position, target)"
    metrics = (distance_metric(0.01),)
    default_arch = "mlp"
    architectures = ("mlp", "mlp-small")
    sac_overrides = {"buffer_size": 300_000, "learning_starts": 2000, "learning_rate": 3e-4}
    train_defaults = {"steps": 100_000, "eval_every": 5000, "eval_episodes": 20}
    baselines = ("linear", "ddpg", "greedy")
    default_baselines = ("linear", "ddpg")  # greedy: ~25 simulated intervals per decision, on request
    policy_baselines = {"ddpg": "ddpg"}  # method -> shipped policy <setup>-<suffix>.pt
    safety_defaults = {"max_steps": 128, "max_duration_s": 600.0, "max_excursion_steps": 2.0}
    sim_interlocks = [{"name": "solver_ok", "rule": "equals", "threshold": 1.0},
                      {"name": "in_view", "rule": "equals", "threshold": 1.0}]
    summary_keys = ("success_rate", "steps_to_target", "final_error", "solver_failures")
    scalars = {"eval/success_rate": ("success_rate",), "eval/steps_to_target": ("steps_to_target", "median")}
    eval_seed_base = 5_000_000
    safe_state_label = "zero drive amplitude"

    def safe_settings(self, knobs, start):
        return np.zeros(len(knobs))

    # -- setups ---------------------------------------------------------------------------
    def shipped_setups(self) -> list[str]:
        return shipped_yaml_names(SETUP_DIR)

    def load_setup(self, name_or_path) -> BubbleSetup:
        return load_shipped_or_file(BubbleSetup, SETUP_DIR, name_or_path, "bubble lab", "lab")

    def error_presets(self) -> list[str]:
        return sorted(PRESETS)

    def load_errors(self, name_or_path) -> BubbleErrors:
        return load_preset_or_file(BubbleErrors, PRESETS, name_or_path, "errors")

    def sim_plant(self, setup: BubbleSetup, errors: BubbleErrors) -> BubbleSimPlant:
        return BubbleSimPlant(setup, errors)

    def config_model(self) -> type:
        return BubbleTaskConfig

    def make_task(self, setup, knobs: list[KnobSpec], readings: list[ReadingSpec], config) -> BubbleTask:
        names = [r.name for r in readings]
        if names[:2] != ["position", "target"]:
            raise ConfigError(f"bubble task: readings must be position, target (got {', '.join(names)})")
        return BubbleTask(config, float(knobs[0].upper))

    def task_for_policy(self, knobs, readings, metadata):
        config = BubbleTaskConfig.model_validate(metadata.get("task_config", {}))
        return self.make_task(None, knobs, readings, config)

    def policy_metadata(self, setup: BubbleSetup, errors, config, task: BubbleTask) -> dict:
        return {"lattice": {"name": setup.name, "r0_um": setup.r0_um, "f1_hz": setup.f1_hz, "f2_hz": setup.f2_hz,
                            "max_amplitude_bar": setup.max_amplitude_bar},
                "observation": {"size": int(task.observation_space.shape[0]),
                                "layout": "target, position, 2 previous positions, 2 changes, distance"},
                "action": {"size": 2, "unit": "fraction of the amplitude range"}}

    def check_policy(self, metadata: dict, setup: BubbleSetup) -> str | None:
        trained = metadata.get("lattice", {})
        mine = {"f1_hz": setup.f1_hz, "f2_hz": setup.f2_hz, "max_amplitude_bar": setup.max_amplitude_bar}
        differ = [k for k, v in mine.items() if trained.get(k) != v]
        if differ:
            return (f"field 'metadata.lattice': policy was trained for {', '.join(f'{k}={trained.get(k)}' for k in differ)}, "
                    f"lab {setup.name} has {', '.join(f'{k}={mine[k]}' for k in differ)}")
        return None

    # -- evaluation ----------------------------------------------------------------------
    @staticmethod
    def _steps(e: EpisodeResult) -> int:
        return int(e.steps) if e.info.get("success") else -1

    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        horizon = context.get("max_steps", BubbleTaskConfig().max_steps)
        steps = np.array([self._steps(e) for e in episodes])
        final = np.array([e.final.get("distance", np.nan) for e in episodes])
        failures = np.array([bool(e.info.get("solver_failure")) for e in episodes])
        return method_summary(steps, final, failures, horizon, horizon)

    def score(self, summary: dict) -> tuple:
        return (summary["success_rate"], -summary["steps_to_target"]["median"])

    def bar_met(self, summary: dict) -> bool:
        return summary["success_rate"] >= 0.95  # the speed bar is relative to linear theory (benchmarks/bubble.py)

    def _policy_records(self, setup, errors, agent, seeds, max_steps: int) -> list[dict]:
        """Per episode of a policy (or step-wise controller): steps to target (-1: missed),
        final distance, solver failure, and for the first few the trajectory to plot."""
        plant = BubbleSimPlant(setup, errors)
        task = self.task_for_policy(plant.knobs, plant.readings, agent.metadata)
        env = TaskEnv(plant, task)
        records = []
        for i, s in enumerate(seeds):
            e = self.run_evaluation_episode(env, agent, s, max_steps)
            records.append({"steps": self._steps(e), "final": e.final.get("distance", np.nan),
                            "failure": bool(e.info.get("solver_failure")),
                            "plot": {"target": plant.target, "position": list(plant.positions),
                                     "amplitudes": list(plant.amplitudes)} if i < PLOTTED_EPISODES else None})
        return records

    def evaluate_part(self, setup: BubbleSetup, errors: BubbleErrors, agent, seeds, methods, budget=None,
                      others: dict | None = None):
        """Per method, each bubble's record on bubbles `seeds` (each bubble is integrated on its
        own, also in the linear-theory batch, so parts merge into the serial numbers)."""
        config = BubbleTaskConfig()
        max_steps = config.max_steps if budget is None else budget
        records: dict[str, list] = {}
        if agent is not None:
            records["agent"] = self._policy_records(setup, errors, agent, seeds, max_steps)
        for name, other in (others or {}).items():
            if name in methods:
                records[name] = self._policy_records(setup, errors, other, seeds, max_steps)
        if "greedy" in methods:
            greedy = GreedyOneStep(setup.r0_um * 1e-6, setup.drive, amplitude_max_bar=setup.max_amplitude_bar)
            records["greedy"] = self._policy_records(setup, errors, greedy, seeds, max_steps)
        if "linear" in methods:
            plant = BubbleSimPlant(setup, errors)
            draws = []
            for s in seeds:
                plant.reset(s)
                draws.append((plant.r0_m, plant.positions[0], plant.target, plant.scale))
            r0, starts, targets, scales = map(np.array, zip(*draws))
            lin = run_linear_theory(r0, starts, targets, scales, setup.r0_um * 1e-6, LINEAR_HORIZON, config.tolerance,
                                    drive=setup.drive, record=PLOTTED_EPISODES)
            records["linear"] = [
                {"steps": int(lin["steps"][i]), "final": float(lin["final_distance"][i]),
                 "failure": bool(lin["solver_failures"][i]),
                 "plot": {"target": float(targets[i]), "position": lin["trajectories"][i]} if i < len(lin["trajectories"]) else None}
                for i in range(len(targets))]
        return records

    def merge_evaluation(self, setup: BubbleSetup, errors: BubbleErrors, agent, parts, seed, methods, budget=None):
        max_steps = BubbleTaskConfig().max_steps if budget is None else budget
        records = concat_parts(parts)
        results, steps = {}, {}
        for name, rows in records.items():
            steps[name] = np.array([r["steps"] for r in rows])
            horizon = LINEAR_HORIZON if name == "linear" else max_steps
            results[name] = method_summary(steps[name], np.array([r["final"] for r in rows]),
                                           np.array([r["failure"] for r in rows]), horizon, max_steps)
        if "linear" in results:
            results["linear"]["level_bar"] = LINEAR_LEVEL_BAR
            for name in results:
                if name != "linear":
                    results[name]["speedup_vs_linear"] = speedup(steps[name], max_steps, steps["linear"])
        episodes = len(next(iter(records.values()))) if records else 0
        summary = {"task": self.name, "lattice": setup.name, "errors": errors.name, "episodes": episodes, "seed": seed,
                   "results": results}
        runs = {name: [r["plot"] for r in rows if r["plot"] is not None][:PLOTTED_EPISODES] for name, rows in records.items()}
        return summary, runs

    def results_table(self, summary: dict):
        columns = ["method", "success", "steps median", "steps p95", "final error median", "solver failures",
                   "speed-up vs linear (median)"]
        rows = []
        for name, r in summary["results"].items():
            s = r["steps_to_target"]
            rows.append([name, f"{r['success_rate']:.0%}", f"{s['median']:.0f}", f"{s['p95']:.0f}",
                         "-" if r["final_error"]["median"] is None else f"{r['final_error']['median']:.4f}", str(r["solver_failures"]),
                         f"{r['speedup_vs_linear']['median']:.1f}x" if "speedup_vs_linear" in r else "-"])
        return columns, rows

    def plot_evaluation(self, setup: BubbleSetup, runs: dict, path: Path, title: str) -> Path | None:
        from .evaluation import plot_bubble_evaluation

        return plot_bubble_evaluation(runs, path, title) if runs else None

    def panels(self, setup: BubbleSetup) -> list[dict]:
        return [{"kind": "series", "title": "Position and target", "readings": ["position", "target"], "overlay": True,
                 "value_title": "x / lambda0", "step_title": "control interval (10 acoustic cycles, 400 us)",
                 "caption": "imaged position against the target (x / wavelength of the base frequency)"},
                {"kind": "settings", "title": "Amplitudes", "step_title": "control interval",
                 "caption": "pressure amplitudes, 25 kHz (P1) and 50 kHz (P2)"}]

    def wiring(self, setup: BubbleSetup, knobs: list[KnobSpec]) -> tuple[list[float], str]:
        return [1.0] * len(knobs), "bar"
