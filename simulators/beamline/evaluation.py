"""Orbit correction: the agent and the baselines on the same machines, seeds and step limit.

Every method runs through the one episode loop (:func:`core.task.run_episode`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.task import EpisodeResult, start_drawn_machine
from core.task import run_episode as loop

from .baselines import BaselineController, DoNothing, SvdMeasured, SvdModel
from .errors import ErrorModel
from .lattice import Bpm, Lattice
from .plant import OrbitSimPlant
from .task import OrbitEnv, OrbitTaskConfig

METHODS = ("agent", "svd_model", "svd_measured", "nothing")


def run_episode(env: OrbitEnv, controller: BaselineController, seed: int) -> EpisodeResult:
    """Reset `env` to machine `seed` and let `controller` correct it."""
    start_drawn_machine(env.task, env.plant, seed)  # the machine the seed draws (one the task can start on)
    env.plant.reset(env.plant.drawn_seed)
    controller.begin()
    return loop(env.task, env.plant, controller.act, seed=seed)


def beam_lost(e: EpisodeResult) -> bool:
    return bool(e.info.get("beam_lost", False))


def rms_trace(e: EpisodeResult) -> list[float]:
    """Orbit RMS after the start (probe) and after every step, mm."""
    return [e.start["rms_mm"]] + [t["rms_mm"] for t in e.trace]


def summarise(episodes: list[EpisodeResult]) -> dict:
    """The JSON summary of one method over a set of episodes."""
    finals = np.array([e.final["rms_mm"] for e in episodes if not beam_lost(e)])
    steps = np.array([e.steps for e in episodes])

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 4) if len(a) else None

    return {
        "success_rate": round(float(np.mean([bool(e.info.get("success")) for e in episodes])), 4),
        "final_rms_mm": {"median": pct(finals, 50), "p95": pct(finals, 95)},
        "steps": {"median": pct(steps, 50), "p95": pct(steps, 95)},
        "initial_rms_mm": {"median": pct(np.array([e.initial["rms_mm"] for e in episodes]), 50)},
        "beam_lost": int(sum(beam_lost(e) for e in episodes)),
    }


def controllers_for(lattice: Lattice, agent, config: OrbitTaskConfig, methods=METHODS) -> dict:
    found: dict = {}
    if agent is not None:
        found["agent"] = agent
    makers = {"svd_model": lambda: SvdModel(lattice, config.action_scale),
              "svd_measured": lambda: SvdMeasured(lattice, config.action_scale),
              "nothing": lambda: DoNothing(lattice.n_correctors)}
    for name in methods:
        if name in makers:
            found[name] = makers[name]()
    return found


def orbit_runs(lattice: Lattice, error_model: ErrorModel, agent, seeds: range, config: OrbitTaskConfig | None = None,
               methods: tuple[str, ...] = METHODS) -> dict[str, list[EpisodeResult]]:
    """Every method's episodes on machines `seeds` (each depends only on its seed)."""
    config = config or OrbitTaskConfig()
    plant = OrbitSimPlant(lattice, error_model)
    env = OrbitEnv(lattice, error_model, config, plant=plant)
    return {name: [run_episode(env, controller, s) for s in seeds]
            for name, controller in controllers_for(lattice, agent, config, methods).items()}


def orbit_summary(lattice: Lattice, error_model: ErrorModel, seed: int, runs: dict[str, list[EpisodeResult]]) -> dict:
    """The `evaluate orbit` JSON for every method's episodes (possibly merged from workers)."""
    return {
        "task": "orbit",
        "lattice": lattice.name,
        "errors": error_model.name,
        "episodes": len(next(iter(runs.values()))) if runs else 0,
        "seed": seed,
        "results": {name: summarise(eps) for name, eps in runs.items()},
    }


def evaluate_orbit(
    lattice: Lattice,
    error_model: ErrorModel,
    agent,
    episodes: int,
    seed: int,
    config: OrbitTaskConfig | None = None,
    methods: tuple[str, ...] = METHODS,
) -> tuple[dict, dict[str, list[EpisodeResult]]]:
    """Run every method on machines ``seed .. seed + episodes - 1``.

    Returns the JSON-ready summary and the episodes per method (for plots).
    """
    runs = orbit_runs(lattice, error_model, agent, range(seed, seed + episodes), config, methods)
    return orbit_summary(lattice, error_model, seed, runs), runs


def bpm_positions(lattice: Lattice) -> np.ndarray:
    """Longitudinal position (m) of each BPM from the lattice entrance."""
    s, out = 0.0, []
    for e in lattice.elements:
        s += getattr(e, "length", 0.0)
        if isinstance(e, Bpm):
            out.append(s)
    return np.array(out)


def plot_orbit_evaluation(lattice: Lattice, runs: dict[str, list[EpisodeResult]], path: Path, title: str) -> Path:
    """Orbit before/after (first machine) and median RMS against step for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = bpm_positions(lattice)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    first = {name: eps[0] for name, eps in runs.items()}
    any_ep = next(iter(first.values()))
    for ax, plane, offset in ((axes[0], "x", 0), (axes[1], "y", 1)):
        ax.plot(s, any_ep.initial_readings[offset::2], "k--o", label="before")
        for name, ep in first.items():
            if name != "nothing":
                ax.plot(s, ep.final_readings[offset::2], "-o", label=f"after {name} ({ep.steps} steps)")
        ax.axhspan(-0.5, 0.5, color="green", alpha=0.1, label="±0.5 mm")
        ax.set_xlabel("position s (m)")
        ax.set_ylabel(f"{plane} (mm)")
        ax.set_title(f"{plane} orbit, machine seed {any_ep.seed}")
        ax.legend(fontsize=7)
    ax = axes[2]
    for name, eps in runs.items():
        traces = [rms_trace(e) for e in eps]
        longest = max(len(t) for t in traces)
        padded = np.array([t + [t[-1]] * (longest - len(t)) for t in traces])
        ax.plot(np.arange(longest), np.nanmedian(padded, axis=0), label=name)
    ax.axhline(0.5, color="green", ls=":", label="target 0.5 mm")
    ax.set_xlabel("step")
    ax.set_ylabel("median orbit RMS (mm)")
    ax.set_yscale("log")
    n_machines = len(next(iter(runs.values())))
    ax.set_title(f"RMS against step, {n_machines} machine{'s' if n_machines > 1 else ''}")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
