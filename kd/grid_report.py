"""What a grid's CSV says: tables of mean ± std over seeds beside the paper's figure, orderings, plots.

Every function reads the rows :func:`kd.experiments.read_results` returns (strings,
as in the CSV); a row with no ``mode`` is from a grid before modes existed and
counts as ``static``.
"""
from __future__ import annotations

from collections import defaultdict
from statistics import mean, stdev
from typing import Optional

from .paper_tables import PAPER, TABLE_OF, paper_figure

__all__ = ["cell_stats", "markdown_table", "ordering_report", "plot_accuracy", "budget_comparison", "METHOD_ORDER",
           "combine_grids", "missing_paper_cells"]

METHOD_ORDER = ["baseline", "sslf", "kd", "ctkd", "aflkd"]


def _mode(row: dict) -> str:
    return row.get("mode") or "static"


def cell_stats(rows: list[dict], dataset: str, mode: Optional[str] = None, metric: str = "test_acc") -> dict:
    """``(method, net, size) -> (mean %, std %, seeds)`` of ``metric`` (std 0 for one seed); rows without it skipped."""
    acc = defaultdict(list)
    for r in rows:
        if r["dataset"] == dataset and (mode is None or _mode(r) == mode) and r.get(metric):
            acc[(r["method"], int(r["net"]), int(r["size"]))].append(100 * float(r[metric]))
    return {k: (mean(v), stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in acc.items()}


def _method_key(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _label(method: str, net: int) -> str:
    return f"{method.upper() if method != 'baseline' else 'Baseline'} (Edge network{net})"


def markdown_table(rows: list[dict], dataset: str, mode: Optional[str] = None) -> str:
    """Rows ``Method (Edge network k)``, columns sizes; test accuracy %, ``mean ± std`` over seeds.

    With more than one seed a cell reads ``mean ± std``; the paper's figure (its
    Table 2, 3 or 4) follows in brackets where it prints one.  ``mode`` keeps one
    training mode's rows (default: all rows, as grids with one mode have).
    """
    stats = cell_stats(rows, dataset, mode)
    sizes = sorted({k[2] for k in stats})
    lines = [f"| {dataset} | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in sorted({k[0] for k in stats}, key=_method_key):
        for net in sorted({k[1] for k in stats if k[0] == method}):
            cells = []
            for size in sizes:
                if (method, net, size) not in stats:
                    cells.append("–")
                    continue
                m, s, n = stats[(method, net, size)]
                text = f"{m:.1f} ± {s:.1f}" if n > 1 else f"{m:.1f}"
                paper = paper_figure(dataset, method, net, size)
                cells.append(text + (f" ({paper:g})" if paper is not None else ""))
            lines.append(f"| {_label(method, net)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_report(rows: list[dict], dataset: str, mode: Optional[str] = None) -> str:
    """Per (net, size): does AFLKD ≥ SSLF ≥ baseline hold on means, is a gap within one std, is AFLKD ≥ the paper's.

    A markdown table; "within 1 sd" names a gap smaller than the larger of the two
    cells' standard deviations (the ordering there is not told apart by these seeds).
    """
    stats = cell_stats(rows, dataset, mode)
    lines = ["| net | size | AFLKD ≥ SSLF | SSLF ≥ baseline | AFLKD vs paper's AFLKD |", "|---|---|---|---|---|"]
    for net, size in sorted({(k[1], k[2]) for k in stats}):
        def gap(a: str, b: str) -> str:
            if (a, net, size) not in stats or (b, net, size) not in stats:
                return "–"
            (ma, sa, _), (mb, sb, _) = stats[(a, net, size)], stats[(b, net, size)]
            verdict = "yes" if ma >= mb else "**no**"
            close = " (within 1 sd)" if abs(ma - mb) < max(sa, sb) else ""
            return f"{verdict}, {ma - mb:+.1f}{close}"

        paper = paper_figure(dataset, "aflkd", net, size)
        ours = stats.get(("aflkd", net, size))
        versus = "–" if paper is None or ours is None else (
            f"{'≥' if ours[0] >= paper else '**below**'} ({ours[0] - paper:+.1f})")
        lines.append(f"| {net} | {size} | {gap('aflkd', 'sslf')} | {gap('sslf', 'baseline')} | {versus} |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], dataset: str, path: str, title: Optional[str] = None,
                  mode: Optional[str] = None) -> None:
    """Accuracy against training-set size: one line per method and net, the mean with a ±1 sd band (Figs. 7-9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = cell_stats(rows, dataset, mode)
    fig, ax = plt.subplots(figsize=(9, 5))
    styles = {1: ":", 2: "--", 3: "-"}  # line style says the net, colour says the method
    colours = {"baseline": "tab:gray", "sslf": "tab:blue", "kd": "tab:green", "ctkd": "tab:purple", "aflkd": "tab:red"}
    seeds = max((v[2] for v in stats.values()), default=1)
    for method in sorted({k[0] for k in stats}, key=_method_key):
        for net in sorted({k[1] for k in stats if k[0] == method}):
            points = sorted((k[2], v) for k, v in stats.items() if k[0] == method and k[1] == net)
            x = [p[0] for p in points]
            m = [p[1][0] for p in points]
            s = [p[1][1] for p in points]
            ax.plot(x, m, styles.get(net, "-"), marker="o", color=colours.get(method), label=f"{method} (edge net {net})")
            if seeds > 1:
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                                color=colours.get(method), alpha=0.15, linewidth=0)
    ax.set_xlabel("training images")
    band = f", mean of {seeds} seeds ± 1 sd" if seeds > 1 else ""
    ax.set_ylabel(f"test accuracy (%){band}")
    ax.set_title(title or f"{dataset}: edge accuracy against training-set size (cf. the paper's {TABLE_OF.get(dataset, '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_comparison(rows: list[dict], doubled: list[dict], dataset: str) -> tuple[str, float]:
    """The convergence check: each cell's mean accuracy at a budget and at twice it.

    Judged on the validation slice where the rows have it (a schedule is a tuning
    choice, so it must not be chosen on test); the test change is shown beside.
    Returns a markdown table and the largest absolute change of the judged metric (points).
    """
    metric = "val_acc" if all(r.get("val_acc") for r in rows + doubled) else "test_acc"
    a, b = cell_stats(rows, dataset, metric=metric), cell_stats(doubled, dataset, metric=metric)
    ta, tb = cell_stats(rows, dataset), cell_stats(doubled, dataset)
    steps_a, steps_b = _steps(rows, dataset), _steps(doubled, dataset)
    name = "validation" if metric == "val_acc" else "test"
    lines = [f"| method (edge net) | size | steps | {name} % | steps ×2 | {name} % | change | test change |",
             "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for key in sorted(set(a) & set(b), key=lambda k: (k[1], k[2], _method_key(k[0]))):
        change = b[key][0] - a[key][0]
        worst = max(worst, abs(change))
        method, net, size = key
        lines.append(f"| {method} ({net}) | {size} | {steps_a.get(key, '')} | {a[key][0]:.1f} | "
                     f"{steps_b.get(key, '')} | {b[key][0]:.1f} | {change:+.1f} | {tb[key][0] - ta[key][0]:+.1f} |")
    return "\n".join(lines), worst


def _steps(rows: list[dict], dataset: str) -> dict:
    return {(r["method"], int(r["net"]), int(r["size"])): r.get("steps", "") for r in rows if r["dataset"] == dataset}


def combine_grids(grids: list[tuple[str, list[str], list[dict]]]) -> list[dict]:
    """One table's rows from several grids: ``(source, methods, rows)`` keeps ``rows`` of those methods, each tagged
    with ``source`` (a column).  Methods are trained at different budgets (the from-scratch baseline needs twice
    the epochs), so a table draws each from the grid that converged it.  A cell (dataset, net, size, method, seed,
    mode) found in two grids is refused (ValueError): which figure a table shows must never depend on order."""
    seen, out = {}, []
    for source, methods, rows in grids:
        for r in rows:
            if r["method"] not in methods:
                continue
            key = (r["dataset"], int(r["net"]), int(r["size"]), r["method"], int(r["seed"]), _mode(r))
            if key in seen:
                raise ValueError(f"cell {key} is in both {seen[key]} and {source}")
            seen[key] = source
            out.append({**r, "source": source})
    return out


def missing_paper_cells(rows: list[dict], dataset: str, methods: list[str], seeds: int,
                        mode: Optional[str] = None) -> list[tuple[str, int, int, int]]:
    """The paper's cells (its nets and sizes) of ``methods`` with fewer than ``seeds`` seeds in ``rows``:
    ``(method, net, size, seeds found)``, in the paper's order."""
    stats = cell_stats(rows, dataset, mode)
    cells = sorted({(net, method, size) for (d, method, net, size) in PAPER if d == dataset and method in methods},
                   key=lambda c: (c[0], _method_key(c[1]), c[2]))
    found = {c: stats.get((c[1], c[0], c[2]), (0.0, 0.0, 0))[2] for c in cells}
    return [(method, net, size, found[(net, method, size)]) for net, method, size in cells
            if found[(net, method, size)] < seeds]
