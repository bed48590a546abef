"""The serving plot: throughput and each rank's compute time per image, with re-plans and slowdowns marked."""
from __future__ import annotations

from typing import Sequence

__all__ = ["plot_serving"]


def plot_serving(report, path: str, slowdowns: Sequence = ()) -> None:
    """Two panels over the images of the run: images/s (moving window of 10) and busy ms per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report.images
    k = np.arange(len(rows))
    done = np.array([r[1] for r in rows])
    busy = np.array([r[4] for r in rows])
    window = 10
    rate = np.full(len(rows), np.nan)
    if len(rows) > window:
        rate[window:] = window / np.maximum(done[window:] - done[:-window], 1e-9)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(k, rate, color="black", lw=1)
    top.set_ylabel(f"images/s (last {window})")
    for r in range(busy.shape[1] if busy.ndim == 2 else 0):
        bottom.plot(k, busy[:, r], lw=0.8, label=f"rank {r}")
    bottom.set_ylabel("compute ms per image")
    bottom.set_xlabel("image of this run")
    for ax in (top, bottom):
        for s in report.switches:
            ax.axvline(s["at"], color="tab:green", ls="--", lw=1)
        for s in slowdowns:
            ax.axvline(s.after, color="tab:red", ls=":", lw=1)
    bottom.legend(fontsize=8, loc="upper left")
    top.set_title("serving: re-plans (green dashes), slowdowns (red dots)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
