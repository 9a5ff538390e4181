"""The bubble evaluation's figure: position against time for a few targets, per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MS_PER_STEP = 0.4  # one control interval: 10 cycles of 25 kHz


def plot_bubble_evaluation(runs: dict, path: Path, title: str) -> Path:
    """PNG at `path`; `runs[method]` lists episodes with ``target`` and ``position`` (x / lambda0 per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(r) for r in runs.values())
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), constrained_layout=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        target = None
        for name, episodes in runs.items():
            if i < len(episodes):
                pos = np.asarray(episodes[i]["position"])
                ax.plot(np.arange(len(pos)) * MS_PER_STEP, pos, label=f"{name} ({len(pos) - 1} steps)")
                target = episodes[i]["target"]
        if target is not None:
            ax.axhspan(target - 0.01, target + 0.01, color="green", alpha=0.15, label="target +- 0.01")
        ax.set_ylabel("x / lambda0")
        ax.set_xlabel("time (ms)")
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"{title}: position against time")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
