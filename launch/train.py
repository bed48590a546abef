"""``aflkd train``: ``cloud`` (a teacher, resumable), ``average`` (SWA of saved teachers), ``select`` (the best
of saved teachers on the validation slice), ``edge`` (one student)."""
from __future__ import annotations

import argparse
import os

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from kd.config import TeacherConfig
    from kd.config import METHODS, EdgeConfig

    train = sub.add_parser("train", help="training (cloud, edge, average, select: one process; distill: under mpiexec)",
                           description="Training: the cloud teacher, edge students, and streamed distillation.")
    what = train.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    train.set_defaults(func=lambda args: _help(train))

    cloud = what.add_parser(
        "cloud",
        help="train the cloud (teacher) net; resumable",
        description="Train the cloud net on a dataset's training split with a one-cycle schedule. "
        "Checkpoints every epoch (OUT.state, written atomically) and resumes from it when run again "
        "with the same options; reports test accuracy on the full test split and records it in "
        "--results.",
    )
    options.data_options(cloud)
    cloud.add_argument("--download", action="store_true", help="let torchvision download missing files")
    cloud.add_argument("--save", default=None, metavar="FILE",
                       help="weights file (default: the shipped checkpoints/cloud-DATASET.pt; needs --force)")
    cloud.add_argument("--epochs", type=options.positive_int, default=TeacherConfig.epochs, help="training epochs")
    cloud.add_argument("--batch", type=options.positive_int, default=TeacherConfig.batch, help="images per step")
    cloud.add_argument("--max-lr", type=options.positive_float, default=TeacherConfig.max_lr,
                       help="peak learning rate of the one-cycle schedule")
    cloud.add_argument("--seed", type=int, default=TeacherConfig.seed, help="seed of weights and shuffling")
    cloud.add_argument("--init", default=TeacherConfig.init, metavar="PT",
                       help="start from these weights (a warm restart with a fresh one-cycle) "
                       "(default: random weights)")
    cloud.add_argument("--swa-epochs", type=options.non_negative_int, default=TeacherConfig.swa_epochs, metavar="K",
                       help="make the last K of --epochs stochastic weight averaging: constant --swa-lr, and OUT "
                       "holds the equal-weight average of the weights and BatchNorm statistics at the end of each")
    cloud.add_argument("--swa-lr", type=options.positive_float, default=TeacherConfig.swa_lr,
                       help="learning rate of the averaging epochs")
    cloud.add_argument("--val", type=options.non_negative_int, default=TeacherConfig.val, metavar="N",
                       help="hold out the fixed class-balanced validation slice of N training images (the one "
                       "'experiment accuracy --val N' holds out): train on the rest and report accuracy there (val_acc) "
                       "every epoch, for choosing checkpoints without the test split (0: train on the whole split)")
    cloud.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    cloud.add_argument("--results", default="out/teachers.csv",
                       help="where to record the test accuracy (the shipped teachers' rows are in the checkout's "
                       "results/teachers.csv)")
    cloud.add_argument("--force", action="store_true",
                       help="start over even if OUT exists without OUT.state (overwrites OUT)")
    options.device_option(cloud, "teacher trains")
    cloud.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    cloud.set_defaults(func=_cloud, one_process=True)

    average = what.add_parser(
        "average",
        help="average saved cloud nets' weights (SWA over the ends of warm restarts); no training",
        description="Average the weights and BatchNorm statistics of saved cloud nets with equal weight "
        "(stochastic weight averaging over the ends of a chain of 'train cloud --init' restarts), "
        "report the test accuracy of the average and record it in --results. The files "
        "must come from one chain: nets trained from different random starts are not expected to average "
        "into a working net.",
    )
    options.data_options(average)
    average.add_argument("weights", nargs="+", metavar="PT", help="cloud net weights files (two or more)")
    average.add_argument("--save", required=True, metavar="FILE", help="weights file of the average")
    average.add_argument("--val", type=options.non_negative_int, default=0, metavar="N",
                         help="also report the average's accuracy on the validation slice of N training images "
                         "(the one 'train cloud --val N' held out)")
    _saved_teacher_options(average, "average is tested")
    average.set_defaults(func=_average, one_process=True)

    select = what.add_parser(
        "select",
        help="copy the best of saved cloud nets on the validation slice to OUT; the test split read once",
        description="Evaluate each candidate cloud net on the validation slice of N training images (and on "
        "nothing else), copy the best (the first of equals) to OUT, evaluate OUT once on the test split and record "
        "it in --results with how it was selected. The candidates must not have trained on the slice: "
        "train them with 'train cloud --val N' (a candidate whose .state says another --val is refused).",
    )
    options.data_options(select)
    select.add_argument("weights", nargs="+", metavar="PT", help="candidate cloud net weights files")
    select.add_argument("--val", type=options.positive_int, required=True, metavar="N",
                        help="size of the validation slice the candidates were trained without")
    select.add_argument("--save", required=True, metavar="FILE", help="where the chosen weights are copied")
    _saved_teacher_options(select, "candidates are evaluated")
    select.set_defaults(func=_select, one_process=True)

    edge = what.add_parser(
        "edge",
        help="train one edge student (baseline, sslf, aflkd, kd or ctkd) from a cloud teacher",
        description="Train edge net K on a seeded, class-balanced subset of SIZE training images and "
        "report accuracy on the full test split. Prints, per epoch, the temperature T and the number n "
        "of frozen units (Eq. 17) so AFLKD's schedule can be watched.",
    )
    options.data_options(edge, teacher=True)
    edge.add_argument("--net", type=options.edge_net, default="edge3",
                        help="the edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    edge.add_argument("--size", type=options.positive_int, default=500, help="training images (class-balanced subset)")
    edge.add_argument("--method", default="aflkd", choices=METHODS, help="how the student is trained")
    options.student_options(edge)
    edge.add_argument("--seed", type=int, default=EdgeConfig.seed, help="seed of the subset, weights and batches")
    edge.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    edge.add_argument("--save", default=None, metavar="FILE", help="save the student's weights here (default: not saved)")
    options.device_option(edge, "student trains and the teacher runs")
    edge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    edge.set_defaults(func=_edge, one_process=True)

    from . import distill

    distill.add_parser(what)


def _saved_teacher_options(parser: argparse.ArgumentParser, tested: str) -> None:
    """--threads, --results, --force and --device of the commands that test saved teachers (average, select)."""
    parser.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--results", default="out/teachers.csv",
                        help="where to record the test accuracy (the shipped teachers' rows are in the checkout's "
                        "results/teachers.csv)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    options.device_option(parser, tested)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _cloud(args) -> int:
    from kd.datasets import DatasetNotFound, load_dataset
    from kd.device import pick_device
    from kd.teacher import SELECTED_BY_NONE, TeacherConfig, record_teacher, selected_by_val, train_teacher

    out = args.save or str(options.REPO / "checkpoints" / f"cloud-{args.dataset}.pt")
    if os.path.exists(out) and not os.path.exists(out + ".state") and not args.force:
        raise UsageError(f"{out} exists and there is no {out}.state to resume from; training would overwrite it "
                         "(a shipped teacher, by default): pass --save NEW.pt, or --force to overwrite")
    config = TeacherConfig(epochs=args.epochs, batch=args.batch, max_lr=args.max_lr, seed=args.seed,
                           init=args.init, swa_epochs=args.swa_epochs, swa_lr=args.swa_lr, val=args.val)
    options.prepare_output(out, "--save")
    options.prepare_output(args.results, "--results")
    try:
        data = load_dataset(args.dataset, args.data_root, args.download)
    except DatasetNotFound as err:
        raise UsageError(f"{err}, or pass --download to fetch it") from None
    device = pick_device(args.device)
    summary = train_teacher(data, out, config, progress=not args.no_progress, device=device)
    val_note = f", validation accuracy {summary['val_acc']:.2%} ({args.val} held out)" if args.val else ""
    print(f"{args.dataset}: test accuracy {summary['test_acc']:.2%}{val_note} after {summary['epochs']} epochs "
          f"on {summary['device']} -> {out}")
    record_teacher(args.results, args.dataset, summary["test_acc"], summary["epochs"], args.command_line,
                   summary["device"], selected_by_val(args.val) if args.val else SELECTED_BY_NONE,
                   summary["val_acc"] if args.val else None)
    return 0


def _average(args) -> int:
    from kd.datasets import load_dataset
    from kd.device import device_name, pick_device
    from kd.teacher import SELECTED_BY_NONE, average_teachers, record_teacher, selected_by_val

    if len(args.weights) < 2:
        raise UsageError(f"give at least two weights files to average, got {len(args.weights)}")
    if os.path.exists(args.save) and not args.force:
        raise UsageError(f"{args.save} exists (a shipped teacher?); pass another --save, or --force to overwrite it")
    options.prepare_output(args.save, "--save")
    options.prepare_output(args.results, "--results")
    data = load_dataset(args.dataset, args.data_root)
    device = pick_device(args.device)
    val_acc = None
    if args.val:
        accuracy, val_acc = average_teachers(data, args.weights, args.save, device=device, val=args.val)
    else:
        accuracy = average_teachers(data, args.weights, args.save, device=device)
    val_note = f", validation accuracy {val_acc:.2%} ({args.val} held out)" if args.val else ""
    print(f"{args.dataset}: average of {len(args.weights)} nets, test accuracy {accuracy:.2%}{val_note} -> {args.save}")
    record_teacher(args.results, args.dataset, accuracy, None, args.command_line,  # the chain's epochs: not known
                   device_name(device), selected_by_val(args.val) if args.val else SELECTED_BY_NONE, val_acc)
    return 0


def _select(args) -> int:
    from kd.datasets import load_dataset
    from kd.device import device_name, pick_device
    from kd.teacher import record_teacher, select_teacher

    if os.path.exists(args.save) and not args.force:
        raise UsageError(f"{args.save} exists (a shipped teacher?); pass another --save, or --force to overwrite it")
    missing = [p for p in args.weights if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"candidate '{missing[0]}' does not exist")
    options.prepare_output(args.save, "--save")
    options.prepare_output(args.results, "--results")
    data = load_dataset(args.dataset, args.data_root)
    device = pick_device(args.device)
    result = select_teacher(data, args.weights, args.save, args.val, device=device)
    for path, acc in result["val_acc"].items():
        print(f"{args.dataset}: {path}: validation accuracy {acc:.2%}" + ("  <- chosen" if path == result["chosen"] else ""))
    print(f"{args.dataset}: chose {result['chosen']} (validation {result['chosen_val_acc']:.2%} on {args.val} held-out "
          f"images), test accuracy {result['test_acc']:.2%} -> {args.save}")
    names = ", ".join(f"{os.path.basename(p)} {a:.4f}" for p, a in result["val_acc"].items())
    selected_by = (f"validation slice of {args.val}, best of {len(args.weights)} candidates: {names}; "
                   f"chose {os.path.basename(result['chosen'])}; the test split read once, after the choice")
    record_teacher(args.results, args.dataset, result["test_acc"], None, args.command_line, device_name(device),
                   selected_by, result["chosen_val_acc"])
    return 0


def _edge(args) -> int:
    from kd.datasets import balanced_subset, load_dataset
    from kd.device import device_name, pick_device
    from kd.trainer import EdgeConfig, train_edge
    from models import save_atomic

    config = EdgeConfig(args.method, args.net, steps=args.steps, t_rule=args.t_rule, unit=args.unit, seed=args.seed)
    options.prepare_output(args.save, "--save")
    data = load_dataset(args.dataset, args.data_root)
    options.check_student_options([args.size], data, "--size")
    teacher = options.load_teacher(args, data) if args.method != "baseline" else None
    device = pick_device(args.device)
    teacher = teacher.to(device) if teacher is not None else None
    idx = balanced_subset(data.y_train, args.size, data.classes, seed=args.seed)
    result = train_edge(config, data, idx, teacher, progress=not args.no_progress, device=device)
    print(f"{'epoch':>5} {'step':>5} {'T':>6} {'frozen n':>8} {'seconds':>8}")
    for i, h in enumerate(result.history, 1):
        print(f"{i:>5} {h['step']:>5} {h['T']:>6.3f} {h['frozen']:>8} {h['epoch_seconds']:>8.2f}")
    print(f"{args.dataset} edge net {args.net}, {args.method}, {args.size} images, {args.steps} steps: "
          f"test accuracy {result.test_acc:.2%} ({result.seconds:.0f} s on {device_name(device)})")
    if args.save:
        save_atomic({k: v.cpu() for k, v in result.model.state_dict().items()}, args.save)
        print(f"wrote {args.save}")
    return 0
