"""The figures say what they show: legend swatches match their bars, the legend covers no bar, an axis that
does not start at 0 says so, and numbers on bars are explained (checked on the figures' artists)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402

from launch.schedule import figure as fig5  # noqa: E402
from runtime.report import NodeRow, Report  # noqa: E402


def legend_swatches_match_bars(ax):
    legend = ax.get_legend()
    handles = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}
    for container in ax.containers:
        label = container.get_label()
        if label.startswith("_"):  # error bars: no legend entry of their own
            continue
        bar = container.patches[0] if hasattr(container, "patches") else container[0]
        assert mcolors.same_color(handles[label].get_facecolor(), bar.get_facecolor()), label


def report() -> Report:
    layers = [NodeRow(f"conv{i}", "conv", True, 4.0 + i, 2.5 + i / 2, 0.6, 1000, 900) for i in range(5)]
    return Report(net="edge3", size=224, batch=1, ranks=2, weights=[1, 1], threads_per_rank=1, repeat=5,
                  unsplit_ms=30.0, unsplit_torch_ms=29.0, all_cores_threads=2, unsplit_all_cores_ms=16.0,
                  torch_all_cores_ms=16.0, split_ms=16.0, bound_ms=15.0, efficiency=0.94, speedup=1.9,
                  speedup_all_cores=1.0, end_to_end_ms=17.0, max_abs_error=0.0, peak_rss_mb=[700, 700],
                  unsplit_peak_rss_mb=600.0, layers=layers)


def test_fig10_halo_bars_are_the_colour_of_their_swatch_and_stack_on_the_compute():
    fig = report().figure()
    ax = fig.axes[0]
    legend_swatches_match_bars(ax)
    compute, halo = [c for c in ax.containers if c.get_label().startswith("split")]
    for c, h, row in zip(compute.patches, halo.patches, report().layers):
        assert abs(h.get_y() - c.get_height()) < 1e-9  # halo starts where compute ends
        assert abs(c.get_height() + h.get_height() - row.split_ms) < 1e-9  # together: the split time


ROWS = [{"cores": c, "ratio": "1:1", "planner": 100.0 - c, "priority": 104.0 - c, "random_mean": 106.0 - c,
         "random_best": 102.0 - c, "random_worst": 109.0 - c, "plan_ms": 5.0, "cycles": 8} for c in (2, 3, 4, 6)]


def test_fig5_shows_the_differences_explains_the_numbers_and_keeps_the_legend_off_the_bars():
    fig = fig5(ROWS, "fitted")
    fig.canvas.draw()
    ax = fig.axes[0]
    low, _ = ax.get_ylim()
    assert 0 < low <= min(r["planner"] for r in ROWS)  # a few percent apart: not drawn from 0 ...
    assert "not from 0" in ax.get_ylabel()  # ... and the axis says so
    assert any("ms it took" in t.get_text() for t in ax.get_legend().get_texts())  # the "5 ms" labels explained
    from matplotlib.transforms import Bbox

    legend_box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    for container in ax.containers:
        for bar in getattr(container, "patches", []):
            seen = Bbox.intersection(bar.get_window_extent(), axes_box)  # what is drawn (bars are clipped)
            assert seen is None or not legend_box.overlaps(seen), container.get_label()
    legend_swatches_match_bars(ax)
