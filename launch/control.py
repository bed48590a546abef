"""``aflkd control``: the same streamed distillation under each core-allocation policy, repeated and interleaved.

Under ``mpiexec -n 2`` or more (rank 0 the cloud, every other rank an edge): the same student
(net, seed, subset, steps, batches) is trained once per policy per repeat --
``none``, ``priority``, ``planner``, and ``static`` (every fixed split
``static:1`` .. ``static:C-1``, the best of which is reported as the static
best) -- in ONE job, each run opening its own stream, the policies taken in a
rotated order each repeat so that drift of the machine falls on all of them.
Every policy runs the same threads (scheduling/controller.py); each rank keeps
to its own block of the host's CPUs, so the cloud has cores of its own.

Printed and written (``--json``, ``--plot``): per policy the median over repeats
of the mean step time with its spread (min..max), the speed-up against
``none`` and ``priority``, and the mean Forward, Backward, communication
(encode + upload + receive) and wait times per step.  With ``--upload raw|jpeg``
communication is the frame upload of :mod:`kd.frames` (MB per batch, encoding
on the edge's cores), the load the edge-KD paper schedules; without it, only the
teacher's logits travel (KB per batch: nearly free).
"""
from __future__ import annotations

import json
import os
import statistics
import sys

from runtime.errors import UsageError

from . import options
from .distill import control_cost, frame_format, frame_options, run_kd_job

__all__ = ["add_parser", "expand_policies", "summarise"]

#: per step, on the edge: computation (forward, backward), computation held while communication ran alone
#: first, computation idle waiting for logits; communication's CPU part (encode, send) and its wait on the cloud
PHASES = ("forward_s", "backward_s", "first_s", "wait_s", "comm_s", "remote_s")

EPILOG = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd control --dataset cifar10 --net 3 --size 500 --steps 200 \\
      --upload jpeg --frame-size 224 --repeats 5 --json out/control.json --plot out/control.png
"""


def expand_policies(text: str, cores: int) -> list[str]:
    """The policies of ``--policies``: names, ``static:C``, and ``static`` for every split 1..cores-1."""
    from scheduling.policies import POLICIES, parse_policy

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "static":
            out += [f"static:{c}" for c in range(1, cores)]
            continue
        try:
            c = parse_policy(item)
        except UsageError:
            raise UsageError(f"--policies {text!r}: give a comma list of {', '.join(POLICIES)}, static (every "
                             "fixed split) or static:C") from None
        if c is not None and not 1 <= c < cores:
            from scheduling.controller import static_split_problem

            raise UsageError(static_split_problem(f"--policies {item}", cores))
        out.append(item)
    if not out:
        raise UsageError(f"--policies {text!r}: no policy to run (static alone has no split on {cores} core)")
    return list(dict.fromkeys(out))


def add_parser(sub) -> None:
    from kd.config import METHODS

    p = sub.add_parser("control", help="step times of a streamed run under each core-allocation policy, repeated "
                       "and interleaved (mpiexec -n 2 or more: a cloud and edges)", description=__doc__, epilog=EPILOG,
                       formatter_class=options.ExamplesFormatter)
    options.data_options(p, teacher=True)
    p.add_argument("--net", type=options.edge_net, default="edge3",
                   help="edge net the edge rank trains: 1, 2 or 3 (or edge1, edge2, edge3)")
    p.add_argument("--size", type=options.positive_int, default=500, help="training images of the edge")
    p.add_argument("--steps", type=options.positive_int, default=200, help="optimiser steps per run")
    p.add_argument("--repeats", type=options.positive_int, default=5,
                   help="runs per policy, interleaved (the order rotates each repeat)")
    p.add_argument("--method", default="aflkd", choices=METHODS, help="how the student is trained")
    p.add_argument("--seed", type=options.non_negative_int, default=0, help="seed of subset, weights and batches")
    p.add_argument("--control-cores", type=options.positive_int, default=None,
                   help="cores the controller divides on the edge (default: this rank's share of the host)")
    p.add_argument("--constants", default=None, metavar="FILE", help="f, g constants from 'aflkd schedule profile' "
                   "for the planner (default: the ideal model, calibrated by the first re-plan)")
    p.add_argument("--policies", default="none,priority,planner,static",
                   help="policies: none, priority, planner, static:C, or static for every fixed split")
    frame_options(p)
    options.device_option(p, "cloud rank runs the teacher (the edge trains on its CPU)")
    p.add_argument("--timeout", type=options.positive_float, default=120.0, help="seconds a rank waits for its peer")
    p.add_argument("--json", default=None, metavar="FILE", help="write every run and the summary as JSON "
                   "(default: not written)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw step times per policy and their phases "
                   "(default: not drawn)")
    p.set_defaults(func=_control, sets_own_threads=True)


def _control(args) -> int:
    return run_kd_job(_run, args)


def run_row(policy: str, repeat: int, ctl, result, source) -> dict:
    """One run's figures from the controller's per-step log (times measured on the edge's trainer thread)."""
    log = ctl.log
    steps = len(log)
    mean = {k: sum(r[k] for r in log) / max(1, steps) for k in PHASES}
    wall = [r["forward_s"] + r["first_s"] + r["wait_s"] + r["backward_s"] for r in log]
    return {"policy": policy, "repeat": repeat, "steps": steps, "train_s": sum(h["epoch_seconds"] for h in result.history),
            "mean_step_s": sum(wall) / max(1, steps), "median_step_s": statistics.median(wall) if wall else None,
            **{f"mean_{k}": v for k, v in mean.items()}, "replans": len(ctl.replans),
            "frame_bytes_sent": getattr(source, "bytes_sent", 0), "encode_s": getattr(source, "encode_s", 0.0),
            "test_acc": result.test_acc}


def summarise(rows: list[dict]) -> list[dict]:
    """Per policy: the median over repeats of the mean step time, its min and max, the speed-ups against none
    and priority (ratios of medians), and the median of each phase's mean time.  ``static best``: the fixed
    split whose median is lowest."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r)
    out = []
    for policy, runs in by.items():
        times = [r["mean_step_s"] for r in runs]
        row = {"policy": policy, "repeats": len(runs), "median_step_s": statistics.median(times),
               "min_step_s": min(times), "max_step_s": max(times)}
        for k in PHASES:
            row[k] = statistics.median(r[f"mean_{k}"] for r in runs)
        row["test_acc"] = statistics.median(r["test_acc"] for r in runs)
        out.append(row)
    static = [r for r in out if r["policy"].startswith("static:")]
    if static:
        best = dict(min(static, key=lambda r: r["median_step_s"]))
        best["best_of"] = best["policy"]
        best["policy"] = "static best"
        out.append(best)
    medians = {r["policy"]: r["median_step_s"] for r in out}
    for r in out:
        for base in ("none", "priority"):
            if base in medians:
                r[f"speedup_vs_{base}"] = medians[base] / r["median_step_s"]
    return out


def _pin_rank(cpus: list[int]) -> None:
    """Keep this rank on its block of the host (the cloud on its own cores)."""
    import torch

    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(len(cpus))


def _run(comm, args) -> int:
    import torch

    from kd.datasets import balanced_subset, load_dataset
    from kd.streaming import EdgeJob, open_cloud, open_edge
    from kd.trainer import EdgeConfig, train_edge
    from runtime import transport
    from scheduling.controller import check_cores, controlled

    from .ranks import controlled_cpus, default_threads, on_root_then_bcast

    threads = default_threads(comm)
    cores = check_cores(args.control_cores or threads, option="--control-cores")
    if comm.Get_size() < 2:
        raise UsageError(f"aflkd control runs one cloud (rank 0) and one or more edges: use 'mpiexec -n 2' or more "
                         f"(got {comm.Get_size()})")
    cpus = controlled_cpus(comm, cores)  # each rank its own block of the host: the cloud off the edge's cores
    block = controlled_cpus(comm, threads)  # the whole share: what the cloud keeps
    policies = expand_policies(args.policies, cores)
    frames = frame_format(args)
    on_root_then_bcast(comm, lambda: (options.prepare_output(args.json, "--json"),
                                      options.prepare_output(args.plot, "--plot")))
    cost = control_cost(args)
    if cost is not None:
        cost.check(cores)
    data, teacher, problem = None, None, None
    try:  # a dataset or teacher missing on one board only: agreed, every rank ends with the same line, exit 2
        data = load_dataset(args.dataset, args.data_root)
        options.check_student_options([args.size], data, "--size")
        if comm.Get_rank() == 0:
            from kd.device import pick_device

            teacher = options.load_teacher(args, data, pick_device(args.device))
    except UsageError as err:
        problem = str(err)
    transport.agree(comm, problem, "data set-up")
    mine = block if comm.Get_rank() == 0 else cpus
    _pin_rank(mine)
    config = EdgeConfig(args.method, args.net, steps=args.steps, seed=args.seed)
    idx = balanced_subset(data.y_train, args.size, data.classes, seed=args.seed)
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(policies)
        for policy in policies[shift:] + policies[:shift]:
            _pin_rank(mine)  # every run starts from the same threads
            if comm.Get_rank() == 0:
                server = open_cloud(comm, 0, teacher, data, args.timeout)
                try:
                    server.serve()
                finally:
                    server.close()
                continue
            source = open_edge(comm, 0, EdgeJob(config, idx, frames=frames, encode_threads=cores), data, args.timeout)
            ctl = controlled(source, policy, cores, config.steps, cost, cpus=cpus)
            result = train_edge(config, data, idx, source=ctl)
            rows.append(run_row(policy, repeat, ctl.ctl, result, source))
            rows[-1].update(edge_rank=comm.Get_rank(), edge_cpus=list(cpus))
            print(f"edge rank {comm.Get_rank()}, repeat {repeat + 1}/{args.repeats} {policy}: "
                  f"{1e3 * rows[-1]['mean_step_s']:.1f} ms/step", file=sys.stderr, flush=True)
    from kd.channel import gather_reports

    everyone = gather_reports(comm, rows, args.timeout, mine_too=False)
    if everyone is None:
        return 0
    rows = [r for edge_rows in everyone for r in edge_rows]
    summary = summarise(rows)
    _print(summary, args, cores, {r["edge_rank"]: r["edge_cpus"] for r in rows}, block, frames)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": args.command_line, "dataset": args.dataset, "net": args.net, "cores": cores,
                       "edge_cpus": {r["edge_rank"]: r["edge_cpus"] for r in rows}, "cloud_cpus": list(block),
                       "frames": str(frames) if frames else None, "steps": args.steps, "repeats": args.repeats,
                       "summary": summary, "runs": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(summary, args.plot, f"edge net {args.net}, {cores} edge core(s), frames {frames or 'none'}, "
                                 f"{args.steps} steps x {args.repeats}")
        print(f"wrote {args.plot}")
    sys.stdout.flush()
    return 0


def _print(summary: list[dict], args, cores: int, edge_cpus: dict, cloud_cpus: list[int], frames) -> None:
    where = "; ".join(f"edge rank {r} on CPUs {c}" for r, c in sorted(edge_cpus.items()))
    print(f"edge net {args.net}, {args.steps} steps x {args.repeats} repeats, {cores} core(s) divided per edge "
          f"({where}; the cloud on CPUs {cloud_cpus}), frames {frames or 'none (logits only)'}")
    if len(edge_cpus) > 1:
        print(f"(medians over the {len(edge_cpus)} edges' runs together; every run is in --json)")
    head = (f"{'policy':>12} {'median ms':>9} {'min..max ms':>15} {'vs none':>7} {'vs prio':>7} {'fwd ms':>7} "
            f"{'bwd ms':>7} {'first ms':>8} {'wait ms':>7} {'comm ms':>7} {'cloud ms':>8} {'test acc':>8}")
    print(head)
    print("  (fwd, bwd: computation; first: computation held while communication ran alone; wait: computation "
          "idle for logits; comm: communication's CPU part, encode + send; cloud: waiting on the cloud and wire)")
    for r in summary:
        spread = f"{1e3 * r['min_step_s']:.1f}..{1e3 * r['max_step_s']:.1f}"
        name = r["policy"] + (f" ({r['best_of']})" if "best_of" in r else "")
        print(f"{name:>12} {1e3 * r['median_step_s']:>9.1f} {spread:>15} {r.get('speedup_vs_none', float('nan')):>7.3f} "
              f"{r.get('speedup_vs_priority', float('nan')):>7.3f} {1e3 * r['forward_s']:>7.1f} "
              f"{1e3 * r['backward_s']:>7.1f} {1e3 * r['first_s']:>8.1f} {1e3 * r['wait_s']:>7.1f} "
              f"{1e3 * r['comm_s']:>7.1f} {1e3 * r['remote_s']:>8.1f} "
              f"{r['test_acc']:>8.2%}")
    if cores == 1:
        print("note: with 1 core the edge cannot split: the planner's plan is priority's (each batch's encoding "
              "alone, first, then computation while the cloud works); none lets the OS share the core")


def plot(summary: list[dict], path: str, title: str) -> None:
    """Median step time per policy with its min..max, and its phases stacked beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] + (f"\n({r['best_of']})" if "best_of" in r else "") for r in summary]
    x = range(len(summary))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    med = [1e3 * r["median_step_s"] for r in summary]
    lo = [m - 1e3 * r["min_step_s"] for m, r in zip(med, summary)]
    hi = [1e3 * r["max_step_s"] - m for m, r in zip(med, summary)]
    a.bar(x, med, yerr=[lo, hi], capsize=4, color="tab:blue")
    a.set_xticks(list(x), names, fontsize=8)
    a.set_ylabel("ms per step (median of repeats; min..max)")
    a.set_title("step time per policy")
    bottom = [0.0] * len(summary)
    for key, colour in (("forward_s", "tab:green"), ("backward_s", "tab:orange"), ("first_s", "tab:purple"),
                        ("wait_s", "tab:red")):
        vals = [1e3 * r[key] for r in summary]
        b.bar(x, vals, bottom=bottom, label=key[:-2], color=colour)
        bottom = [p + v for p, v in zip(bottom, vals)]
    b.plot(list(x), [1e3 * r["comm_s"] for r in summary], "k^", label="communication's CPU part (encode, send)")
    b.set_xticks(list(x), names, fontsize=8)
    b.set_ylabel("ms per step")
    b.set_title("phases (trainer's view) and communication")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
