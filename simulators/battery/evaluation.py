"""The battery evaluation's figure: one day's price, power and state of charge per method,
and the cumulative profit of every method over all evaluated days."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .model import PERIOD_H


def plot_battery_evaluation(runs: dict, path: Path, title: str, day: int = 0) -> Path:
    """PNG at `path`; `runs[method]` is a list of days with ``price``, ``power_mw``, ``soc`` and ``profit_eur``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 11), constrained_layout=True)
    hours = np.arange(96) * PERIOD_H
    first = next(iter(runs.values()))[day]
    axes[0].step(hours, first["price"], where="post", color="black")
    axes[0].set_ylabel("imbalance price (EUR/MWh)")
    axes[0].set_title(f"{title}: day {day}")
    for name, days in runs.items():
        d = days[day]
        axes[1].step(hours, d["power_mw"], where="post", label=name)
        axes[2].plot(np.arange(len(d["soc"])) * PERIOD_H, 100 * np.asarray(d["soc"]), label=name)
        daily = np.array([x["profit_eur"] for x in days])
        axes[3].plot(np.arange(1, len(daily) + 1), np.cumsum(daily), marker=".", label=name)
    axes[1].set_ylabel("power (MW, > 0 discharges)")
    axes[2].set_ylabel("state of charge (%)")
    for ax in axes[:3]:
        ax.set_xlabel("hour of the day")
        ax.set_xlim(0, 24)
    axes[3].set_xlabel("day")
    axes[3].set_ylabel("cumulative profit (EUR)")
    axes[3].set_title("cumulative profit by method")
    for ax in axes[1:]:
        ax.legend(fontsize=8, ncol=5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
