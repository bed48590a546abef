"""``aflkd bench``: ``layers`` (split vs unsplit per layer, under mpiexec) and ``train-step`` (one process)."""
from __future__ import annotations

import argparse

from . import options

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (layers: under mpiexec; train-step: one process)",
                           description="Benchmarks.")
    what = bench.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    bench.set_defaults(func=lambda args: _help(bench))

    layers = what.add_parser(
        "layers",
        help="per-layer timing of split vs unsplit inference (the paper's Fig. 10)",
        description=(
            "Per-layer timing of height-split inference.  Run under 'mpiexec -n P'.  Prints, "
            "measured in the same run: the conv stack unsplit on one rank, split over P ranks, "
            "and the bound (P ranks each running only their own rows at once, no exchange); "
            "efficiency = bound / split.  Times are medians after warm-up."
        ),
    )
    layers.add_argument("--net", type=options.net_name, default="edge3",
                        help="edge1, edge2, edge3 (or 1, 2, 3) or cloud")
    layers.add_argument("--size", type=options.positive_int, default=224, help="input height and width")
    layers.add_argument("--batch", type=options.positive_int, default=1, help="images per pass")
    layers.add_argument("--in-channels", type=options.positive_int, default=3, help="1 for Fashion-MNIST, 3 for CIFAR")
    layers.add_argument("--classes", type=options.positive_int, default=10, help="output classes of the head")
    layers.add_argument("--repeat", type=options.positive_int, default=20, help="timed repetitions (median taken)")
    layers.add_argument("--warmup", type=options.non_negative_int, default=3, help="untimed repetitions first")
    layers.add_argument("--weights", type=options.weights, default=None,
                        help="per-rank share of the rows, e.g. 2,1,1 for a Jetson beside two Pis (default: even)")
    layers.add_argument("--threads", type=options.threads, default=None,
                        help="torch threads per rank (default: this host's cores / ranks on this host)")
    layers.add_argument("--checkpoint", default=None, help="weights to load on rank 0 (default: seeded random)")
    layers.add_argument("--seed", type=int, default=0, help="seed of random weights and input")
    layers.add_argument("--csv", default=None, metavar="FILE",
                        help="write the per-layer table as CSV (default: not written; folders are created)")
    layers.add_argument("--json", default=None, metavar="FILE",
                        help="write the full report as JSON (default: not written; folders are created)")
    layers.add_argument("--plot", default=None, metavar="PNG",
                        help="draw per-layer bars, split vs unsplit (default: not drawn; folders are created)")
    layers.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    layers.set_defaults(func=_layers, sets_own_threads=True)

    step = what.add_parser(
        "train-step",
        help="images/s of one teacher-training step (pick threads, batch, torch.compile before a long run)",
        description="Times the cloud net's training step (forward, backward, SGD; channels-last, "
        "the recipe of 'train cloud') on random data in one process and prints the median "
        "images/s.  Run it once per setting to compare, on an otherwise idle machine.",
    )
    step.add_argument("--classes", type=options.positive_int, default=10,
                      help="10 for CIFAR-10/Fashion-MNIST, 100 for CIFAR-100")
    step.add_argument("--in-channels", type=options.positive_int, default=3, help="1 for Fashion-MNIST, 3 for CIFAR")
    step.add_argument("--batch", type=options.positive_int, default=128, help="images per step")
    step.add_argument("--steps", type=options.positive_int, default=15, help="timed steps (median taken)")
    step.add_argument("--warmup", type=options.non_negative_int, default=3, help="untimed steps first")
    step.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    step.add_argument("--compile", action="store_true", help="wrap the net in torch.compile")
    step.set_defaults(func=_train_step)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def load_model(comm, args):
    """The model on every rank: rank 0 builds (and loads --checkpoint into) the real one and
    sends the conv stack's weights to the others, which build only the layers they run.

    A :class:`UsageError` on rank 0 (a bad checkpoint) is raised on every rank.
    """
    import torch

    from models import build_net, load_weights, randomize_batchnorm

    from .ranks import on_root_then_bcast

    with torch.device("meta"):  # cheap, identical on every rank: validates net and size
        model = build_net(args.net, args.in_channels, args.size, args.classes)
    flatten = [name for name, _ in model.named_children()].index("flatten")

    def load_on_root():
        torch.manual_seed(args.seed)
        full = build_net(args.net, args.in_channels, args.size, args.classes)
        randomize_batchnorm(full, torch.Generator().manual_seed(args.seed))
        if args.checkpoint:
            load_weights(full, args.checkpoint)
        return full

    loaded = []  # rank 0's real model; the others build only the layers they run
    on_root_then_bcast(comm, lambda: loaded.append(load_on_root()))
    if comm.Get_rank() == 0:
        model = loaded[0]
        comm.bcast(model[:flatten].state_dict(), root=0)  # once, at set-up: pickling is fine here
    else:
        state = comm.bcast(None, root=0)
        features = model[:flatten].to_empty(device="cpu")
        features.load_state_dict(state)
        model = torch.nn.Sequential(*features, *model[flatten:])
    return model


def _layers(args) -> int:
    import torch
    from mpi4py import MPI

    from runtime.benchmark import bench_layers
    from runtime.comm import abort_on_uncaught_exception

    from .ranks import default_threads, on_root_then_bcast, set_threads

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    options.check_weights(args.weights, comm.Get_size())
    outputs = (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot))
    on_root_then_bcast(comm, lambda: [options.prepare_output(path, option) for option, path in outputs])
    threads = args.threads or default_threads(comm)
    set_threads(threads)
    model = load_model(comm, args)
    model.eval().to(memory_format=torch.channels_last)

    image = None
    if comm.Get_rank() == 0:
        image = torch.randn(args.batch, args.in_channels, args.size, args.size,
                            generator=torch.Generator().manual_seed(args.seed + 1))
    report = bench_layers(
        comm, model, image, net=args.net, batch=args.batch, repeat=args.repeat, warmup=args.warmup,
        weights=args.weights, threads=threads, progress=not args.no_progress,
    )
    if report is not None:
        print(report.table(), flush=True)
        for option, path in outputs:
            if path:
                {"--csv": report.to_csv, "--json": report.to_json, "--plot": report.plot}[option](path)
                print(f"wrote {path}")
    return 0


def _train_step(args) -> int:
    import torch

    from kd.teacher import step_throughput
    from models import cloud_net

    torch.manual_seed(0)
    r = step_throughput(cloud_net(args.in_channels, 32, args.classes), (args.in_channels, 32, 32), args.classes,
                        args.batch, args.steps, args.warmup, args.compile)
    print(f"cloud net training step, batch {r['batch']}, {r['threads']} thread(s), "
          f"{'torch.compile' if r['compile'] else 'eager'}: median {1000 * r['median_s']:.0f} ms "
          f"= {r['images_per_s']:.0f} images/s ({args.steps} steps; warm-up {r['warmup_s']:.1f} s)")
    return 0
