"""The crop evaluation's figure: biomass and soil mineral N over one season per method,
with the applications marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_crop_evaluation(runs: dict, path: Path, title: str) -> Path:
    """PNG at `path`; `runs[method]` is a :class:`~simulators.crop.baselines.SeasonRun`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    for (name, run), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        days = np.arange(len(run.trace))
        label = f"{name}: {run.grain_kg_ha:.0f} kg/ha, {run.n_applied_kg_ha:.0f} kg N, {run.profit_usd_ha:.0f} $/ha"
        top.plot(days, [s["biomass_kg_ha"] for s in run.trace], color=colour, label=label)
        bottom.plot(days, [s["soil_n_kg_ha"] for s in run.trace], color=colour, label=name)
        applied = [(d, dose) for d, dose in enumerate(run.doses, start=1) if dose > 0]
        for day, dose in applied:
            bottom.annotate("", (day, 0), (day, dose), arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.7})
        if applied:
            bottom.scatter(*zip(*applied), color=colour, marker="v", s=25)
    top.set_ylabel("above-ground biomass (kg/ha)")
    top.legend(fontsize=8)
    bottom.set_ylabel("soil mineral N (kg N/ha)\nmarkers: doses (kg N/ha)")
    bottom.set_xlabel("days since sowing")
    top.set_title(f"{title}: one season per method")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
