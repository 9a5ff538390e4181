"""Evaluate the agent and the baselines on the same machines, seeds and step limit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulators.beamline.errors import ErrorModel
from simulators.beamline.lattice import Lattice, Bpm
from simulators.beamline.plant import OrbitSimPlant
from simulators.beamline.task import OrbitEnv, OrbitTaskConfig, rms

from .baselines import Controller, DoNothing, SvdMeasured, SvdModel

METHODS = ("agent", "svd_model", "svd_measured", "nothing")


@dataclass
class Episode:
    """One controller on one machine."""

    seed: int
    initial_rms_mm: float
    final_rms_mm: float
    steps: int
    success: bool
    beam_lost: bool
    rms_trace: list[float] = field(default_factory=list)
    initial_orbit: np.ndarray | None = None
    final_orbit: np.ndarray | None = None


def run_episode(env: OrbitEnv, controller: Controller, seed: int) -> Episode:
    """Reset `env` to machine `seed` and let `controller` correct it."""
    obs, info = env.reset(seed=seed)
    controller.begin()
    initial = env.task.initial_readings.copy()
    trace = [info["rms_mm"]]
    success = lost = False
    while True:
        obs, _, terminated, truncated, info = env.step(controller.act(obs))
        trace.append(info["rms_mm"])
        if terminated or truncated:
            success, lost = info["success"], info["beam_lost"]
            break
    final = env.task.readings
    return Episode(
        seed=seed,
        initial_rms_mm=float(rms(initial)),
        final_rms_mm=float("nan") if lost else float(rms(final)),
        steps=env.task.steps,
        success=bool(success),
        beam_lost=bool(lost),
        rms_trace=trace,
        initial_orbit=initial,
        final_orbit=final,
    )


def summarise(episodes: list[Episode]) -> dict:
    """The JSON summary of one method over a set of episodes."""
    finals = np.array([e.final_rms_mm for e in episodes if not e.beam_lost])
    steps = np.array([e.steps for e in episodes])

    def pct(a: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(a, q)), 4) if len(a) else None

    return {
        "success_rate": round(float(np.mean([e.success for e in episodes])), 4),
        "final_rms_mm": {"median": pct(finals, 50), "p95": pct(finals, 95)},
        "steps": {"median": pct(steps, 50), "p95": pct(steps, 95)},
        "initial_rms_mm": {"median": pct(np.array([e.initial_rms_mm for e in episodes]), 50)},
        "beam_lost": int(sum(e.beam_lost for e in episodes)),
    }


def controllers_for(lattice: Lattice, agent: Controller | None, config: OrbitTaskConfig) -> dict[str, Controller]:
    found: dict[str, Controller] = {}
    if agent is not None:
        found["agent"] = agent
    found["svd_model"] = SvdModel(lattice, config.action_scale)
    found["svd_measured"] = SvdMeasured(lattice, config.action_scale)
    found["nothing"] = DoNothing(lattice.n_correctors)
    return found


def evaluate_orbit(
    lattice: Lattice,
    error_model: ErrorModel,
    agent: Controller | None,
    episodes: int,
    seed: int,
    config: OrbitTaskConfig | None = None,
) -> tuple[dict, dict[str, list[Episode]]]:
    """Run every method on machines ``seed .. seed + episodes - 1``.

    Returns the JSON-ready summary and the episodes per method (for plots).
    """
    config = config or OrbitTaskConfig()
    plant = OrbitSimPlant(lattice, error_model)
    env = OrbitEnv(lattice, error_model, config, plant=plant)
    runs: dict[str, list[Episode]] = {}
    for name, controller in controllers_for(lattice, agent, config).items():
        runs[name] = [run_episode(env, controller, seed + i) for i in range(episodes)]
    summary = {
        "task": "orbit",
        "lattice": lattice.name,
        "errors": error_model.name,
        "episodes": episodes,
        "seed": seed,
        "results": {name: summarise(eps) for name, eps in runs.items()},
    }
    return summary, runs


def bpm_positions(lattice: Lattice) -> np.ndarray:
    """Longitudinal position (m) of each BPM from the lattice entrance."""
    s, out = 0.0, []
    for e in lattice.elements:
        s += getattr(e, "length", 0.0)
        if isinstance(e, Bpm):
            out.append(s)
    return np.array(out)


def plot_orbit_evaluation(lattice: Lattice, runs: dict[str, list[Episode]], path: Path, title: str) -> Path:
    """Orbit before/after (first machine) and median RMS against step for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = bpm_positions(lattice)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    first = {name: eps[0] for name, eps in runs.items()}
    any_ep = next(iter(first.values()))
    for ax, plane, offset in ((axes[0], "x", 0), (axes[1], "y", 1)):
        ax.plot(s, any_ep.initial_orbit[offset::2], "k--o", label="before")
        for name, ep in first.items():
            if name != "nothing":
                ax.plot(s, ep.final_orbit[offset::2], "-o", label=f"after {name} ({ep.steps} steps)")
        ax.axhspan(-0.5, 0.5, color="green", alpha=0.1, label="±0.5 mm")
        ax.set_xlabel("position s (m)")
        ax.set_ylabel(f"{plane} (mm)")
        ax.set_title(f"{plane} orbit, machine seed {any_ep.seed}")
        ax.legend(fontsize=7)
    ax = axes[2]
    for name, eps in runs.items():
        longest = max(len(e.rms_trace) for e in eps)
        padded = np.array([e.rms_trace + [e.rms_trace[-1]] * (longest - len(e.rms_trace)) for e in eps])
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
