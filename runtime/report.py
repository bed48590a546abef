"""Per-layer timing records and the report built from them (table, CSV, JSON, Fig. 10 plot)."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["LayerClock", "LayerRow", "Report", "analytic_min_bytes"]


class LayerClock:
    """Seconds and bytes one rank spent per layer, summed over the passes it timed."""

    def __init__(self, layers: int) -> None:
        self.compute = np.zeros(layers)
        self.halo = np.zeros(layers)
        self.bytes = np.zeros(layers, dtype=np.int64)


@dataclass
class LayerRow:
    """One line of the table; times are medians in milliseconds."""

    name: str
    unsplit_ms: float
    split_ms: float  # compute + halo on the slowest rank
    halo_ms: float  # transfer + wait on that rank
    bytes: int  # sent by all ranks together, one pass
    bytes_min: int  # analytic minimum for this split


@dataclass
class Report:
    """The benchmark's result: what ``--json`` writes and the table prints."""

    net: str
    size: int
    batch: int
    ranks: int
    weights: list
    threads_per_rank: int
    repeat: int
    unsplit_ms: float
    unsplit_torch_ms: float
    split_ms: float
    bound_ms: float
    efficiency: float
    speedup: float
    end_to_end_ms: float
    max_abs_error: float
    layers: list = field(default_factory=list)

    def table(self) -> str:
        head = f"{'layer':<10} {'unsplit ms':>11} {'split ms':>9} {'halo ms':>8} {'bytes':>10} {'min bytes':>10}"
        lines = [head, "-" * len(head)]
        for row in self.layers:
            lines.append(
                f"{row.name:<10} {row.unsplit_ms:>11.3f} {row.split_ms:>9.3f} {row.halo_ms:>8.3f} "
                f"{row.bytes:>10d} {row.bytes_min:>10d}"
            )
        lines.append("-" * len(head))
        total_bytes = sum(r.bytes for r in self.layers)
        total_min = sum(r.bytes_min for r in self.layers)
        layer_sum = sum(r.split_ms for r in self.layers)
        lines.append(
            f"{'sum':<10} {sum(r.unsplit_ms for r in self.layers):>11.3f} {layer_sum:>9.3f} "
            f"{sum(r.halo_ms for r in self.layers):>8.3f} {total_bytes:>10d} {total_min:>10d}"
        )
        lines += [
            "",
            f"net {self.net}, input {self.batch}x{self.size}x{self.size}, {self.ranks} ranks "
            f"(weights {self.weights}), {self.threads_per_rank} thread(s) per rank, median of {self.repeat}",
            f"conv stack, unsplit on 1 rank      : {self.unsplit_ms:9.3f} ms"
            f"   (plain torch nn.Sequential: {self.unsplit_torch_ms:.3f} ms)",
            f"conv stack, split over {self.ranks} ranks   : {self.split_ms:9.3f} ms"
            f"   speedup {self.speedup:.2f}x",
            f"bound: own rows only, no exchange : {self.bound_ms:9.3f} ms"
            f"   efficiency (bound / split, paired median) {self.efficiency:.3f}",
            f"end to end (scatter+split+gather+head): {self.end_to_end_ms:.3f} ms",
            f"max |split - unsplit| of the net's output: {self.max_abs_error:.3g}",
        ]
        return "\n".join(lines)

    def to_json(self, path: str) -> None:
        data = asdict(self)
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "unsplit_ms", "split_ms", "halo_ms", "bytes", "bytes_min"])
            for r in self.layers:
                writer.writerow([r.name, f"{r.unsplit_ms:.4f}", f"{r.split_ms:.4f}", f"{r.halo_ms:.4f}", r.bytes, r.bytes_min])
            writer.writerow(["TOTAL", f"{self.unsplit_ms:.4f}", f"{self.split_ms:.4f}",
                             f"{sum(r.halo_ms for r in self.layers):.4f}",
                             sum(r.bytes for r in self.layers), sum(r.bytes_min for r in self.layers)])

    def plot(self, path: str) -> None:
        """Per-layer bars, unsplit vs split, like the AFLKD paper's Fig. 10."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [r.name for r in self.layers]
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(8, 0.42 * len(names)), 4.5))
        ax.bar(x - 0.2, [r.unsplit_ms for r in self.layers], 0.4, label="unsplit (1 rank)")
        ax.bar(x + 0.2, [r.split_ms for r in self.layers], 0.4, label=f"split ({self.ranks} ranks)")
        ax.bar(x + 0.2, [r.halo_ms for r in self.layers], 0.4, label="of which halo exchange", color="k", alpha=0.5)
        ax.set_xticks(x, names, rotation=70, fontsize=8)
        ax.set_ylabel("time per layer (ms, median)")
        ax.set_title(
            f"{self.net} {self.size}x{self.size}: unsplit {self.unsplit_ms:.1f} ms, split {self.split_ms:.1f} ms, "
            f"bound {self.bound_ms:.1f} ms (efficiency {self.efficiency:.2f})",
            fontsize=10,
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def analytic_min_bytes(plan_layer, batch: int, itemsize: int = 4) -> int:
    """Halo rows that must cross ranks x row bytes: rows each rank needs but does not own."""
    missing = 0
    for need, own in zip(plan_layer.needed, plan_layer.owned_in):
        missing += len(need) - len(need.intersect(own))
    return missing * plan_layer.row_bytes(batch, itemsize)
