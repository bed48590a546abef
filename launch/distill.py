"""``aflkd train distill``: streamed distillation under mpiexec -- one cloud rank, the other ranks edges.

The cloud rank (``--cloud-rank``, default 0) loads the teacher onto ``--device``;
every other rank trains one student on the CPU (the edge boards), with logits
streamed from the cloud (see :mod:`kd.streaming`).  ``--nets``, ``--seeds`` and
``--wire`` take one value for every edge or one per edge rank, in rank order.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser"]

EPILOG = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd train distill --dataset cifar10 --nets 3 --size 500 --steps 200
  .venv/bin/mpiexec -n 4 .venv/bin/aflkd train distill --dataset cifar10 --nets 3 --wire float32,float16,topk:3 \\
      --json out/wire.json      # three edges, one wire format each, served by one cloud rank
"""


def _wires(text: str):
    from kd.wire import parse_wire

    try:
        return [parse_wire(v) for v in text.split(",") if v.strip()] or [parse_wire(text)]
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(what) -> None:
    from kd.config import METHODS

    distill = what.add_parser(
        "distill",
        help="streamed distillation under mpiexec: a cloud rank streams teacher logits to edge ranks",
        description="Run under 'mpiexec -n P' (P >= 2). The cloud rank holds the teacher (on --device) and, "
        "for every batch of every edge, rebuilds the batch from the edge's subset, seed and step, runs the "
        "teacher and sends the logits without blocking; each other rank trains one student (on its CPU) and "
        "waits for batch i's logits only before batch i's loss, so the transfer overlaps its forward pass. "
        "A rank that hears nothing from its peer for --timeout seconds ends the job with one line.",
        epilog=EPILOG, formatter_class=options.ExamplesFormatter,
    )
    options.data_options(distill, teacher=True)
    distill.add_argument("--nets", type=options.edge_nets, default="edge3",
                         help="edge net per edge rank (one value: every edge), e.g. 3 or 3,2")
    distill.add_argument("--size", type=options.positive_int, default=500,
                         help="training images per edge (class-balanced subset drawn with the edge's seed)")
    distill.add_argument("--method", default="aflkd", choices=METHODS, help="how the students are trained")
    options.student_options(distill)
    distill.add_argument("--seeds", type=options.int_list, default="0",
                         help="seed per edge rank (one value: every edge) of its subset, weights and batches")
    distill.add_argument("--wire", type=_wires, default="float32",
                         help="logits on the wire per edge rank (one value: every edge): float32 (exact), float16, "
                         "or topk:K (K largest logits + indices + logsumexp; the rest rebuilt flat)")
    distill.add_argument("--cloud-rank", type=options.non_negative_int, default=0, help="the rank holding the teacher")
    distill.add_argument("--run-ahead", type=options.positive_int, default=2,
                         help="batches of logits an edge may have requested ahead of its loss (bounds memory)")
    distill.add_argument("--timeout", type=options.positive_float, default=120.0,
                         help="seconds a rank waits for its peer (set-up, each batch) before ending the job")
    options.device_option(distill, "cloud rank runs the teacher (edges train on their CPU)")
    distill.add_argument("--threads", type=options.threads, default=None,
                         help="torch threads per rank (default: this host's cores / ranks on this host)")
    distill.add_argument("--out", default=None, metavar="FOLDER",
                         help="save each edge's student as FOLDER/student-rankR.pt (default: not saved)")
    distill.add_argument("--json", default=None, metavar="FILE",
                         help="write the per-edge results as JSON, on the cloud rank (default: not written; "
                              "folders are created)")
    distill.add_argument("--no-progress", action="store_true", help="hide the cloud's progress bar")
    frame_options(distill)
    control_options(distill)
    distill.set_defaults(func=_distill, sets_own_threads=True)


def control_options(parser) -> None:
    """--control, --control-cores, --constants: the edge ranks' core allocation (scheduling/controller.py)."""
    from scheduling.policies import POLICIES

    parser.add_argument("--control", type=options.as_type("policy", _policy), default="none",
                        metavar="{" + ",".join(POLICIES) + ",static:C}",
                        help="core allocation on each edge rank between communication (receiving logits, encoding "
                        "and uploading frames) and training: planner (the exact plan, re-planned on drift), "
                        "priority (exclusive, never shared), static:C (C cores to communication in every phase) "
                        "or none (the same threads, kept on the rank's CPUs and never moved: the OS shares them)")
    parser.add_argument("--control-cores", type=options.positive_int, default=None,
                        help="cores the controller divides (default: the cores this rank may use / ranks on host)")
    parser.add_argument("--constants", default=None, metavar="FILE",
                        help="f and g constants from 'aflkd schedule profile' for the planner (default: an ideal "
                        "model: compute scales with its cores; the first re-plan measures the workloads)")


def _policy(text: str) -> str:
    from scheduling.policies import parse_policy

    parse_policy(text)
    return text


def frame_options(parser) -> None:
    """--upload, --frame-size, --jpeg-quality: the edge uploads its frames to the cloud (kd/frames.py).  Not
    --frames: that is 'update add''s file of frames, and one option name has one kind of value."""
    parser.add_argument("--upload", choices=("none", "raw", "jpeg"), default="none",
                        help="what the edge sends the cloud per batch: none (a credit; the cloud rebuilds the batch "
                        "from the shared subset and seed), raw (the batch's frames as uint8 pixels) or jpeg (each "
                        "frame JPEG-encoded on the edge, decoded on the cloud): the upload AFLKD's edge makes, and "
                        "the communication that costs the edge CPU")
    parser.add_argument("--frame-size", type=options.positive_int, default=224, metavar="PIXELS",
                        help="side of a frame: the 32x32 images are sent upsampled to this (a multiple of 32), as "
                        "a camera at that resolution would give them (with --upload raw|jpeg)")
    parser.add_argument("--jpeg-quality", type=options.positive_int, default=90, metavar="Q",
                        help="JPEG quality of --upload jpeg, 1..100")


def frame_format(args):
    """The checked :class:`kd.frames.FrameFormat` of the frame options (None: no upload)."""
    from kd.frames import parse_frames

    return parse_frames(args.upload, args.frame_size, args.jpeg_quality)


def control_cost(args):
    """The cost model of --constants, or None (the controller's ideal default)."""
    if not args.constants:
        return None
    from pathlib import Path

    from scheduling.costmodel import CostModel

    try:
        return CostModel.from_json(json.loads(Path(args.constants).read_text()), source=args.constants)
    except (OSError, ValueError) as err:
        raise UsageError(f"--constants {args.constants}: cannot read a JSON file ({err})") from None


def _per_edge(values: list, edges: int, option: str) -> list:
    if len(values) == 1:
        return values * edges
    if len(values) != edges:
        raise UsageError(f"{option} has {len(values)} values for {edges} edge rank(s); give one, or one per edge")
    return values


def _distill(args) -> int:
    return run_kd_job(_run, args)


def run_kd_job(run, args) -> int:
    """``run(COMM_WORLD, args)`` for a cloud/edge job: a lost peer (a cloud or edge that stopped answering, a
    transport deadline) is one line on this rank and ends the whole job (exit 3), since the stalled peer
    never sees an error itself."""
    from mpi4py import MPI

    from kd.streaming import EdgeLost
    from kd.teacher_source import CloudLost
    from runtime import transport
    from runtime.transport import abort_on_uncaught_exception

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    try:
        return run(comm, args)
    except (CloudLost, EdgeLost, transport.TransportError) as err:
        print(f"aflkd: error: rank {comm.Get_rank()}: {err}", file=sys.stderr, flush=True)
        transport.abort(comm, 3)
        return 3


def _run(comm, args) -> int:
    import torch

    from kd.datasets import balanced_subset, load_dataset
    from kd.device import device_name, pick_device
    from kd.streaming import EdgeJob, _check_ranks, open_cloud, open_edge
    from kd.trainer import EdgeConfig, train_edge
    from models import save_atomic
    from runtime import transport
    from scheduling.controller import check_cores, controlled

    from .ranks import controlled_cpus, default_threads, set_threads

    rank, cloud = comm.Get_rank(), args.cloud_rank
    _check_ranks(comm, cloud)
    edges = [r for r in range(comm.Get_size()) if r != cloud]
    nets = _per_edge(args.nets, len(edges), "--nets")
    seeds = _per_edge(args.seeds, len(edges), "--seeds")
    wires = _per_edge(args.wire, len(edges), "--wire")
    # the cloud rank writes the report: it serves until every edge has all its batches, so when it gathers
    # the edges' rows each has at most its last step and its evaluation left (an edge that finished early
    # would wait on a slower, live edge for longer than --timeout)
    transport.share_from_root(comm, lambda: (options.prepare_output(args.json, "--json"),
                                             args.out and options.prepare_folder(args.out, "--out")), cloud, UsageError)
    set_threads(args.threads or default_threads(comm))
    cores = check_cores(args.control_cores or default_threads(comm))  # every rank, before any work
    cpus = controlled_cpus(comm, cores)  # each edge its own block of its host's CPUs (collective: every rank)
    cost = control_cost(args)
    if cost is not None:
        cost.check(cores)
    frames = frame_format(args)
    data, problem = None, None
    try:  # a dataset missing on one board only: agreed, so every rank ends with the same line, exit 2
        if rank != cloud:  # the controller runs on the edges: a split of their cores, before the cloud serves
            from scheduling.controller import static_split_problem
            from scheduling.policies import parse_policy

            static = parse_policy(args.control)
            if static is not None and not 1 <= static < cores:
                raise UsageError(static_split_problem(f"--control {args.control}", cores))
        data = load_dataset(args.dataset, args.data_root)
        options.check_student_options([args.size], data, "--size")
    except UsageError as err:
        problem = str(err)
    transport.agree(comm, problem, "data set-up")
    began = time.perf_counter()
    if rank == cloud:
        problem, teacher, device = None, None, torch.device("cpu")
        try:
            device = pick_device(args.device)
            teacher = options.load_teacher(args, data, device)
        except UsageError as err:
            problem = str(err)
        server = open_cloud(comm, cloud, teacher, data, args.timeout, problem)
        try:
            served = server.serve(progress=not args.no_progress)
        finally:
            server.close()
        mine = {"rank": rank, "role": "cloud", "device": device_name(device), "teacher_seconds": server.teacher_s,
                "frame_decode_seconds": round(server.decode_s, 3),
                "seconds": time.perf_counter() - began, "served": served}
    else:
        i = edges.index(rank)
        config = EdgeConfig(args.method, nets[i], steps=args.steps, t_rule=args.t_rule, unit=args.unit, seed=seeds[i])
        idx = balanced_subset(data.y_train, args.size, data.classes, seed=seeds[i])
        job = EdgeJob(config, idx, wires[i], args.run_ahead, frames, encode_threads=cores)
        source = open_edge(comm, cloud, job, data, args.timeout)
        ctl = controlled(source, args.control, cores, config.steps, cost, cpus=cpus)
        result = train_edge(config, data, idx, source=ctl)
        last = result.history[-1] if result.history else {}
        mine = {"rank": rank, "role": "edge", "device": "cpu", "net": nets[i], "seed": seeds[i],
                "method": args.method, "size": args.size, "steps": args.steps, "wire": str(wires[i]),
                "bytes_per_batch": source.nbytes, "bytes_received": source.bytes_received,
                "frames": str(frames) if frames else None, "frame_bytes_sent": getattr(source, "bytes_sent", 0),
                "encode_seconds": round(getattr(source, "encode_s", 0.0), 3),
                "logit_wait_seconds": round(source.wait_s, 3), "test_acc": result.test_acc,
                "seconds": result.seconds, "final_T": last.get("T"), "final_frozen": last.get("frozen"),
                "control": args.control, "control_cores": cores, "replans": len(ctl.ctl.replans),
                "epoch_seconds": [h["epoch_seconds"] for h in result.history]}
        if args.out:
            path = f"{args.out}/student-rank{rank}.pt"
            save_atomic({k: v.cpu() for k, v in result.model.state_dict().items()}, path)
            mine["student"] = path
    rows = _collect(comm, mine, args.timeout, cloud)
    if rows is not None:
        _report(rows, args)
    return 0


def _collect(comm, mine: dict, timeout_s: float, root: int):
    """Every rank's row on the cloud rank ``root`` (kd's channel, polled: it may wait on an edge's evaluation;
    bounded)."""
    from kd.channel import gather_reports

    rows = gather_reports(comm, mine, timeout_s, root=root)
    return None if rows is None else sorted(rows, key=lambda r: r["rank"])


def _report(rows: list[dict], args) -> None:
    cloud = next(r for r in rows if r["role"] == "cloud")
    edges = [r for r in rows if r["role"] == "edge"]
    print(f"cloud rank {cloud['rank']} on {cloud['device']}: teacher {cloud['teacher_seconds']:.1f} s of "
          f"{cloud['seconds']:.1f} s")
    print(f"{'rank':>4} {'net':>3} {'seed':>4} {'wire':>8} {'bytes/batch':>11} {'MB sent':>8} {'wait s':>7} "
          f"{'test acc':>8}")
    for e in edges:
        print(f"{e['rank']:>4} {e['net']:>3} {e['seed']:>4} {e['wire']:>8} {e['bytes_per_batch']:>11} "
              f"{e['bytes_received'] / 1e6:>8.3f} {e['logit_wait_seconds']:>7.2f} {e['test_acc']:>8.2%}")
    for e in edges:
        if e.get("frames"):
            print(f"rank {e['rank']}: uploaded {e['steps']} batches of {e['frames']} frames, "
                  f"{e['frame_bytes_sent'] / 1e6:.1f} MB ({e['frame_bytes_sent'] / max(1, e['steps']) / 1e6:.2f} MB "
                  f"per batch), encoding {e['encode_seconds']:.1f} s; the cloud decoded them in "
                  f"{cloud.get('frame_decode_seconds', 0):.1f} s")
    for e in edges:
        if e.get("control", "none") != "none":
            source = f"constants from {args.constants}" if getattr(args, "constants", None) else "ideal constants"
            print(f"rank {e['rank']}: cores allocated by {e['control']} ({e['control_cores']} core{'s' * (e['control_cores'] != 1)}, {source}), "
                  f"{e['replans']} re-plan(s) over {e['steps']} steps")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": args.command_line, "dataset": args.dataset, "cloud": cloud, "edges": edges}, fh,
                      indent=1)
        print(f"wrote {args.json}")
