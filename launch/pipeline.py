"""``aflkd bench pipeline`` (clusters x stages streaming, under mpiexec) and ``aflkd profile`` (per-layer cost).

The grid comes from ``--topology`` (the same file ``aflkd plan`` and ``aflkd
launch`` read; its speeds are the ranks' speeds) or from ``--clusters``
(stages = ranks / clusters) with ``--speeds``.  On one host unequal boards are
emulated: a rank of speed ``s`` sleeps ``(1/s - 1)`` times as long as each
stage pass took, which frees its core, so the comparison with the one-rank run
and the equal-layer cut stays fair (all three run under the same emulation).
"""
from __future__ import annotations

import json
import sys

from runtime.errors import UsageError

from . import options

__all__ = ["add_bench_parser", "add_parser"]

REAL_SPEED_NOTE = ("speeds from the topology planned the cut; its hosts are real boards, so each runs at its own "
                   "speed, nothing emulated")
SPEED_NOTE = ("Unequal boards on one host are emulated: a rank of speed s sleeps (1/s - 1) x the time each "
              "stage pass took (its core idles meanwhile)")


def _net_options(parser) -> None:
    parser.add_argument("--net", type=options.net_name, default="edge3",
                        help="edge1, edge2, edge3 (or 1, 2, 3), cloud, or tv:NAME (a torchvision classifier)")
    parser.add_argument("--size", type=options.positive_int, default=224, help="input height and width")
    parser.add_argument("--batch", type=options.positive_int, default=1, help="images per stream item")
    parser.add_argument("--in-channels", type=options.positive_int, default=3, help="1 for Fashion-MNIST, 3 for CIFAR")
    parser.add_argument("--classes", type=options.positive_int, default=10, help="output classes of the head")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")


def add_bench_parser(what) -> None:
    """``aflkd bench pipeline``, added to the ``bench`` group."""
    p = what.add_parser(
        "pipeline",
        help="stream images through clusters x pipeline stages: planned cut vs equal-layer cut vs one rank",
        description=(
            "Run under 'mpiexec -n P'.  Streams --images images through a grid of clusters x stages "
            "(height split across clusters, layer split within each) and prints, in one run: images/s of the "
            "pipeline and of one rank running the whole net, single-image latency, each stage's busy time, the "
            "planned stage balance (slowest / mean stage time) and the measured one, for the planned cut "
            "(dynamic program over a per-layer profile and the ranks' speeds), for an equal-layer-count "
            "cut on the same ranks and, when it differs, for the cut re-planned from the speeds the ranks "
            "showed in the planned run (the profile, taken on one rank alone, misses what the stream adds: "
            "both ranks computing at once, the bands).  " + SPEED_NOTE + "."
        ),
    )
    _net_options(p)
    p.add_argument("--topology", default=None,
                   help="the rack's topology file, for the grid and speeds (default: $AFLKD_TOPOLOGY, which "
                   "'aflkd launch' sets, else --clusters and --speeds)")
    p.add_argument("--clusters", type=options.positive_int, default=1,
                   help="clusters (stages = ranks / clusters) when no --topology is given")
    p.add_argument("--speeds", type=options.weights, default=None,
                   help="relative speed per rank in rank order, e.g. 1,0.5 (default: 1 each, or the topology's)")
    p.add_argument("--head", choices=("gather", "split"), default="gather",
                   help="gather: rank 0 receives the last stage's rows and runs the head; split: each last-stage "
                   "rank multiplies its rows by its columns of the first Linear, one Reduce")
    p.add_argument("--images", type=options.positive_int, default=16, help="stream items timed per cut")
    p.add_argument("--latency-repeat", type=options.positive_int, default=5,
                   help="single-image runs for the latency median")
    p.add_argument("--bandwidth", type=options.positive_float, default=None, metavar="MB_PER_S",
                   help="link bandwidth the planner charges for stage-to-stage sends (default: free, one host)")
    p.add_argument("--profile", default=None, metavar="JSON",
                   help="per-layer costs from 'aflkd profile' (default: rank 0 measures them first)")
    p.add_argument("--threads", type=options.threads, default=None,
                   help="torch threads per rank (default: this host's cores / ranks on this host)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the report as JSON (default: not written; folders are created)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw each stage's planned and measured time for both cuts (default: not drawn; folders are created)")
    options.deadline_option(p)
    p.set_defaults(func=_bench)


def add_parser(sub) -> None:
    """``aflkd profile``: its own command group."""
    p = sub.add_parser(
        "profile",
        help="measure per-layer cost on this board (for 'aflkd plan' and 'aflkd bench pipeline')",
        description=("Times every layer (the runs of nodes between cuts where one feature map is live) of the net "
                     "on this board, on the whole map, and writes the medians as JSON for the stage partitioner."),
    )
    _net_options(p)
    p.add_argument("--repeat", type=options.positive_int, default=5, help="timed runs per layer (median taken)")
    p.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", required=True, metavar="FILE", help="where to write the profile (folders are created)")
    p.set_defaults(func=_profile, one_process=True)


def _build(args):
    def build():
        import torch

        from models import build_model, randomize_batchnorm

        torch.manual_seed(args.seed)
        model = build_model(args.net, args.in_channels, args.size, args.classes)
        randomize_batchnorm(model, torch.Generator().manual_seed(args.seed))
        return model.eval()
    return build


def _grid_and_speeds(args, size: int):
    """((clusters, stages), speeds, emulate) from the topology or the options (the Grid is made later: it imports
    torch).  A topology's speeds are emulated (slowed ranks sleep) only when every host is this one: on real
    boards they plan the cut and the boards run at their own speed; --speeds is always emulated."""
    from .launcher import local_only
    from .topology import check_world_size, load_topology, topology_path_from_env

    speeds = args.speeds
    path = args.topology or topology_path_from_env()  # 'aflkd launch' exports the topology it ran
    if path:
        topology = load_topology(path)
        check_world_size(topology, size)
        grid = (topology.clusters, topology.stages)
        if speeds is not None:
            return grid, speeds, True
        ranks = topology.ranks()
        if any(r.speed is None for r in ranks):
            raise UsageError(f"{path} has speed = \"measure\"; give numbers there or --speeds")
        return grid, [float(r.speed) for r in ranks], local_only(topology)
    if speeds is not None and len(speeds) != size:
        raise UsageError(f"--speeds has {len(speeds)} values but the job has {size} ranks; give one per rank")
    if size % args.clusters:
        raise UsageError(f"--clusters {args.clusters} does not divide the {size} ranks; every cluster needs the "
                         "same number of devices (one per stage)")
    return (args.clusters, size // args.clusters), speeds, True


def _bench(args) -> int:
    from mpi4py import MPI

    from runtime import transport
    from runtime.transport import abort_on_uncaught_exception, ranks_on_this_host

    from .topology import topology_path_from_env

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)

    def set_up():  # on every rank, from its own files: a problem on one board is agreed before any image moves
        options.prepare_output(args.json, "--json")
        options.prepare_output(args.plot, "--plot")
        return _grid_and_speeds(args, comm.Get_size())

    problem, grid, speeds, emulate = None, None, None, True
    try:
        grid, speeds, emulate = set_up()
    except UsageError as err:
        problem = str(err)
    transport.agree(comm, problem, "set-up")  # before torch's import: bad input is refused in a fraction of a second
    topology = args.topology or topology_path_from_env()
    # the profile is read on rank 0 only; the topology by every rank, so its content must agree
    transport.agree_on(comm, options.deployment_fingerprint(args, comm.Get_size(), topology or ""),
                       "deployment (topology, options, torch)")
    import torch

    from runtime.pipeline import Grid
    from runtime.pipeline_bench import bench_pipeline

    grid = Grid(*grid)

    if args.threads is None:
        import os

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_this_host(comm)))
    else:
        torch.set_num_threads(args.threads)
    root = comm.Get_rank() == 0
    bandwidth = float("inf") if args.bandwidth is None else args.bandwidth * 1e6
    report = bench_pipeline(comm, _build(args), (args.in_channels, args.size, args.size), grid, speeds, args.images,
                            args.batch, args.latency_repeat, bandwidth, args.profile, args.net, args.seed,
                            progress=(lambda text: print(f"  {text} ...", file=sys.stderr, flush=True)) if root
                            else None, head=args.head, emulate=emulate)
    if not root:
        return 0
    report["command"] = args.command_line
    report["threads"] = torch.get_num_threads()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot:
        plot_report(report, args.plot)
    return 0


def format_report(r: dict) -> str:
    def ms(values):
        return ",".join(f"{v:.0f}" for v in values)

    speeds = ",".join(f"{s:g}" for s in r["speeds"])
    lines = [
        f"bench pipeline: {r['net']} {r['size']}x{r['size']}, batch {r['batch']}, {r['images']} images, "
        f"{r['clusters']} cluster(s) x {r['stages']} stage(s) on {r['ranks']} ranks, {r['threads']} thread(s) "
        f"per rank, speeds {speeds}",
        f"  ({SPEED_NOTE if r.get('speeds_emulated', True) else REAL_SPEED_NOTE})",
        "",
        f"{'cut':<14}{'layers/stage':<16}{'planned ms/stage':<20}{'bal.plan':>9}{'busy ms/stage':>18}"
        f"{'bal.meas':>10}{'images/s':>10}{'latency ms':>12}",
    ]
    for run in r["runs"]:
        lines.append(f"{run['cut']:<14}{ms(run['layers_per_stage']):<16}{ms(run['planned_stage_ms']):<20}"
                     f"{run['balance_planned']:>9.3f}{ms(run['stage_busy_ms']):>18}{run['balance_measured']:>10.3f}"
                     f"{run['images_per_s']:>10.2f}{run['latency_ms']:>12.0f}")
    lines.append(f"{'one rank':<14}{'all ' + str(r['layers']):<16}{'':<20}{'':>9}{'':>18}{'':>10}"
                 f"{r['one_rank_images_per_s']:>10.2f}{r['one_rank_latency_ms']:>12.0f}")
    lines += [
        "",
        f"throughput ratio (planned pipeline / one rank): {r['throughput_ratio']:.2f}, {r['throughput_vs_ideal']:.2f} "
        f"of the ideal {r['ideal_ratio']:.2f} (every rank busy at its speed)   "
        f"row shares per cluster: {','.join(f'{s:.3g}' for s in r['runs'][0]['shares'])}",
        f"max abs error vs the unsplit model, every image: {r['max_abs_error']:.2g}",
    ]
    if r.get("replanned_bounds") is not None:
        if r.get("replanned_images_per_s") is None:
            lines.insert(-1, "re-planned from the measured busy times: the same cut")
        else:
            ideal = r["one_rank_images_per_s"] * r["ideal_ratio"]
            lines.insert(-1, f"re-planned from the measured busy times: cut {r['replanned_bounds']}, "
                             f"{r['replanned_images_per_s'] / ideal:.2f} of the ideal, measured balance "
                             f"{r['replanned_balance_measured']:.3f}")
    return "\n".join(lines)


def plot_report(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(r["runs"]), figsize=(5 * len(r["runs"]), 3.5), sharey=True)
    for ax, run in zip(axes, r["runs"]):
        stages = range(len(run["stage_busy_ms"]))
        ax.bar([s - 0.2 for s in stages], run["planned_stage_ms"], 0.4, label="planned")
        ax.bar([s + 0.2 for s in stages], run["stage_busy_ms"], 0.4, label="measured busy")
        ax.set_title(f"{run['cut']}: balance {run['balance_measured']:.2f}, {run['images_per_s']:.2f} img/s")
        ax.set_xlabel("stage")
        ax.set_xticks(list(stages))
    axes[0].set_ylabel("ms per image")
    axes[0].legend()
    fig.suptitle(f"{r['net']} {r['size']}x{r['size']}, {r['clusters']}x{r['stages']}, speeds "
                 f"{','.join(f'{s:g}' for s in r['speeds'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _profile(args) -> int:
    import torch
    from runtime.progress import progress_bar

    from runtime.graph import trace_model
    from runtime.profile import profile_layers, write_profile
    from runtime.stages import split_layers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options.prepare_output(args.json, "--json")
    model = _build(args)()
    layers = split_layers(trace_model(model, (args.in_channels, args.size, args.size)))
    with progress_bar(total=len(layers), desc=f"profile {args.net}", unit="layer", file=sys.stderr) as bar:
        prof = profile_layers(model, layers, args.net, args.batch, args.repeat, progress=lambda k: bar.update())
    write_profile(prof, args.json)
    slowest = sorted(zip(prof.seconds, prof.labels), reverse=True)[:3]
    print(f"{args.net} {args.size}x{args.size}: {len(layers)} layers, {1e3 * sum(prof.seconds):.1f} ms + head "
          f"{1e3 * prof.head_seconds:.1f} ms on {prof.threads} thread(s); slowest: "
          + ", ".join(f"{label} {1e3 * s:.1f} ms" for s, label in slowest) + f"; written to {args.json}")
    return 0
