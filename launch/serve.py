"""``aflkd serve``: the rack as a service -- a stream of images through the height split, each result logged once.

Images come from ``--source`` (:mod:`runtime.image_sources`), go through the split
executor on every rank of the job, and each result (image id, top-k classes and
logits, plan epoch, latency) is committed to the results log ``--log``
(:mod:`runtime.results_log`).  Rerunning the same command after a crash or a
kill serves only the images the log does not hold: every image exactly once.

Rebalancing (on by default): every rank reports the seconds it computed for each
image; when the per-rank medians over a window stay imbalanced and a re-plan
promises a gain, the root re-plans the row shares and every rank switches at
the next image boundary (:mod:`runtime.rebalance`, :mod:`runtime.serving`).
``--slow RANK:SPEED@IMAGE`` emulates a board that slows down mid-run.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser", "parse_slowdown"]

EPILOG = """\
examples:
  .venv/bin/mpiexec -n 3 .venv/bin/aflkd serve --source synthetic --images 500 --log out/serve.db
  .venv/bin/mpiexec -n 3 .venv/bin/aflkd serve --source synthetic --images 300 --log out/slow.db \\
      --slow 2:0.5@60 --json out/serve.json --plot out/serve.png     # rank 2 at half speed from image 60
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd serve --source cifar10 --net 1 --size 32 --checkpoint S.pt --log out/c.db
  rerun the same command after a crash: the log's images are skipped, the rest are served once
"""


def parse_slowdown(text: str):
    """``RANK:SPEED[@IMAGE]`` -> :class:`runtime.serving.Slowdown` (argparse type: one clear line on bad input)."""
    import argparse

    from runtime.serving import Slowdown

    try:
        rank_text, _, rest = text.partition(":")
        speed_text, _, after_text = rest.partition("@")
        slow = Slowdown(int(rank_text), float(speed_text), int(after_text) if after_text else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not RANK:SPEED[@IMAGE], e.g. 2:0.5@100") from None
    if slow.rank < 0 or not 0 < slow.speed <= 1 or slow.after < 0:
        raise argparse.ArgumentTypeError(f"'{text}': the rank and image must be >= 0 and 0 < speed <= 1")
    return slow


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="under mpiexec: serve a stream of images through the split, each result "
                       "logged exactly once, row shares re-planned from measured times",
                       description="Serves images from --source through the height split over every rank of "
                       "the job; rank 0 reads the images, logs each result (top-k, plan epoch, latency) to --log "
                       "(SQLite) and prints progress. Rerun the same command to resume: images already in the "
                       "log are skipped. Rebalancing re-plans the rows from the ranks' measured compute times "
                       "between two images (--no-rebalance: keep the first plan).",
                       epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    p.add_argument("--source", default="synthetic", help="synthetic (seeded random images, --images of them), "
                   "cifar10, cifar100, fashion-mnist (their test split; append :train for the other) or "
                   "folder:PATH (image files in name order)")
    p.add_argument("--images", type=options.positive_int, default=None,
                   help="images to serve, the first N of the source (default: all of a dataset or folder; synthetic needs it)")
    p.add_argument("--log", required=True, metavar="FILE", help="results log (SQLite); created, or resumed")
    p.add_argument("--data-root", default=str(options.DATA_ROOT), help="folder with the dataset files")
    p.add_argument("--net", type=options.net_name, default="edge3",
                   help="edge1-3, cloud or tv:NAME (a torchvision net); numbers 1-3 mean edge nets")
    p.add_argument("--size", type=options.positive_int, default=None,
                   help="input height and width (default 224 for synthetic, 32 for a dataset)")
    p.add_argument("--in-channels", type=options.positive_int, default=None,
                   help="input channels (default 3; a dataset's own)")
    p.add_argument("--classes", type=options.positive_int, default=None, help="classes (default 10; a dataset's own)")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: seeded random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of synthetic images")
    p.add_argument("--weights", type=options.weights, default=None,
                   help="initial row weights, one per rank, or one per cluster with --stages (default: even)")
    p.add_argument("--stages", type=options.positive_int, default=1,
                   help="pipeline stages: the ranks form ranks/S clusters of S stages, each cluster's rows run "
                   "through S stages with several images in flight, and rebalancing moves the stage cuts (every "
                   "rank holds the whole model; rank 0 profiles the layers first). 1: the flat height split")
    p.add_argument("--cuts", type=options.int_list, default=None, metavar="L1,L2,...",
                   help="with --stages: the first plan's S-1 stage cuts, as layer indices (default: planned from "
                   "rank 0's layer profile, equal speeds)")
    p.add_argument("--chunk", type=options.positive_int, default=20,
                   help="with --stages: images streamed between two re-planning decisions")
    p.add_argument("--rate", type=options.non_negative_float, default=0.0,
                   help="images arriving per second (0: each as soon as the previous one is done); latency "
                   "counts from arrival")
    p.add_argument("--no-rebalance", action="store_true", help="keep the first plan for the whole run")
    from runtime.rebalance import RebalanceRule

    rule = RebalanceRule()
    p.add_argument("--rebalance-window", type=options.positive_int, default=rule.window,
                   help="images whose median compute times decide a re-plan")
    p.add_argument("--rebalance-threshold", type=float, default=rule.threshold,
                   help="re-plan only when the slowest rank's median is above this times the mean ...")
    p.add_argument("--rebalance-gain", type=float, default=rule.min_gain,
                   help="... and the re-planned image time is predicted at least this fraction faster, both for "
                   "half a window of images in a row")
    p.add_argument("--slow", type=parse_slowdown, action="append", default=None, metavar="RANK:SPEED@IMAGE",
                   help="emulate a slower board: RANK computes at SPEED (0-1] from the IMAGE-th image of this "
                   "run on; give it once per rank to slow (default: none)")
    p.add_argument("--topk", type=options.positive_int, default=5, help="classes kept per result")
    p.add_argument("--threads", type=options.threads, default=None, help="torch threads per rank (default: the host's cores over its ranks)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the run's report (figures, switches, "
                   "per-image timeline) as JSON (default: none)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot throughput and per-rank compute per image (default: none)")
    p.add_argument("--interval", type=options.positive_float, default=5.0, help="seconds between progress lines")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    options.deadline_option(p)
    p.set_defaults(func=_serve)


def _shape(args, spec) -> tuple[int, int, int]:
    if spec.kind == "dataset":
        channels, classes = (1, 10) if spec.name == "fashion-mnist" else (3, 100 if spec.name == "cifar100" else 10)
        if args.classes not in (None, classes):
            raise UsageError(f"--source {spec} has {classes} classes, not --classes {args.classes}")
        args.classes = classes
        return args.in_channels or channels, args.size or 32, args.size or 32
    args.classes = args.classes or 10
    size = args.size or 224
    return args.in_channels or 3, size, size


def _build_model(args, shape):
    import torch

    from models import build_model, load_weights, randomize_batchnorm

    torch.manual_seed(args.seed)
    model = build_model(args.net, shape[0], shape[1], args.classes)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    else:
        randomize_batchnorm(model, torch.Generator().manual_seed(args.seed))
    return model.eval()


def _serve(args) -> int:
    args.slow = args.slow or []  # (None in the parser, so its help shows no Python list)
    from runtime import transport
    from runtime.image_sources import ImageSource, parse_source
    from runtime.rebalance import RebalanceRule

    from .ranks import default_threads, set_threads

    comm = transport.world()
    transport.abort_on_uncaught_exception(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    spec = parse_source(args.source)
    shape = _shape(args, spec)
    if size % args.stages:
        raise UsageError(f"--stages {args.stages} does not divide the job's {size} ranks into clusters")
    options.check_weights(args.weights, size // args.stages)
    far = [s.rank for s in args.slow if s.rank >= size]
    if far:
        raise UsageError(f"--slow names rank {far[0]} but the job has {size} ranks (0-{size - 1})")
    rule = None if args.no_rebalance else RebalanceRule(window=args.rebalance_window,
                                                        threshold=args.rebalance_threshold,
                                                        min_gain=args.rebalance_gain).check()
    transport.agree_on(comm, options.deployment_fingerprint(args, size, args.checkpoint or ""),
                       "deployment (net, options, torch, checkpoint)")
    set_threads(args.threads or default_threads(comm))
    problem, source, log, model = None, None, None, None
    try:
        if rank == 0:
            for option, path in (("--json", args.json), ("--plot", args.plot)):
                options.prepare_output(path, option)
            options.prepare_output(args.log, "--log")
            source = ImageSource(spec, shape, args.images, args.seed, args.data_root)
            from runtime.results_log import ResultsLog

            log = ResultsLog(args.log, {"source": str(spec), "seed": args.seed,
                                        "net": args.net, "shape": list(shape), "classes": args.classes,
                                        "checkpoint": _digest(args.checkpoint)})
        model = _build_model(args, shape)
    except (UsageError, RuntimeError, OSError) as err:
        problem = str(err).splitlines()[0]
    transport.agree(comm, problem, "serving set-up")
    return _run(args, comm, model, shape, source, log, rule)


def initial_weights(size: int, path=None) -> list:
    """The first plan's row weights: the topology's speeds when ``aflkd launch`` ran the job on real boards
    (``$AFLKD_TOPOLOGY``, one stage, a speed per host), else even.  On one host nothing makes the topology's
    speeds true, so they would only unbalance the first plan; rebalancing corrects either from measurements."""
    from .launcher import local_only
    from .topology import load_topology, topology_path_from_env

    path = path or topology_path_from_env()
    if not path:
        return [1.0] * size
    topology = load_topology(path)
    ranks = topology.ranks()
    if topology.stages != 1 or len(ranks) != size or local_only(topology) or any(r.speed is None for r in ranks):
        return [1.0] * size
    return [float(r.speed) for r in ranks]


def _digest(path):
    if not path:
        return None
    from kd.incremental import file_sha256

    return file_sha256(path)[:16]


def _run(args, comm, model, shape, source, log, rule) -> int:
    from runtime import trace_model
    from runtime.plan import plan_split
    from runtime.serving import serve_stream
    from runtime.split import SplitExecutor

    rank, size = comm.Get_rank(), comm.Get_size()
    if args.stages > 1:
        return _run_pipeline(args, comm, model, shape, source, log, rule)
    graph = trace_model(model, shape)
    weights = args.weights or initial_weights(size)

    def build(w):
        return SplitExecutor(plan_split(graph, w), model, comm)

    todo = _todo(args, rank, source, log, size, shape, f"rebalancing {'off' if rule is None else 'on'}")

    report = serve_stream(comm, build, weights, shape[1], todo, source.image if source else None,
                          record=_recorder(log) if rank == 0 else None, rule=rule, slowdowns=args.slow,
                          rate=args.rate, topk=args.topk, progress=None if args.no_progress else _progress,
                          progress_every_s=args.interval)
    return _finish(args, report, todo, source, log, size)


def _recorder(log):
    """Commit one result to the results log (rank 0)."""
    def record(image, topk, epoch, latency_ms):
        log.append([(image, topk[0][0], topk, epoch, latency_ms)])
    return record


def _todo(args, rank, source, log, size, shape, what):
    """The root's list of image ids the log lacks (None elsewhere), announced in one line."""
    if rank != 0:
        return None
    served = log.served()
    todo = [i for i in range(len(source)) if i not in served]
    print(f"serving {len(todo)} of {len(source)} images of {source.spec} ({len(served)} already in {args.log}, "
          f"run {log.run}) on {size} rank(s), {args.net} at {'x'.join(map(str, shape))}, {what}", flush=True)
    return todo


def _run_pipeline(args, comm, model, shape, source, log, rule) -> int:
    """--stages S: clusters x stages, the stage cuts planned from rank 0's layer profile and re-cut from the
    ranks' measured busy times (:func:`runtime.serving.serve_pipeline_stream`)."""
    from runtime import transport, trace_model
    from runtime.pipeline import Grid, PipelineExecutor
    from runtime.profile import profile_layers
    from runtime.rebalance import CutModel
    from runtime.serving import serve_pipeline_stream
    from runtime.stages import partition_stages, split_layers

    rank, size = comm.Get_rank(), comm.Get_size()
    grid = Grid(size // args.stages, args.stages)
    layers = split_layers(trace_model(model, shape))
    if grid.stages > len(layers):
        raise UsageError(f"--stages {grid.stages}: {args.net} has only {len(layers)} layers to share")
    shares = tuple(args.weights or [1.0] * grid.clusters)

    def measure():
        prof = profile_layers(model, layers, args.net)
        return list(prof.seconds), list(prof.out_bytes)

    if args.cuts is not None:
        bounds = [0, *args.cuts, len(layers)]
        if len(args.cuts) != grid.stages - 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise UsageError(f"--cuts {','.join(map(str, args.cuts))}: need {grid.stages - 1} layer indices rising "
                             f"strictly between 0 and {len(layers)} ({args.net} has {len(layers)} layers)")
    costs, out_bytes = transport.share_from_root(comm, measure, error=UsageError)
    if args.cuts is None:
        ones = [[1.0] * grid.stages for _ in range(grid.clusters)]
        bounds = list(partition_stages(costs, out_bytes, ones, shares=shares).bounds)

    def build(cuts):
        return PipelineExecutor(model, shape, grid, cuts, shares, comm, layers=layers)

    todo = _todo(args, rank, source, log, size, shape, f"{grid.clusters} cluster(s) x {grid.stages} stages, cuts "
                 f"{bounds} of {len(layers)} layers, rebalancing {'off' if rule is None else 'on'}")

    report = serve_pipeline_stream(comm, build, bounds, todo, source.image if source else None,
                                   record=_recorder(log) if rank == 0 else None, rule=rule,
                                   model=CutModel(tuple(costs), tuple(out_bytes), grid.clusters, grid.stages, shares),
                                   chunk=args.chunk, slowdowns=args.slow, topk=args.topk,
                                   progress=None if args.no_progress else _progress, progress_every_s=args.interval)
    return _finish(args, report, todo, source, log, size)


def _finish(args, report, todo, source, log, size) -> int:
    from runtime.serving import busy_fraction

    if report is None:
        return 0
    log.close()
    summary = _summary(args, report, len(todo), len(source), busy_fraction(report), size)
    print(_summary_line(summary), flush=True)
    for s in report.switches:
        what = "reverted (the last re-plan did not pay)" if s["rule"].get("revert") else "re-planned"
        plan = (f"stage cuts {s['bounds']}" if "bounds" in s
                else f"weights {', '.join(f'{w:.3f}' for w in s['weights'])}")
        print(f"  {what} before image {s['image']} (image {s['at']} of this run): epoch {s['epoch']}, {plan} "
              f"(median busy ms {s['rule'].get('busy_ms')})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**summary, "timeline": report.images}, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        from runtime.serve_plot import plot_serving

        plot_serving(report, args.plot, args.slow)
        print(f"wrote {args.plot}")
    return 0


def _percentiles(values) -> dict:
    import numpy as np

    if not values:
        return {}
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)}


def _summary(args, report, todo: int, total: int, busy: list, ranks: int) -> dict:
    latencies = [row[2] for row in report.images]
    return {"command": args.command_line, "ranks": ranks, "source": args.source, "images_in_source": total,
            "served_now": len(report.images), "already_served": total - todo, "seconds": round(report.seconds, 3),
            "images_per_s": round(len(report.images) / report.seconds, 3) if report.seconds > 0 else 0.0,
            "latency_ms": _percentiles(latencies), "busy_fraction": busy, "switches": report.switches,
            "slowdowns": [dataclasses.asdict(s) for s in args.slow]}


def _summary_line(s: dict) -> str:
    lat = s["latency_ms"]
    return (f"served {s['served_now']} images in {s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s), latency "
            f"p50 {lat.get('p50', 0):.1f} ms p95 {lat.get('p95', 0):.1f} ms, busy {s['busy_fraction']}, "
            f"{len(s['switches'])} re-plan(s)")


def _progress(report) -> None:
    rows = report.images
    recent = rows[-20:]
    rate = report.throughput(max(0, len(rows) - 20))
    lat = sorted(r[2] for r in recent)
    print(f"  {len(rows)} images, {rate:.1f} images/s (last {len(recent)}), latency p50 {lat[len(lat) // 2]:.1f} "
          f"ms, epoch {rows[-1][3]}, busy ms {rows[-1][4]}", file=sys.stderr, flush=True)
