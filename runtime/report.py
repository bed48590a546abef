"""The split benchmark's report: per-node rows, figures, warnings; table, CSV, JSON (null, never NaN), plot."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

__all__ = ["NodeRow", "Report", "receptive_field_min_bytes"]


@dataclass
class NodeRow:
    """One line of the table; times are medians in milliseconds."""

    name: str
    op: str
    window: bool  # a conv or pool (drawn in the plot)
    unsplit_ms: float
    split_ms: float  # compute + halo on the slowest rank
    halo_ms: float  # transfer + wait on that rank
    bytes: int  # sent by all ranks together, one pass
    bytes_min: int  # receptive-field brute force for this split


def _clean(value):
    """JSON has no NaN or infinity: such figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:9.3f} ms"


@dataclass
class Report:
    """The benchmark's result: what ``--json`` writes and the table prints.  None: not measured (see notes)."""

    net: str
    size: int
    batch: int
    ranks: int
    weights: list
    threads_per_rank: int
    repeat: int
    unsplit_ms: float  # split part, one rank, one thread per rank's count, through the executor
    unsplit_torch_ms: float  # the whole model, plain torch, same threads
    all_cores_threads: int
    unsplit_all_cores_ms: float  # split part, one process with every core the split uses
    torch_all_cores_ms: float  # the whole model, plain torch, every core the split uses
    split_ms: float
    bound_ms: Optional[float]
    efficiency: Optional[float]
    speedup: float  # unsplit_ms / split_ms
    speedup_all_cores: float  # unsplit_all_cores_ms / split_ms: the fair one
    end_to_end_ms: float
    max_abs_error: float
    peak_rss_mb: list  # per rank
    unsplit_peak_rss_mb: Optional[float]
    notes: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    head_note: str = ""  # which head case applies (gather, split, a global pool's reduce) and why
    heads: list = field(default_factory=list)  # per timed head placement: head, end_to_end_ms, peak_rss_mb, ...
    max_relative_error: Optional[float] = None  # max_abs_error / max |unsplit output| (random nets: huge outputs)
    baseline_rss_mb: Optional[list] = None  # per rank, before any model: the interpreter, torch, the runtime
    exchange_free_ms: Optional[float] = None  # the split's own program with no message sent (every rank at once)
    exchange_efficiency: Optional[float] = None  # exchange_free / split, paired median: what the messages cost
    instructions: list = field(default_factory=list)  # per rank and kind: split_ms, no_messages_ms, bound_ms

    def table(self) -> str:
        head = (f"{'node':<28} {'op':<18} {'unsplit ms':>10} {'split ms':>9} {'halo ms':>8} {'bytes':>10} "
                f"{'min bytes':>10}")
        lines = [head, "-" * len(head)]
        for row in self.layers:
            lines.append(
                f"{row.name[:28]:<28} {row.op[:18]:<18} {row.unsplit_ms:>10.3f} {row.split_ms:>9.3f} "
                f"{row.halo_ms:>8.3f} {row.bytes:>10d} {row.bytes_min:>10d}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'sum':<28} {'':<18} {sum(r.unsplit_ms for r in self.layers):>10.3f} "
            f"{sum(r.split_ms for r in self.layers):>9.3f} {sum(r.halo_ms for r in self.layers):>8.3f} "
            f"{sum(r.bytes for r in self.layers):>10d} {sum(r.bytes_min for r in self.layers):>10d}"
        )
        bound = (f"{_ms(self.bound_ms)}   efficiency (bound / split, paired median) {self.efficiency:.3f}"
                 if self.bound_ms is not None else "n/a (see note)")
        lines += [
            "",
            f"net {self.net}, input {self.batch}x{self.size}x{self.size}, {self.ranks} ranks "
            f"(weights {self.weights}), {self.threads_per_rank} thread(s) per rank, median of {self.repeat}",
            f"split part, unsplit, 1 process x {self.threads_per_rank} thread(s): {_ms(self.unsplit_ms)}"
            f"   (whole model, plain torch: {self.unsplit_torch_ms:.3f} ms)",
            f"split part, unsplit, 1 process x {self.all_cores_threads} thread(s): {_ms(self.unsplit_all_cores_ms)}"
            f"   (whole model, plain torch: {self.torch_all_cores_ms:.3f} ms)",
            f"split part, split over {self.ranks} ranks         : {_ms(self.split_ms)}"
            f"   speedup {self.speedup:.2f}x vs 1 thread, {self.speedup_all_cores:.2f}x vs all cores",
            f"bound: own rows only, no exchange     : {bound}",
            f"the split's program, no messages      : "
            + (f"{_ms(self.exchange_free_ms)}   exchange efficiency (no messages / split) "
               f"{self.exchange_efficiency:.3f}" if self.exchange_free_ms is not None else "n/a"),
            f"end to end (scatter+split+gather+head): {self.end_to_end_ms:.3f} ms",
            f"max |split - unsplit| of the net's output: {self.max_abs_error:.3g}"
            + (f" ({self.max_relative_error:.3g} of max |output|)" if self.max_relative_error is not None else ""),
            f"peak resident memory per rank (MB): {', '.join(f'{m:.0f}' for m in self.peak_rss_mb)}"
            + (f"   (unsplit model alone in one process: {self.unsplit_peak_rss_mb:.0f} MB)"
               if self.unsplit_peak_rss_mb is not None else ""),
        ]
        if self.head_note:
            lines.append(f"head: {self.head_note}")
        if len(self.heads) > 1 or any(h["head"] == "split" for h in self.heads):
            lines.append(f"{'head placement':<15} {'end to end ms':>13}   {'peak memory per rank (MB)':<26} "
                         f"{'Linear weights per rank (MB)':<29} max |error|")
            for h in self.heads:
                weights = (", ".join(f"{m:.0f}" for m in h["weight_mb_per_rank"]) if h["weight_mb_per_rank"]
                           else "all on rank 0")
                lines.append(f"{h['head']:<15} {h['end_to_end_ms']:>13.3f}   "
                             f"{', '.join(f'{m:.0f}' for m in h['peak_rss_mb']):<26} {weights:<29} "
                             f"{h['max_abs_error']:.3g}"
                             + (f"   split/gather {h['split_over_gather']:.3f} (paired median)"
                                if h.get("split_over_gather") is not None else ""))
            lines.append("(end to end: both placements alternated in every repetition; each peak read while the "
                         "other placement did not exist)")
            if self.baseline_rss_mb:
                lines.append(f"(of each peak, the interpreter with torch and the runtime before any model: "
                             f"{', '.join(f'{m:.0f}' for m in self.baseline_rss_mb)} MB per rank)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def instruction_table(self) -> str:
        """Per rank, milliseconds per pass by kind of instruction in the three split-part passes, and what the
        split spends beyond each: where its time goes that the bounds do not spend."""
        def ms(v):
            return f"{v:9.3f}" if v is not None else f"{'-':>9}"

        head = (f"{'rank':>4} {'instruction':<11} {'split':>9} {'no msgs':>9} {'bound':>9} "
                f"{'split-no msgs':>13} {'split-bound':>11}")
        lines = [head, "-" * len(head)]
        for r in self.instructions:
            split, free, bound = r["split_ms"], r["no_messages_ms"], r["bound_ms"]
            lines.append(f"{r['rank']:>4} {r['kind']:<11} {ms(split)} {ms(free)} {ms(bound)} "
                         f"{ms((split or 0.0) - (free or 0.0)):>13} {ms((split or 0.0) - (bound or 0.0)):>11}")
        lines.append("(ms per pass: each kind's instructions summed in a pass, median over passes; 'no msgs' is the "
                     "split's program with its messages left out, 'bound' each rank's rows as a whole image)")
        return "\n".join(lines)

    def to_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(_clean(asdict(self)), fh, indent=2, allow_nan=False)
            fh.write("\n")

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["node", "op", "unsplit_ms", "split_ms", "halo_ms", "bytes", "bytes_min"])
            for r in self.layers:
                writer.writerow([r.name, r.op, f"{r.unsplit_ms:.4f}", f"{r.split_ms:.4f}", f"{r.halo_ms:.4f}",
                                 r.bytes, r.bytes_min])
            writer.writerow(["TOTAL", "", f"{self.unsplit_ms:.4f}", f"{self.split_ms:.4f}",
                             f"{sum(r.halo_ms for r in self.layers):.4f}",
                             sum(r.bytes for r in self.layers), sum(r.bytes_min for r in self.layers)])

    def figure(self):
        """One pair of bars per conv-like node, in graph order, like the AFLKD paper's Fig. 10 (a Figure)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.layers if r.window]
        x = np.arange(len(rows))
        fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(rows)), 4.5))
        ax.bar(x - 0.2, [r.unsplit_ms for r in rows], 0.4, label="unsplit (1 process)", color="tab:blue")
        ax.bar(x + 0.2, [r.split_ms - r.halo_ms for r in rows], 0.4, label=f"split ({self.ranks} ranks): compute",
               color="tab:orange")
        # stacked on the compute, opaque: the legend's swatch is the colour the bars show
        ax.bar(x + 0.2, [r.halo_ms for r in rows], 0.4, bottom=[r.split_ms - r.halo_ms for r in rows],
               label="split: halo exchange", color="tab:brown")
        ax.set_xticks(x, [r.name for r in rows], rotation=70, fontsize=7 if len(rows) > 30 else 8)
        ax.set_ylabel("time per node (ms, median)")
        bound = f"bound {self.bound_ms:.1f} ms (efficiency {self.efficiency:.2f})" if self.bound_ms else "no bound"
        if self.exchange_free_ms is not None:
            bound += f", no messages {self.exchange_free_ms:.1f} ms ({self.exchange_efficiency:.2f})"
        ax.set_title(f"{self.net} {self.size}x{self.size}: unsplit {self.unsplit_ms:.1f} ms, split "
                     f"{self.split_ms:.1f} ms, {bound}", fontsize=10)
        ax.legend()
        fig.tight_layout()
        return fig

    def plot(self, path: str) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def receptive_field_min_bytes(graph, weights, batch: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes that must cross ranks, by the first window node reading each value, counted row by row.

    For each output row a rank owns, every input row a window tap touches is
    listed; the rows inside the image that the rank does not own must come
    from elsewhere.  Independent of the planner's range arithmetic.
    """
    from .geometry import split_rows

    out: dict[str, int] = {}
    for value in graph.nodes:
        readers = [c for c in graph.consumers(value.name) if c.role == "window"]
        if value.placement != "rows" or not readers:
            continue
        _, channels, height, width = value.shape
        rows_missing = 0
        for rank, own in enumerate(split_rows(height, weights)):
            touched = set()
            for c in readers:
                geometry, mine = c.window.height, split_rows(c.shape[2], weights)[rank]
                touched.update(o * geometry.stride - geometry.padding + geometry.dilation * k
                               for o in range(mine.start, mine.stop) for k in range(geometry.kernel))
            rows_missing += sum(1 for row in touched if 0 <= row < height and not own.start <= row < own.stop)
        if rows_missing:
            out[readers[0].name] = out.get(readers[0].name, 0) + rows_missing * channels * width * batch * itemsize
    return out
