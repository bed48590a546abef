"""``aflkd bench``: ``layers`` (split vs unsplit per layer, under mpiexec) and ``train-step`` (one process)."""
from __future__ import annotations

import argparse

from . import options, pipeline

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (layers, pipeline: under mpiexec; train-step: one process)",
                           description="Benchmarks.")
    what = bench.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    bench.set_defaults(func=lambda args: _help(bench))

    layers = what.add_parser(
        "layers",
        help="per-layer timing of split vs unsplit inference (the paper's Fig. 10)",
        description=(
            "Per-layer timing of height-split inference.  Run under 'mpiexec -n P'.  Prints, "
            "measured in the same run: the conv stack unsplit on one rank, split over P ranks, "
            "the bound (P ranks each running only their own rows at once, as a whole image); "
            "efficiency = bound / split; and the split's own program with its messages left out, whose "
            "ratio to the split (exchange efficiency) is what the halo exchanges cost.  Times are medians "
            "after warm-up."
        ),
    )
    layers.add_argument("--net", type=options.net_name, default="edge3",
                        help="edge1, edge2, edge3 (or 1, 2, 3), cloud, or tv:NAME for a torchvision "
                        "classifier as torchvision ships it (e.g. tv:resnet18, tv:mobilenet_v2), random weights")
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
    layers.add_argument("--checkpoint", default=None,
                        help="weights (a state dict saved by torch.save): rank 0 loads them for the gather head, "
                        "the split head reads its columns from them (default: seeded random weights, which the "
                        "split head reads from a temporary checkpoint a fresh process writes)")
    layers.add_argument("--head", choices=("both", "gather", "split", "auto"), default="both",
                        help="where the head's first Linear runs: both (default) times gather (rank 0 gathers the "
                        "last map and runs the head) and split (each rank multiplies its own rows by its columns "
                        "of the Linear, one Reduce) end to end in one run, each with its own peak memory per rank; "
                        "gather or split time one (split still runs gather for the per-node table); auto picks by "
                        "a cost model from measured matrix-vector time and link bandwidth and says why")
    layers.add_argument("--seed", type=int, default=0, help="seed of random weights and input")
    layers.add_argument("--csv", default=None, metavar="FILE",
                        help="write the per-layer table as CSV (default: not written; folders are created)")
    layers.add_argument("--json", default=None, metavar="FILE",
                        help="write the full report as JSON (default: not written; folders are created)")
    layers.add_argument("--plot", default=None, metavar="PNG",
                        help="draw per-layer bars, split vs unsplit (default: not drawn; folders are created)")
    layers.add_argument("--instructions", action="store_true",
                        help="also print, per rank, the time per pass of each kind of instruction (Window, Fused, "
                        "PostHalo, AwaitHalo, ...) in the split, in its program without messages and in the bound "
                        "(the JSON always has it)")
    layers.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    options.deadline_option(layers)
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
    step.set_defaults(func=_train_step, one_process=True)

    pipeline.add_bench_parser(what)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _builder(args):
    """``build()`` for the runtime: the named net, seeded weights, randomised BatchNorm statistics."""
    def build():
        import torch

        from models import build_model, randomize_batchnorm

        torch.manual_seed(args.seed)
        model = build_model(args.net, args.in_channels, args.size, args.classes)
        if not next(iter(model.parameters())).is_meta:
            randomize_batchnorm(model, torch.Generator().manual_seed(args.seed))
        return model.to(memory_format=torch.channels_last)
    return build


def _loader(args):
    """``load(model)`` on the root: --checkpoint's weights, if given."""
    if not args.checkpoint:
        return None

    def load(model):
        from models import load_weights

        load_weights(model, args.checkpoint)
    return load


def _unsplit_memory(args):
    """Peak memory of the unsplit model alone: build it and run one pass in a fresh process."""
    def probe():
        import os
        import subprocess
        import sys

        code = ("import torch; from models import build_model; from runtime.benchmark import peak_rss_mb; "
                f"torch.set_num_threads(1); m = build_model({args.net!r}, {args.in_channels}, {args.size}, "
                f"{args.classes}).eval(); "
                f"torch.no_grad()(m)(torch.zeros({args.batch}, {args.in_channels}, {args.size}, {args.size})); "
                "print(peak_rss_mb())")
        # without the MPI launcher's variables, or the child would try to join this job
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=options.REPO,
                              timeout=600, env=env)
        return float(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else None
    return probe


def _check_checkpoint(args) -> None:
    from models import build_model
    from runtime.distribute import check_checkpoint
    from runtime.skeleton import empty_weights

    with empty_weights():
        model = build_model(args.net, args.in_channels, args.size, args.classes)
    check_checkpoint(model, args.checkpoint, "check --net, --size, --classes and --in-channels")


def _head_can_split(args) -> bool:
    """Whether the net's head splits at all (traced on meta): else no temporary checkpoint is worth writing."""
    from models import build_model
    from runtime import plan_split, trace_model
    from runtime.skeleton import empty_weights

    with empty_weights():
        model = build_model(args.net, args.in_channels, args.size, args.classes).eval()
    return plan_split(trace_model(model, (args.in_channels, args.size, args.size)), [1.0], head="split").head == "split"


def _save_random_weights(args) -> str:
    """The seeded random weights of ``build()`` as a checkpoint in a temporary folder, written by a fresh process
    (so that no rank of the benchmark ever holds the whole model to write them)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from runtime.errors import UsageError

    folder = tempfile.mkdtemp(prefix="aflkd-bench-")
    path = os.path.join(folder, "weights.pt")
    fields = dict(net=args.net, in_channels=args.in_channels, size=args.size, classes=args.classes, seed=args.seed)
    code = ("import argparse, json, sys, torch; torch.set_num_threads(1); from launch.bench import _builder; "
            "from models import save_atomic; "
            "save_atomic(_builder(argparse.Namespace(**json.loads(sys.argv[1])))().state_dict(), sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields), path], capture_output=True, text=True,
                          cwd=options.REPO, timeout=600, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"could not write the temporary checkpoint for the split head in {folder}: {tail}")
    return path


def _layers(args) -> int:
    from mpi4py import MPI

    from runtime.benchmark import bench_layers
    from runtime.transport import abort_on_uncaught_exception

    from .ranks import default_threads, on_root_then_bcast, set_threads

    from runtime import transport

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    options.check_weights(args.weights, comm.Get_size())
    outputs = (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot))
    on_root_then_bcast(comm, lambda: [options.prepare_output(path, option) for option, path in outputs])
    # what every rank builds from its own files and torch must be the same: checked before any image moves
    transport.agree_on(comm, options.deployment_fingerprint(args, comm.Get_size()), "deployment (net, options, torch)")
    threads = args.threads or default_threads(comm)
    set_threads(threads)
    checkpoint, temporary = args.checkpoint, None
    if checkpoint:  # one line naming what does not fit, before any rank builds anything
        on_root_then_bcast(comm, lambda: _check_checkpoint(args))
    if args.head != "gather" and not checkpoint:
        temporary = checkpoint = on_root_then_bcast(
            comm, lambda: _save_random_weights(args) if _head_can_split(args) else None)
    try:
        report = bench_layers(
            comm, _builder(args), (args.in_channels, args.size, args.size), load=_loader(args), net=args.net,
            batch=args.batch, repeat=args.repeat, warmup=args.warmup, weights=args.weights, threads=threads,
            seed=args.seed, progress=not args.no_progress, unsplit_memory=_unsplit_memory(args), head=args.head,
            checkpoint=checkpoint,
        )
    finally:
        if temporary is not None and comm.Get_rank() == 0:
            import os
            import shutil

            shutil.rmtree(os.path.dirname(temporary), ignore_errors=True)
    if report is not None:
        print(report.table(), flush=True)
        if args.instructions:
            print("\n" + report.instruction_table(), flush=True)
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
