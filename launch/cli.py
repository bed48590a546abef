"""``aflkd``: the command line of aflkd-runtime.

Run MPI commands under ``mpiexec -n P aflkd ...``; every rank parses the same
arguments, rank 0 prints.  Bad input prints one ``aflkd: error: ...`` line and
every rank exits with status 2; an unexpected exception on any rank aborts the
whole job (no rank waits forever for a dead peer).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from runtime.errors import UsageError

__all__ = ["main"]

EXAMPLES = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd bench layers --net edge3 --size 224 --repeat 20
  .venv/bin/mpiexec -n 3 .venv/bin/aflkd bench layers --net edge3 --weights 2,1,1 --json out/bench.json --plot out/fig10.png
  .venv/bin/aflkd bench train-step --threads 2    # teacher training images/s before a long run
  .venv/bin/aflkd test                    # serial tests, then MPI tests at 2, 3 and 4 ranks
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as UsageError (printed once, on rank 0)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def print_help(self, file=None):
        if _rank() == 0:
            super().print_help(file)


def _weights(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers like 2,1,1, got '{text}'") from None
    return values


def _data_options(parser: argparse.ArgumentParser, teacher: bool = False) -> None:
    """--dataset and --data-root (and --teacher), shared by the training commands."""
    parser.add_argument("--dataset", required=True, help="cifar10, cifar100 or fashion-mnist")
    parser.add_argument("--data-root", default="../shared/data", help="folder with the dataset files")
    if teacher:
        parser.add_argument("--teacher", default=None, help="cloud checkpoint (default checkpoints/cloud-DATASET.pt)")


def _student_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """--steps, --t-rule and --unit, shared by the edge-training commands."""
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps per student")
    parser.add_argument("--t-rule", default="reversal", choices=["reversal", "descent"],
                        help="how AFLKD learns T (descent: the paper's Eq. 5; reversal: curriculum)")
    parser.add_argument("--unit", default="conv", choices=["conv", "block"], help="what Eq. 17 counts as a layer")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aflkd",
        description="aflkd-runtime: split inference over MPI and AFLKD edge distillation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    bench = sub.add_parser("bench", help="benchmarks (layers: under mpiexec; train-step: one process)", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    layers = bench_sub.add_parser(
        "layers",
        help="per-layer timing of split vs unsplit inference (the paper's Fig. 10)",
        description=(
            "Per-layer timing of height-split inference.  Run under 'mpiexec -n P'.  Prints, "
            "measured in the same run: the conv stack unsplit on one rank, split over P ranks, "
            "and the bound (P ranks each running only their own rows at once, no exchange); "
            "efficiency = bound / split.  Times are medians after warm-up."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    layers.add_argument("--net", default="edge3", help="edge1, edge2, edge3 or cloud")
    layers.add_argument("--size", type=int, default=224, help="input height and width")
    layers.add_argument("--batch", type=int, default=1, help="images per pass")
    layers.add_argument("--in-channels", type=int, default=3, help="1 for Fashion-MNIST, 3 for CIFAR")
    layers.add_argument("--classes", type=int, default=10, help="output classes of the head")
    layers.add_argument("--repeat", type=int, default=20, help="timed repetitions (median taken)")
    layers.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    layers.add_argument("--weights", default=None,
                        help="per-rank share of the rows, e.g. 2,1,1 for a Jetson beside two Pis (default even)")
    layers.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: this host's cores / ranks on this host)")
    layers.add_argument("--checkpoint", default=None, help="weights to load on rank 0 (default: seeded random)")
    layers.add_argument("--seed", type=int, default=0, help="seed of random weights and input")
    layers.add_argument("--csv", default=None, metavar="FILE", help="write the per-layer table as CSV")
    layers.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    layers.add_argument("--plot", default=None, metavar="PNG", help="draw per-layer bars, split vs unsplit")
    layers.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    step = bench_sub.add_parser(
        "train-step",
        help="images/s of one teacher-training step (pick threads, batch, torch.compile before a long run)",
        description="Times the cloud net's training step (forward, backward, SGD; channels-last, "
        "the recipe of 'train cloud') on random data in one process and prints the median "
        "images/s.  Run it once per setting to compare, on an otherwise idle machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    step.add_argument("--classes", type=int, default=10, help="10 for CIFAR-10/Fashion-MNIST, 100 for CIFAR-100")
    step.add_argument("--in-channels", type=int, default=3, help="1 for Fashion-MNIST, 3 for CIFAR")
    step.add_argument("--batch", type=int, default=128)
    step.add_argument("--steps", type=int, default=15, help="timed steps (median taken)")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    step.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    step.add_argument("--compile", action="store_true", help="wrap the net in torch.compile")

    train = sub.add_parser("train", help="training (single process)", description="Training.")
    train_sub = train.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    cloud = train_sub.add_parser(
        "cloud",
        help="train the cloud (teacher) net; resumable",
        description="Train the cloud net on a dataset's training split with a one-cycle schedule. "
        "Checkpoints every epoch (OUT.state, written atomically) and resumes from it when run again "
        "with the same options; reports test accuracy on the full test split and records it in "
        "results/teachers.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(cloud)
    cloud.add_argument("--download", action="store_true", help="let torchvision download missing files")
    cloud.add_argument("--out", default=None, help="weights file (default checkpoints/cloud-DATASET.pt)")
    cloud.add_argument("--epochs", type=int, default=18)
    cloud.add_argument("--batch", type=int, default=128)
    cloud.add_argument("--max-lr", type=float, default=0.1)
    cloud.add_argument("--seed", type=int, default=0)
    cloud.add_argument("--init", default="", metavar="PT",
                       help="start from these weights (a warm restart with a fresh one-cycle) instead of random ones")
    cloud.add_argument("--swa-epochs", type=int, default=0, metavar="K",
                       help="make the last K of --epochs stochastic weight averaging: constant --swa-lr, and OUT "
                       "holds the equal-weight average of the weights and BatchNorm statistics at the end of each")
    cloud.add_argument("--swa-lr", type=float, default=0.01, help="learning rate of the averaging epochs")
    cloud.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    cloud.add_argument("--results", default="results/teachers.csv", help="where to record the test accuracy")
    cloud.add_argument("--force", action="store_true",
                       help="start over even if OUT exists without OUT.state (overwrites OUT)")
    cloud.add_argument("--no-progress", action="store_true")

    average = train_sub.add_parser(
        "average",
        help="average saved cloud nets' weights (SWA over the ends of warm restarts); no training",
        description="Average the weights and BatchNorm statistics of saved cloud nets with equal weight "
        "(stochastic weight averaging over the ends of a chain of 'train cloud --init' restarts), "
        "report the test accuracy of the average and record it in results/teachers.csv. The files "
        "must come from one chain: nets trained from different random starts are not expected to average into a working net.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(average)
    average.add_argument("weights", nargs="+", metavar="PT", help="cloud net weights files (two or more)")
    average.add_argument("--out", required=True, help="weights file of the average")
    average.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    average.add_argument("--results", default="results/teachers.csv", help="where to record the test accuracy")
    average.add_argument("--force", action="store_true", help="overwrite OUT if it exists")

    edge = train_sub.add_parser(
        "edge",
        help="train one edge student (baseline, sslf, aflkd, kd or ctkd) from a cloud teacher",
        description="Train edge net K on a seeded, class-balanced subset of SIZE training images and "
        "report accuracy on the full test split. Prints, per epoch, the temperature T and the number n "
        "of frozen units (Eq. 17) so AFLKD's schedule can be watched.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(edge, teacher=True)
    edge.add_argument("--net", type=int, default=2, help="edge net 1, 2 or 3")
    edge.add_argument("--size", type=int, default=500, help="training images (class-balanced subset)")
    edge.add_argument("--method", default="aflkd", help="baseline, sslf, aflkd, kd or ctkd")
    _student_options(edge, steps=200)
    edge.add_argument("--seed", type=int, default=0)
    edge.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    edge.add_argument("--out", default=None, help="save the student's weights here")
    edge.add_argument("--no-progress", action="store_true")

    experiment = sub.add_parser("experiment", help="experiment grids (single process)", description="Experiments.")
    exp_sub = experiment.add_subparsers(dest="what", metavar="WHAT", parser_class=_Parser)
    acc = exp_sub.add_parser(
        "accuracy",
        help="edge accuracy grid: nets x sizes x methods x seeds (Table 2/3, Fig. 7); resumable",
        description="Train edge students on class-balanced, nested subsets of the training split and "
        "measure accuracy on the full test split. Finished cells are kept in the CSV and skipped on a "
        "rerun. Writes CSV, a markdown table like the paper's Table 2 and a plot like Fig. 7.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(acc, teacher=True)
    acc.add_argument("--nets", default="1,2,3")
    acc.add_argument("--sizes", default="500,1000,2000,5000")
    acc.add_argument("--methods", default="baseline,sslf,aflkd,kd")
    acc.add_argument("--seeds", default="0")
    _student_options(acc, steps=1500)
    acc.add_argument("--out", default="results", help="folder for accuracy-DATASET.csv/.md/.png")
    acc.add_argument("--threads", type=int, default=None)
    acc.add_argument("--no-progress", action="store_true")

    ft = exp_sub.add_parser(
        "frozen-time",
        help="AFLKD epoch time against the number n of frozen units (n = 0..m)",
        description="Trains AFLKD with n forced to 0..m and prints the median epoch time for each n: "
        "frozen units run without autograd, so epochs should get cheaper as n grows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(ft, teacher=True)
    ft.add_argument("--net", type=int, default=3)
    ft.add_argument("--size", type=int, default=2000, help="training images")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--unit", default="conv", choices=["conv", "block"])
    ft.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ft.add_argument("--csv", default=None, metavar="FILE")

    test = sub.add_parser(
        "test",
        help="run the whole test suite (serial, then MPI at several sizes)",
        description="Serial tests with pytest, then MPI tests under mpiexec at each size; "
        "prints how many tests ran at each size and exits non-zero if any rank failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    test.add_argument("--sizes", default="2,3,4", help="MPI sizes to run the MPI tests at")
    test.add_argument("--timeout", type=int, default=1200, help="seconds before one pytest run is killed")
    test.add_argument("--logs", default="out/test-logs", help="folder for per-rank logs and JUnit XML")
    test.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser


def _bench_layers(args) -> int:
    import torch
    from mpi4py import MPI

    from models import build_net, load_weights, randomize_batchnorm
    from runtime.benchmark import bench_layers
    from runtime.comm import abort_on_uncaught_exception

    from .ranks import default_threads, on_root_then_bcast, set_threads

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    if args.repeat < 1 or args.warmup < 0 or args.batch < 1:
        raise UsageError("--repeat and --batch must be >= 1 and --warmup >= 0")
    threads = args.threads or default_threads(comm)
    set_threads(threads)
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
    model.eval().to(memory_format=torch.channels_last)

    image = None
    if comm.Get_rank() == 0:
        image = torch.randn(args.batch, args.in_channels, args.size, args.size,
                            generator=torch.Generator().manual_seed(args.seed + 1))
    report = bench_layers(
        comm, model, image, net=args.net, batch=args.batch, repeat=args.repeat, warmup=args.warmup,
        weights=_weights(args.weights), threads=threads, progress=not args.no_progress,
    )
    if report is not None:
        print(report.table(), flush=True)
        for path, write in ((args.csv, report.to_csv), (args.json, report.to_json), (args.plot, report.plot)):
            if path:
                write(path)
                print(f"wrote {path}")
    return 0


def _bench_train_step(args) -> int:
    import torch

    from kd.teacher import step_throughput
    from models import cloud_net

    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        raise UsageError("--batch and --steps must be >= 1 and --warmup >= 0")
    torch.manual_seed(0)
    r = step_throughput(cloud_net(args.in_channels, 32, args.classes), (args.in_channels, 32, 32), args.classes,
                        args.batch, args.steps, args.warmup, args.compile)
    print(f"cloud net training step, batch {r['batch']}, {r['threads']} thread(s), "
          f"{'torch.compile' if r['compile'] else 'eager'}: median {1000 * r['median_s']:.0f} ms "
          f"= {r['images_per_s']:.0f} images/s ({args.steps} steps; warm-up {r['warmup_s']:.1f} s)")
    return 0


def _train_cloud(args) -> int:
    from kd.datasets import load_dataset
    from kd.teacher import TeacherConfig, record_teacher, train_teacher

    if args.epochs < 1 or args.batch < 1:
        raise UsageError("--epochs and --batch must be >= 1")
    if not args.max_lr > 0:
        raise UsageError(f"--max-lr must be > 0, got {args.max_lr}")
    out = args.out or f"checkpoints/cloud-{args.dataset}.pt"
    if os.path.exists(out) and not os.path.exists(out + ".state") and not args.force:
        raise UsageError(f"{out} exists and there is no {out}.state to resume from; training would overwrite it "
                         "(a shipped teacher, by default): pass --out NEW.pt, or --force to overwrite")
    config = TeacherConfig(epochs=args.epochs, batch=args.batch, max_lr=args.max_lr, seed=args.seed,
                           init=args.init, swa_epochs=args.swa_epochs, swa_lr=args.swa_lr)
    data = load_dataset(args.dataset, args.data_root, args.download)
    summary = train_teacher(data, out, config, progress=not args.no_progress)
    print(f"{args.dataset}: test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs -> {out}")
    record_teacher(args.results, args.dataset, summary["test_acc"], summary["epochs"], args.command_line)
    return 0


def _train_average(args) -> int:
    from kd.datasets import load_dataset
    from kd.teacher import average_teachers, record_teacher

    if len(args.weights) < 2:
        raise UsageError(f"give at least two weights files to average, got {len(args.weights)}")
    if os.path.exists(args.out) and not args.force:
        raise UsageError(f"{args.out} exists (a shipped teacher?); pass another --out, or --force to overwrite it")
    data = load_dataset(args.dataset, args.data_root)
    accuracy = average_teachers(data, args.weights, args.out)
    print(f"{args.dataset}: average of {len(args.weights)} nets, test accuracy {accuracy:.4f} -> {args.out}")
    record_teacher(args.results, args.dataset, accuracy, None, args.command_line)  # the epochs are the chain's, not known here
    return 0


def _teacher_path(args) -> str:
    return args.teacher or f"checkpoints/cloud-{args.dataset}.pt"


def _load_teacher(args, data):
    """The cloud net from --teacher (default checkpoints/cloud-DATASET.pt), in eval mode."""
    from models import cloud_net, load_weights

    path = _teacher_path(args)
    return load_weights(cloud_net(data.channels, 32, data.classes), path,
                        f"--teacher must be a cloud net trained on {data.name}").eval()


def _check_student_options(steps: int, nets: Sequence[int], sizes: Sequence[int], data, size_option: str) -> None:
    """Refuse bad --steps/--net(s)/--size(s) before any training, not hours into a grid."""
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    bad_nets = [n for n in nets if n not in (1, 2, 3)]
    if bad_nets:
        raise UsageError(f"edge net must be 1, 2 or 3, got {', '.join(map(str, bad_nets))}")
    lo, hi = data.classes, len(data.y_train)
    bad_sizes = [n for n in sizes if not lo <= n <= hi]
    if bad_sizes:
        raise UsageError(f"{size_option} must be between {lo} (one image per class) and {hi} (the training split), "
                         f"got {', '.join(map(str, bad_sizes))}")


def _train_edge(args) -> int:
    from kd.datasets import balanced_subset, load_dataset
    from kd.trainer import EdgeConfig, train_edge
    from models import save_atomic

    config = EdgeConfig(args.method, args.net, steps=args.steps, t_rule=args.t_rule, unit=args.unit, seed=args.seed)
    data = load_dataset(args.dataset, args.data_root)
    _check_student_options(args.steps, [args.net], [args.size], data, "--size")
    teacher = _load_teacher(args, data) if args.method != "baseline" else None
    idx = balanced_subset(data.y_train, args.size, data.classes, seed=args.seed)
    result = train_edge(config, data, idx, teacher, progress=not args.no_progress)
    print(f"{'epoch':>5} {'step':>5} {'T':>6} {'frozen n':>8} {'seconds':>8}")
    for i, h in enumerate(result.history, 1):
        print(f"{i:>5} {h['step']:>5} {h['T']:>6.3f} {h['frozen']:>8} {h['epoch_seconds']:>8.2f}")
    print(f"{args.dataset} edge net {args.net}, {args.method}, {args.size} images, {args.steps} steps: "
          f"test accuracy {result.test_acc:.4f} ({result.seconds:.0f} s)")
    if args.out:
        save_atomic(result.model.state_dict(), args.out)
        print(f"wrote {args.out}")
    return 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated integers, got '{text}'") from None


def _experiment_accuracy(args) -> int:
    from kd.datasets import load_dataset
    from kd.experiments import file_digest, markdown_table, plot_accuracy, run_grid
    from kd.trainer import METHODS, EdgeConfig

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    nets, sizes, seeds = (_int_list(args.nets, "--nets"), _int_list(args.sizes, "--sizes"),
                          _int_list(args.seeds, "--seeds"))
    data = load_dataset(args.dataset, args.data_root)
    _check_student_options(args.steps, nets, sizes, data, "--sizes")
    teacher = _load_teacher(args, data) if any(m != "baseline" for m in methods) else None
    base = EdgeConfig("baseline", 1, steps=args.steps, t_rule=args.t_rule, unit=args.unit)
    stem = f"{args.out}/accuracy-{args.dataset}"
    digest = file_digest(_teacher_path(args)) if teacher is not None else ""
    rows = run_grid(data, teacher, nets, sizes, methods, seeds, stem + ".csv", base, progress=not args.no_progress,
                    teacher_sha256=digest)
    table = markdown_table(rows, args.dataset)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n")
    plot_accuracy(rows, args.dataset, stem + ".png")
    print(table)
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return 0


def _frozen_time(args) -> int:
    import csv

    from kd.datasets import load_dataset
    from kd.experiments import epoch_time_by_frozen
    from kd.trainer import EdgeConfig

    data = load_dataset(args.dataset, args.data_root)
    _check_student_options(args.steps, [args.net], [args.size], data, "--size")
    teacher = _load_teacher(args, data)
    rows = epoch_time_by_frozen(data, teacher, args.net, args.size, args.steps, EdgeConfig("aflkd", args.net),
                                args.unit)
    print(f"{'frozen n':>8} {'of m':>5} {'epoch s (median)':>17}")
    for r in rows:
        print(f"{r['frozen']:>8} {r['units']:>5} {r['epoch_seconds']:>17.3f}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def _test(args) -> int:
    from .testsuite import run_suite

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        raise UsageError(f"--sizes must be comma-separated integers like 2,3,4, got '{args.sizes}'") from None
    return run_suite(sizes, args.pytest_args, args.logs, args.timeout)


def _rank() -> int:
    """This process's MPI rank without initialising MPI (so 'aflkd test' can spawn mpiexec)."""
    import os

    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _apply_threads(args) -> None:
    """Check --threads and, for single-process commands, set torch's thread count once here.

    ``bench layers`` is left alone: its default depends on how many ranks share a host.
    """
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if not (args.command == "bench" and args.what == "layers"):
        import torch

        torch.set_num_threads(threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # recorded beside results as the command that made them
        args.command_line = "aflkd " + shlex.join(sys.argv[1:] if argv is None else argv)
        _apply_threads(args)
        if args.command == "bench" and args.what == "layers":
            return _bench_layers(args)
        if args.command == "bench" and args.what == "train-step":
            return _bench_train_step(args)
        if args.command == "train" and args.what == "cloud":
            return _train_cloud(args)
        if args.command == "train" and args.what == "average":
            return _train_average(args)
        if args.command == "train" and args.what == "edge":
            return _train_edge(args)
        if args.command == "experiment" and args.what == "accuracy":
            return _experiment_accuracy(args)
        if args.command == "experiment" and args.what == "frozen-time":
            return _frozen_time(args)
        if args.command == "test":
            return _test(args)
        if _rank() == 0:
            choices = parser._subparsers._group_actions[0].choices
            (choices[args.command] if args.command in ("bench", "train", "experiment") else parser).print_help()
        return 2
    except UsageError as err:
        if _rank() == 0:
            print(f"aflkd: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
