"""``aflkd control``: wall time per epoch of one streamed-distillation run under each core-allocation policy.

Under ``mpiexec -n 2`` (rank 0 the cloud, rank 1 the edge): the same student
(net, seed, subset, steps, batches) is trained once per policy -- ``planner``,
``priority``, ``none`` (scheduling/controller.py) -- in ONE job, each run
opening its own stream, and the edge's per-epoch wall times are printed as a
table and written as JSON.  The test accuracy of each run is printed too:
control changes timing, not the recipe (weights differ only through the
thread count's summation order).
"""
from __future__ import annotations

import json
import statistics
import sys

from runtime.errors import UsageError

from . import options
from .distill import control_cost

__all__ = ["add_parser"]

EPILOG = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd control --dataset cifar10 --net 3 --size 500 --steps 40 \\
      --control-cores 2 --json out/control.json
"""


def _policies(text: str) -> list[str]:
    from scheduling.policies import POLICIES

    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in POLICIES]
    if not items or bad:
        raise UsageError(f"--policies {text!r}: give a comma list of {', '.join(POLICIES)}")
    return items


def add_parser(sub) -> None:
    from kd.config import METHODS

    p = sub.add_parser("control", help="epoch wall times of a streamed run with the controller, priority and no "
                       "control (mpiexec -n 2)", description=__doc__, epilog=EPILOG,
                       formatter_class=options.ExamplesFormatter)
    options.data_options(p, teacher=True)
    p.add_argument("--net", type=options.edge_net, default="edge3",
                   help="edge net the edge rank trains: 1, 2 or 3 (or edge1, edge2, edge3)")
    p.add_argument("--size", type=options.positive_int, default=500, help="training images of the edge")
    p.add_argument("--steps", type=options.positive_int, default=40, help="optimiser steps per run")
    p.add_argument("--method", default="aflkd", choices=METHODS, help="how the student is trained")
    p.add_argument("--seed", type=options.non_negative_int, default=0, help="seed of subset, weights and batches")
    p.add_argument("--control-cores", type=options.positive_int, default=None,
                   help="cores the controller divides on the edge (default: this rank's share of the host)")
    p.add_argument("--constants", default=None, metavar="FILE", help="f, g constants from 'aflkd schedule profile' for the planner (default: the ideal model, "
                   "calibrated by the first re-plan)")
    p.add_argument("--policies", default="planner,priority,none", help="policies, run in this order")
    p.add_argument("--timeout", type=options.positive_float, default=120.0, help="seconds a rank waits for its peer")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON (default: not written)")
    p.set_defaults(func=_control, sets_own_threads=True)


def _control(args) -> int:
    from mpi4py import MPI

    from runtime.transport import abort_on_uncaught_exception

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    return _run(comm, args)


def _run(comm, args) -> int:
    import torch

    from kd.datasets import balanced_subset, load_dataset
    from kd.streaming import EdgeJob, open_cloud, open_edge
    from kd.trainer import EdgeConfig, train_edge
    from scheduling.controller import check_cores, controlled

    from .ranks import controlled_cpus, default_threads, on_root_then_bcast, set_threads

    threads = default_threads(comm)
    cores = check_cores(args.control_cores or threads, option="--control-cores")
    cpus = controlled_cpus(comm, cores)  # the edge's own block of the host: off the cloud's cores
    policies = _policies(args.policies)
    if comm.Get_size() != 2:
        raise UsageError(f"aflkd control runs one cloud and one edge: use 'mpiexec -n 2' (got {comm.Get_size()})")
    on_root_then_bcast(comm, lambda: options.prepare_output(args.json, "--json"))
    cost = control_cost(args)
    if cost is not None:
        cost.check(cores)
    from runtime import transport

    data, teacher, problem = None, None, None
    try:  # a dataset or teacher missing on one board only: agreed, every rank ends with the same line, exit 2
        data = load_dataset(args.dataset, args.data_root)
        options.check_student_options([args.size], data, "--size")
        teacher = options.load_teacher(args, data, torch.device("cpu")) if comm.Get_rank() == 0 else None
    except UsageError as err:
        problem = str(err)
    transport.agree(comm, problem, "data set-up")
    rows = []
    for policy in policies:
        set_threads(threads)  # every run starts from the same torch threads
        if comm.Get_rank() == 0:
            server = open_cloud(comm, 0, teacher, data, args.timeout)
            try:
                server.serve()
            finally:
                server.close()
            continue
        config = EdgeConfig(args.method, args.net, steps=args.steps, seed=args.seed)
        idx = balanced_subset(data.y_train, args.size, data.classes, seed=args.seed)
        source = open_edge(comm, 0, EdgeJob(config, idx), data, args.timeout)
        ctl = controlled(source, policy, cores, config.steps, cost, cpus=cpus)
        result = train_edge(config, data, idx, source=ctl)
        epochs = [h["epoch_seconds"] for h in result.history]
        rows.append({"policy": policy, "cores": cores, "steps": args.steps, "epochs": len(epochs),
                     "epoch_seconds": epochs, "median_epoch_s": statistics.median(epochs),
                     "train_s": sum(epochs), "logit_wait_s": source.wait_s,
                     "replans": len(ctl.ctl.replans), "test_acc": result.test_acc})
    from runtime import transport
    if comm.Get_rank() == 1:
        transport.send_object(comm, rows, 0, 78).wait()
        return 0
    rows = transport.recv_object_by(comm, 1, 78, None, "")
    print(f"edge rank 1: {args.net and f'edge net {args.net}'}, {args.steps} steps, {cores} core(s) divided, "
          f"threads before control {threads}")
    print(f"{'policy':>9} {'epochs':>6} {'median epoch s':>14} {'train s':>8} {'logit wait s':>12} {'replans':>7} "
          f"{'test acc':>8}")
    for r in rows:
        print(f"{r['policy']:>9} {r['epochs']:>6} {r['median_epoch_s']:>14.3f} {r['train_s']:>8.2f} "
              f"{r['logit_wait_s']:>12.3f} {r['replans']:>7} {r['test_acc']:>8.2%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": args.command_line, "dataset": args.dataset, "net": args.net, "cores": cores,
                       "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0
