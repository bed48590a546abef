"""``aflkd experiment``: ``accuracy`` (the resumable edge-accuracy grid) and ``frozen-time`` (epoch time against n)."""
from __future__ import annotations

import argparse

from runtime.errors import UsageError

from . import options
from .train import load_teacher

__all__ = ["add_parser"]


def _methods(text: str) -> list[str]:
    from kd.trainer import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(METHODS)}")
    return methods


def add_parser(sub) -> None:
    experiment = sub.add_parser("experiment", help="experiment grids (single process)", description="Experiments.")
    what = experiment.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    experiment.set_defaults(func=lambda args: _help(experiment))

    acc = what.add_parser(
        "accuracy",
        help="edge accuracy grid: nets x sizes x methods x seeds (Table 2/3, Fig. 7); resumable",
        description="Train edge students on class-balanced, nested subsets of the training split and "
        "measure accuracy on the full test split. Finished cells are kept in OUT/accuracy-DATASET.csv and "
        "skipped on a rerun. Writes the CSV, a markdown table like the paper's Table 2 and a plot like Fig. 7. "
        "--out is required: a grid of many cells never starts into a folder you did not name.",
    )
    options.data_options(acc, teacher=True)
    acc.add_argument("--nets", type=options.edge_nets, default="1,2,3",
                     help="edge nets, e.g. 3,2,1 (or edge3,edge2,edge1)")
    acc.add_argument("--sizes", type=options.int_list, default="500,1000,2000,5000",
                     help="training-subset sizes (images)")
    acc.add_argument("--methods", type=_methods, default="baseline,sslf,aflkd,kd", help="methods to compare")
    acc.add_argument("--seeds", type=options.int_list, default="0", help="seeds (one cell per seed)")
    options.student_options(acc)
    acc.add_argument("--out", required=True, metavar="FOLDER",
                     help="folder for accuracy-DATASET.csv/.md/.png (created if missing; required)")
    acc.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    options.device_option(acc, "students train and the teacher runs")
    acc.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    acc.set_defaults(func=_accuracy)

    ft = what.add_parser(
        "frozen-time",
        help="AFLKD epoch time against the number n of frozen units (n = 0..m)",
        description="Trains AFLKD with n forced to 0..m and prints the median epoch time for each n: "
        "frozen units run without autograd, so epochs should get cheaper as n grows.",
    )
    options.data_options(ft, teacher=True)
    ft.add_argument("--net", type=options.edge_net, default=3, help="edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    ft.add_argument("--size", type=options.positive_int, default=2000, help="training images")
    ft.add_argument("--steps", type=options.positive_int, default=200, help="optimiser steps per value of n")
    ft.add_argument("--unit", default="conv", choices=["conv", "block"], help="what Eq. 17 counts as a layer")
    ft.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    ft.add_argument("--csv", default=None, metavar="FILE",
                    help="write the table as CSV (default: not written; folders are created)")
    options.device_option(ft, "students train and the teacher runs")
    ft.set_defaults(func=_frozen_time)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _accuracy(args) -> int:
    from kd.datasets import load_dataset
    from kd.device import pick_device
    from kd.experiments import (check_settings, file_digest, markdown_table, missing_cells, plot_accuracy,
                                read_results, run_grid)
    from kd.trainer import EdgeConfig

    folder = options.prepare_folder(args.out, "--out")
    data = load_dataset(args.dataset, args.data_root)
    options.check_student_options(args.sizes, data, "--sizes")
    teacher = load_teacher(args, data) if any(m != "baseline" for m in args.methods) else None
    base = EdgeConfig("baseline", 1, steps=args.steps, t_rule=args.t_rule, unit=args.unit)
    stem = str(folder / f"accuracy-{args.dataset}")
    digest = file_digest(options.teacher_path(args)) if teacher is not None else ""
    check_settings(stem + ".csv", base, digest)  # refused here, before the plan is printed
    todo = missing_cells(data.name, args.nets, args.sizes, args.methods, args.seeds, stem + ".csv")
    device = pick_device(args.device)
    teacher = teacher.to(device) if teacher is not None else None
    print(f"{len(todo)} cell(s) to train, {len(read_results(stem + '.csv'))} already in {stem}.csv "
          f"({args.steps} steps each)", flush=True)
    rows = run_grid(data, teacher, args.nets, args.sizes, args.methods, args.seeds, stem + ".csv", base,
                    progress=not args.no_progress, teacher_sha256=digest, device=device)
    if not rows:
        raise UsageError(f"no cells in {stem}.csv")
    table = markdown_table(rows, data.name)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n")
    plot_accuracy(rows, data.name, stem + ".png")
    print(table)
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return 0


def _frozen_time(args) -> int:
    import csv

    from kd.datasets import load_dataset
    from kd.device import pick_device
    from kd.experiments import epoch_time_by_frozen
    from kd.trainer import EdgeConfig

    options.prepare_output(args.csv, "--csv")
    data = load_dataset(args.dataset, args.data_root)
    options.check_student_options([args.size], data, "--size")
    teacher = load_teacher(args, data)
    device = pick_device(args.device)
    rows = epoch_time_by_frozen(data, teacher.to(device), args.net, args.size, args.steps,
                                EdgeConfig("aflkd", args.net), args.unit, device=device)
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
