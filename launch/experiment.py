"""``aflkd experiment``: ``accuracy`` (the resumable edge-accuracy grid) and ``frozen-time`` (epoch time against n)."""
from __future__ import annotations

import argparse

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser"]


def _methods(text: str) -> list[str]:
    from kd.config import METHODS

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
    _budget_options(acc)
    acc.add_argument("--out", required=True, metavar="FOLDER",
                     help="folder for accuracy-DATASET.csv/.md/.png (created if missing; required)")
    _run_options(acc)
    acc.set_defaults(func=_accuracy, one_process=True)

    conv = what.add_parser(
        "converge",
        help="the convergence check: the grid at --epochs and at twice that, side by side",
        description="Trains the grid twice, at --epochs (and --min-steps) and at double both, into OUT/epochs-E and "
        "OUT/epochs-2E (each resumable), and writes OUT/convergence-DATASET.md: every cell's mean test accuracy at "
        "both budgets and the largest change. A schedule that has converged moves no cell by more than a point.",
    )
    options.data_options(conv, teacher=True)
    conv.add_argument("--nets", type=options.edge_nets, default="1,3", help="edge nets")
    conv.add_argument("--sizes", type=options.int_list, default="500,2000", help="training-subset sizes (images)")
    conv.add_argument("--methods", type=_methods, default="baseline,sslf,aflkd", help="methods")
    conv.add_argument("--seeds", type=options.int_list, default="0", help="seeds")
    _budget_options(conv, double=True)
    conv.add_argument("--out", required=True, metavar="FOLDER", help="folder for both grids and the table (required)")
    _run_options(conv)
    conv.set_defaults(func=_converge, one_process=True)

    tab = what.add_parser(
        "tables",
        help="one table per dataset from several grids: each method from the grid (budget) that converged it",
        description="Reads FOLDER/accuracy-DATASET.csv of each --grid FOLDER:METHODS, keeps those methods' cells "
        "(a cell found in two grids is refused) and writes OUT/accuracy-DATASET.csv (with a source column), .md "
        "(mean ± sd beside the paper's figure, the orderings, where each method came from with its settings, and "
        "the paper's cells still short of --min-seeds) and .png (±1 sd bands). Trains nothing.",
    )
    tab.add_argument("--dataset", required=True, choices=["cifar10", "cifar100", "fashion-mnist"])
    tab.add_argument("--grid", required=True, action="append", type=_grid_source, metavar="FOLDER:METHODS",
                     help="a grid folder and the methods taken from it, e.g. results/converged/epochs-60:baseline "
                     "(repeat for each grid)")
    tab.add_argument("--mode", default="incremental", choices=["incremental", "incremental-new", "static"],
                     help="the training mode whose cells are tabled")
    tab.add_argument("--min-seeds", type=options.positive_int, default=3,
                     help="seeds every paper cell should have; fewer are listed as missing")
    tab.add_argument("--out", required=True, metavar="FOLDER", help="folder for the combined CSV, table and plot")
    tab.set_defaults(func=_tables, one_process=True)

    ft = what.add_parser(
        "frozen-time",
        help="AFLKD epoch time against the number n of frozen units (n = 0..m)",
        description="Trains AFLKD with n forced to 0..m and prints the median epoch time for each n: "
        "frozen units run without autograd, so epochs should get cheaper as n grows.",
    )
    options.data_options(ft, teacher=True)
    ft.add_argument("--net", type=options.edge_net, default="edge3",
                        help="the edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    ft.add_argument("--size", type=options.positive_int, default=2000, help="training images")
    ft.add_argument("--steps", type=options.positive_int, default=200, help="optimiser steps per value of n")
    ft.add_argument("--unit", default="conv", choices=["conv", "block"], help="what Eq. 17 counts as a layer")
    ft.add_argument("--threads", type=options.threads, default=None, help="torch threads (default: all cores)")
    ft.add_argument("--csv", default=None, metavar="FILE",
                    help="write the table as CSV (default: not written; folders are created)")
    options.device_option(ft, "students train and the teacher runs")
    ft.set_defaults(func=_frozen_time, one_process=True)


def _grid_source(text: str) -> tuple[str, list[str]]:
    folder, sep, methods = text.rpartition(":")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"'{text}' is not FOLDER:METHODS (e.g. results/converged/epochs-60:baseline)")
    return folder, _methods(methods)


def _budget_options(parser, double: bool = False) -> None:
    """Student settings, the training budget and how cells run: shared by ``accuracy`` and ``converge``
    (``double``: the budget is the one the check doubles, so --epochs is required)."""
    options.student_options(parser)
    per_cell = "(a cell of N images runs max(--min-steps, epochs * N // 64) steps)"
    if double:
        parser.add_argument("--epochs", type=options.positive_float, required=True,
                            help=f"the budget to double: each cell trains this many epochs over its images, then "
                            f"twice that {per_cell} (required; --steps is not used)")
    else:
        parser.add_argument("--epochs", type=options.positive_float, default=None,
                            help=f"train each cell this many epochs over its images instead of a fixed --steps "
                            f"{per_cell} (default: none, --steps per cell)")
    parser.add_argument("--min-steps", type=options.non_negative_int, default=0,
                        help="with --epochs: the fewest steps any cell runs (tiny subsets)")
    parser.add_argument("--views", type=options.non_negative_int, default=0,
                        help="fixed augmented views per image; the teacher's logits are computed once per view "
                        "and looked up (0: fresh crops and flips every step, the teacher run every step)")
    parser.add_argument("--val", type=options.non_negative_int, default=0, metavar="N",
                        help="hold out a fixed class-balanced slice of N training images: no cell trains on it, "
                        "every cell reports accuracy there (val_acc) for choices that must not look at test")
    parser.add_argument("--mode", default="incremental", choices=["incremental", "incremental-new", "static"],
                        help="incremental (the paper's experiment: 500 initial images, then updates as data "
                        "arrives): size s trains from the student of the previous size, on all s images, with T "
                        "(so Eq. 17's n) carried over; incremental-new: the same on the new images only (Alg. 2 "
                        "read literally); static: every size trained from its start")


def _run_options(parser) -> None:
    parser.add_argument("--workers", type=options.positive_int, default=1,
                        help="train cells in this many processes at once (each with --threads threads)")
    parser.add_argument("--threads", type=options.threads, default=None,
                        help="torch threads per process (default: the cores divided among --workers)")
    options.device_option(parser, "students train and the teacher runs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _grid_options(args):
    from kd.experiments import GridOptions

    if args.epochs is None and args.min_steps:
        raise UsageError("--min-steps needs --epochs (with a fixed --steps every cell runs exactly that many)")
    return GridOptions(epochs=args.epochs, min_steps=args.min_steps, views=args.views, val_size=args.val,
                       mode=args.mode, workers=args.workers, threads=args.threads)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run_grid(args, folder, grid_options) -> tuple[list, str]:
    """One grid into ``folder``: refused settings and bad sizes before any training; returns (rows, CSV stem)."""
    from kd.datasets import load_dataset
    from kd.device import pick_device
    from kd.experiments import chain_of, check_settings, file_digest, missing_cells, read_results, run_grid
    from kd.config import EdgeConfig

    data = load_dataset(args.dataset, args.data_root)
    options.check_student_options([s + grid_options.val_size for s in args.sizes], data,
                                  "--sizes (plus --val)" if grid_options.val_size else "--sizes")
    teacher = options.load_teacher(args, data) if any(m != "baseline" for m in args.methods) else None
    base = EdgeConfig("baseline", 1, steps=args.steps, t_rule=args.t_rule, unit=args.unit)
    stem = str(folder / f"accuracy-{args.dataset}")
    digest = file_digest(options.teacher_path(args)) if teacher is not None else ""
    check_settings(stem + ".csv", base, digest, grid_options, chain_of(grid_options, args.sizes))  # refused here, before the plan is printed
    todo = missing_cells(data.name, args.nets, args.sizes, args.methods, args.seeds, stem + ".csv", grid_options.mode)
    device = pick_device(args.device)
    teacher = teacher.to(device) if teacher is not None else None
    budget = (f"{args.steps} steps each" if grid_options.epochs is None else
              ", ".join(f"{s} images: {grid_options.steps_for(base, s)} steps" for s in args.sizes))
    print(f"{len(todo)} cell(s) to train ({grid_options.mode}), {len(read_results(stem + '.csv'))} already in "
          f"{stem}.csv; {budget}", flush=True)
    rows = run_grid(data, teacher, args.nets, args.sizes, args.methods, args.seeds, stem + ".csv", base,
                    progress=not args.no_progress, teacher_sha256=digest, device=device, options=grid_options)
    if not rows:
        raise UsageError(f"no cells in {stem}.csv")
    return rows, stem


def _accuracy(args) -> int:
    from kd.grid_report import markdown_table, ordering_report, plot_accuracy

    folder = options.prepare_folder(args.out, "--out")
    grid_options = _grid_options(args)
    rows, stem = _run_grid(args, folder, grid_options)
    text = []
    for mode in sorted({r.get("mode") or "static" for r in rows}):
        text += [f"### {args.dataset}, {mode}: test accuracy %, mean ± sd over seeds (the paper's figure)", "",
                 markdown_table(rows, args.dataset, mode), "", "Orderings on means:", "",
                 ordering_report(rows, args.dataset, mode), ""]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(text))
    modes = sorted({r.get("mode") or "static" for r in rows})
    plot_accuracy(rows, args.dataset, stem + ".png", mode=grid_options.mode if len(modes) > 1 else None)
    for mode in modes if len(modes) > 1 else []:  # a folder holding several modes: one plot each as well
        plot_accuracy(rows, args.dataset, f"{stem}-{mode}.png", mode=mode,
                      title=f"{args.dataset}, {mode}: edge accuracy against training-set size")
    print("\n".join(text))
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png" + "".join(f", {stem}-{m}.png" for m in modes if len(modes) > 1))
    return 0


def _converge(args) -> int:
    """The grid at --epochs and at twice that, side by side: a schedule has converged if doubling moves no cell much."""
    from dataclasses import replace

    from kd.grid_report import budget_comparison

    folder = options.prepare_folder(args.out, "--out")
    grid_options = _grid_options(args)
    doubled = replace(grid_options, epochs=2 * grid_options.epochs, min_steps=2 * grid_options.min_steps)
    rows, _ = _run_grid(args, folder / f"epochs-{args.epochs:g}", grid_options)
    rows2, _ = _run_grid(args, folder / f"epochs-{2 * args.epochs:g}", doubled)
    def this_grid(row_list):  # the folder may hold other seeds, modes or cells (a larger grid): compare these only
        return [r for r in row_list if int(r["seed"]) in args.seeds and (r.get("mode") or "static") == args.mode
                and int(r["net"]) in args.nets and int(r["size"]) in args.sizes and r["method"] in args.methods]

    table, worst = budget_comparison(this_grid(rows), this_grid(rows2), args.dataset)
    text = (f"{args.dataset}: accuracy % (validation slice where the grid holds one) at {args.epochs:g} epochs (min {args.min_steps} steps) and at twice "
            f"that, mean over seeds {','.join(map(str, args.seeds))}\n\n{table}\n\nlargest change: {worst:.1f} points\n")
    path = folder / f"convergence-{args.dataset}.md"
    path.write_text(text)
    print(text + f"wrote {path}")
    return 0


def _tables(args) -> int:
    import json
    from pathlib import Path

    from kd.experiments import FIELDS, read_results
    from kd.grid_report import (combine_grids, markdown_table, missing_paper_cells, ordering_report,
                                plot_accuracy)
    from kd.paper_tables import TABLE_OF

    grids, notes = [], []
    for folder, methods in args.grid:
        csv_path = Path(folder) / f"accuracy-{args.dataset}.csv"
        if not csv_path.is_file():
            raise UsageError(f"--grid {folder}: no {csv_path.name} there")
        rows = [r for r in read_results(str(csv_path)) if (r.get("mode") or "static") == args.mode]
        settings_path = csv_path.with_suffix(".settings.json")
        kept = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        said = ", ".join(f"{k} {kept[k]}" for k in ("epochs", "min_steps", "views", "val_size", "teacher_sha256")
                         if kept.get(k) not in (None, ""))
        notes.append(f"- {', '.join(methods)}: `{csv_path}` ({said or 'no settings file'})")
        grids.append((folder, methods, rows))
    try:
        rows = combine_grids(grids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not rows:
        raise UsageError(f"no {args.mode} cells of {args.dataset} in those grids")
    folder = options.prepare_folder(args.out, "--out")
    stem = folder / f"accuracy-{args.dataset}"
    import csv

    with open(f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS + ["source"], restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    methods = [m for _, ms in args.grid for m in ms]
    missing = missing_paper_cells(rows, args.dataset, methods, args.min_seeds, args.mode)
    command = "aflkd experiment tables --dataset {} {} --mode {} --min-seeds {} --out {}".format(
        args.dataset, " ".join(f"--grid {f}:{','.join(ms)}" for f, ms in args.grid), args.mode, args.min_seeds, args.out)
    text = [f"### {args.dataset}, {args.mode}: test accuracy %, mean ± sd over seeds (the paper's "
            f"{TABLE_OF[args.dataset]} in brackets)", "", f"Made by `{command}` from:", "", *notes, "",
            markdown_table(rows, args.dataset, args.mode), "", "Orderings on means:", "",
            ordering_report(rows, args.dataset, args.mode), ""]
    if missing:
        text += [f"The paper's cells with fewer than {args.min_seeds} seeds ({len(missing)}): " + "; ".join(
            f"{m} net {n} at {s} ({k})" for m, n, s, k in missing), ""]
    else:
        text += [f"Every cell of the paper's {TABLE_OF[args.dataset]} ({', '.join(methods)}) has {args.min_seeds} seeds.", ""]
    Path(f"{stem}.md").write_text("\n".join(text))
    plot_accuracy(rows, args.dataset, f"{stem}.png", mode=args.mode,
                  title=f"{args.dataset}, {args.mode}: mean ± 1 sd over seeds (cf. the paper's {TABLE_OF[args.dataset]})")
    print("\n".join(text))
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")
    return 0


def _frozen_time(args) -> int:
    import csv

    from kd.datasets import load_dataset
    from kd.device import pick_device
    from kd.experiments import epoch_time_by_frozen
    from kd.config import EdgeConfig

    options.prepare_output(args.csv, "--csv")
    data = load_dataset(args.dataset, args.data_root)
    options.check_student_options([args.size], data, "--size")
    teacher = options.load_teacher(args, data)
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
