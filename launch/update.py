"""``aflkd update``: incremental updates of an edge student from images collected at the edge (AFLKD Alg. 2).

``run`` and ``demo`` run under ``mpiexec -n 2``: rank 0 is the cloud (holds the
teacher, labels images), rank 1 the edge (holds the buffer and the student, trains).
``add`` and ``status`` are single-process tools on a buffer.  The protocol and its
crash guarantees are :mod:`kd.incremental`'s; the buffer is :mod:`kd.buffer`'s.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser"]

CLOUD, EDGE = 0, 1

ABOUT = """\
The edge appends collected, unlabelled images to a durable buffer (one SQLite file, rollback
journal, synchronous=EXTRA: an image is acknowledged only once its transaction is on disk).
A sample moves pending -> labelled (the cloud's logits stored beside it, one transaction
per batch) -> consumed (the batch trained the student; one transaction records the batch
consumed together with the student's generation number and sha256). When the buffer holds
--increment pending images, the edge sends the oldest --increment to the cloud rank, stores
its logits, runs an AFLKD update (learnable T, Eq. 17 freezing; the cloud's argmax as the
label, its logits as the soft target), writes the student atomically (temp file, fsync,
rename) and only then marks the batch consumed. A rerun after a crash or kill -9 of either
rank at any point resumes: a labelled batch is trained again without asking the cloud, a
student written but not yet recorded is recorded without training again, so no acknowledged
image is lost and none updates the student twice. A corrupt buffer file is refused with its
path and left untouched.

Bounded waits: every exchange with the peer rank waits at most --timeout seconds; while the
edge trains, it sends the cloud a heartbeat every --timeout/4 seconds. A rank that hears
nothing for --timeout seconds prints one line and ends the job (exit 3); the buffer keeps
everything acknowledged, and the next run resumes.
"""

EPILOG = """\
examples:
  .venv/bin/aflkd update add --buffer out/b.sqlite --dataset cifar10 --train-range 0:1000     # "camera" frames
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd update run --buffer out/b.sqlite --student s.pt --net 3 --dataset cifar10
  .venv/bin/aflkd update status --buffer out/b.sqlite
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd update demo --dataset cifar10 --net 3 --increments 5 --out out/incremental
"""


def add_parser(sub) -> None:
    update = sub.add_parser("update", help="incremental updates of an edge student (AFLKD Alg. 2), crash-safe",
                            description="Incremental updates of an edge student from newly collected images.\n\n"
                            + ABOUT, epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    what = update.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    update.set_defaults(func=lambda args: (update.print_help(), 2)[1])

    run = what.add_parser("run", help="under mpiexec -n 2: label and train every full increment in the buffer",
                          description="Rank 0 (cloud) labels, rank 1 (edge) updates the student with every full "
                          "--increment of pending images in the buffer, then both exit.\n\n" + ABOUT,
                          epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    run.add_argument("--buffer", required=True, help="the buffer file (see 'update add')")
    run.add_argument("--student", required=True,
                     help="the edge student's weights, updated in place (e.g. from 'aflkd train edge --save')")
    run.add_argument("--net", type=options.edge_net, default="edge3",
                        help="the edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    options.data_options(run, teacher=True)
    _common(run)
    run.add_argument("--max-updates", type=options.positive_int, default=None,
                     help="stop after this many updates (default: every full increment)")
    run.set_defaults(func=_run, sets_own_threads=True)

    demo = what.add_parser("demo", help="under mpiexec -n 2: training images streamed as camera data, "
                           "test accuracy after each increment (paper Figs. 7-9)",
                           description="Trains an initial AFLKD student on --initial labelled images (Alg. 1), "
                           "then streams --increments x --increment further training images (seeded order, "
                           "disjoint from the initial ones, labels unused) into the buffer as camera frames; "
                           "after each increment the cloud labels them and the edge updates the student (Alg. 2). "
                           "Writes OUT/incremental-DATASET.csv (+ .png) with the test accuracy after each "
                           "increment. Rerunning with the same --out resumes after a crash.\n\n" + ABOUT,
                           epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    options.data_options(demo, teacher=True)
    demo.add_argument("--net", type=options.edge_net, default="edge3",
                        help="the edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    demo.add_argument("--initial", type=options.positive_int, default=500,
                      help="labelled training images of the initial student (class-balanced)")
    demo.add_argument("--initial-steps", type=options.positive_int, default=None,
                      help="optimiser steps of the initial student (default: --steps)")
    demo.add_argument("--increments", type=options.positive_int, default=5, help="increments streamed")
    demo.add_argument("--out", required=True, metavar="FOLDER",
                      help="buffer, student, CSV and plot go here (an existing folder resumes)")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG")
    _common(demo)
    demo.set_defaults(func=_demo, sets_own_threads=True)

    add = what.add_parser("add", help="append images to a buffer as camera frames (single process)",
                          description="Append images to a buffer (created if missing) as pending samples; "
                          "returns once they are committed. Frames carry keys (dataset index, or the image's "
                          "sha256), so adding the same frames again adds nothing.\n\n" + ABOUT, formatter_class=options.ExamplesFormatter)
    add.add_argument("--buffer", required=True, help="the buffer file")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--train-range", metavar="A:B",
                        help="training images A..B-1 of --dataset, in a seeded order (labels unused) (default: none; give this "
                        "or --frames)")
    source.add_argument("--frames", metavar="NPY",
                        help="a .npy file of uint8 images (N, H, W, C); an image already in the buffer (same bytes) "
                        "is not added again (default: none; give this or --train-range)")
    add.add_argument("--dataset", default=None,
                     help="cifar10, cifar100 or fashion-mnist (default: none; needed by --train-range)")
    add.add_argument("--data-root", default=str(options.DATA_ROOT), help="folder with the dataset files")
    add.add_argument("--seed", type=int, default=0, help="seed of the order of the training images")
    add.set_defaults(func=_add, one_process=True)

    status = what.add_parser("status", help="a buffer's samples per state, its student generations, its checks",
                             description="Print a buffer's samples per state and student generations, and check "
                             "its invariants (exit 1 if one fails).\n\n" + ABOUT,
                             formatter_class=options.ExamplesFormatter)
    status.add_argument("--buffer", required=True, help="the buffer file")
    status.set_defaults(func=_status, one_process=True)


def _common(parser: argparse.ArgumentParser) -> None:
    from kd.config import EdgeConfig

    parser.add_argument("--increment", type=options.positive_int, default=500,
                        help="images per update: an update starts when this many are pending")
    options.student_options(parser)
    parser.add_argument("--lr", type=options.positive_float, default=EdgeConfig.lr,
                        help="peak learning rate of each update's one-cycle schedule (the demo's initial student "
                        "is trained at train edge's usual rate, whatever this says)")
    parser.add_argument("--seed", type=int, default=EdgeConfig.seed,
                        help="seed of the batches (update g uses seed + g) and of the demo's stream")
    parser.add_argument("--timeout", type=options.positive_float, default=120.0,
                        help="seconds a rank waits for its peer in any exchange before it ends the job")
    options.device_option(parser, "cloud runs the teacher and the edge trains")
    parser.add_argument("--threads", type=options.threads, default=None,
                        help="torch threads per rank (default: this host's cores / ranks on this host)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    options.test_images_option(parser)
    from .distill import frame_options

    frame_options(parser)


# ---------------------------------------------------------------------- single-process tools
def _parse_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--train-range must be A:B (two integers), got '{text}'") from None
    if not 0 <= a < b:
        raise UsageError(f"--train-range A:B needs 0 <= A < B, got '{text}'")
    return a, b


def camera_order(n_train: int, exclude, seed: int):
    """The demo's camera stream: training indices not in ``exclude``, in an order fixed by ``seed``."""
    import numpy as np

    rest = np.setdiff1d(np.arange(n_train), np.asarray(exclude, dtype=np.int64))
    return np.random.default_rng(seed + 1).permutation(rest)


def _add(args) -> int:
    import numpy as np

    from kd.buffer import Buffer

    if args.train_range:
        a, b = _parse_range(args.train_range)
        if not args.dataset:
            raise UsageError("--train-range needs --dataset")
        from kd.datasets import load_dataset

        data = load_dataset(args.dataset, args.data_root)
        if b > len(data.x_train):
            raise UsageError(f"--train-range {args.train_range} goes past the {len(data.x_train)} training images")
        order = camera_order(len(data.x_train), [], args.seed)[a:b]
        images, keys = data.x_train[order], [f"{args.dataset}/train/{i}" for i in order]
    else:
        try:
            images = np.load(args.frames, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"--frames {args.frames} cannot be read as a .npy file ({err})") from None
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UsageError(f"--frames {args.frames} must hold uint8 images (N, H, W, C), got {images.dtype} "
                             f"{images.shape}")
        import hashlib

        keys = ["sha256:" + hashlib.sha256(image.tobytes()).hexdigest() for image in images]  # same frame: added once
    options.prepare_output(args.buffer, "--buffer")
    with Buffer(args.buffer, images.shape[1:]) as buffer:
        before = buffer.counts()["pending"]
        buffer.append(images, keys)
        counts = buffer.counts()
    print(f"{args.buffer}: {counts['pending'] - before} of {len(images)} images added "
          f"(pending {counts['pending']}, labelled {counts['labelled']}, consumed {counts['consumed']})")
    return 0


def _status(args) -> int:
    from kd.buffer import Buffer

    with Buffer(args.buffer, create=False) as buffer:
        counts, generations, problems = buffer.counts(), buffer.generations(), buffer.check()
        batch = buffer.open_batch()
        print(f"{args.buffer}: images {'x'.join(map(str, buffer.shape))}, pending {counts['pending']}, "
              f"labelled {counts['labelled']} ({'no open batch' if batch is None else f'open batch: {batch}'}), "
              f"consumed {counts['consumed']}")
        for g in generations:
            info = buffer.info(g.generation)
            acc = f", test acc {info['test_acc']:.2%}" if "test_acc" in info else ""
            source = "the initial student" if g.batch is None else f"batch {g.batch}"
            print(f"  generation {g.generation}: {source}, sha256 {g.sha256[:16]}{acc}")
    for p in problems:
        print(f"  invariant broken: {p}")
    return 1 if problems else 0


# ---------------------------------------------------------------------- the two ranks
@dataclass
class _Setup:
    comm: object
    data: object  # the dataset (ImageArrays); None if ``problem``
    device: object
    problem: Optional[str] = None  # set-up failed on this rank: told to the peer by _agree, not raised here


def _start(args, need_edge_data: bool = True) -> _Setup:
    """Both ranks: check the job, load what each needs; one UsageError on every rank before any transfer.

    A device or dataset this rank cannot use is kept in ``problem``, not raised: the peer
    would wait for our set-up facts until --timeout and then abort; :func:`_agree` tells it.
    """
    from mpi4py import MPI

    from kd.datasets import load_dataset, with_test_subset
    from kd.device import pick_device
    from runtime.transport import abort_on_uncaught_exception

    from .ranks import default_threads, set_threads

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    if comm.Get_size() != 2:
        raise UsageError(f"'aflkd update {args.what}' runs on 2 ranks (rank 0 the cloud, rank 1 the edge), got "
                         f"{comm.Get_size()}; start it with 'mpiexec -n 2'")
    set_threads(args.threads or default_threads(comm))
    try:
        device = pick_device(args.device)
        data = with_test_subset(load_dataset(args.dataset, args.data_root), args.test_images)
        _upload_format(args, data)  # a frame size the images do not divide: refused on both ranks
    except UsageError as err:
        role = "the cloud" if comm.Get_rank() == CLOUD else "the edge"
        return _Setup(comm, None, None, f"rank {comm.Get_rank()} ({role}): {err}")
    return _Setup(comm, data, device)


def _upload_format(args, data):
    """The checked frame format of --upload for this dataset's images (None: the buffer's pixels travel)."""
    from kd.frames import parse_frames

    return parse_frames(args.upload, args.frame_size, args.jpeg_quality, image_size=data.x_train.shape[1])


def _link(setup: _Setup, args):
    """The edge's CloudLink; with --upload, an increment's images travel as frames encoded on this rank's threads."""
    import torch

    from kd.frames import FrameEncoder
    from kd.incremental import CloudLink

    fmt = _upload_format(args, setup.data)
    encoder = None
    if fmt is not None:
        data = setup.data
        encoder = FrameEncoder(fmt, data.mean, data.std, data.channels, image_size=data.x_train.shape[1],
                               max_threads=torch.get_num_threads())
    return CloudLink(setup.comm, CLOUD, args.timeout, encoder)


def _agree(setup: _Setup, args, mine: dict) -> dict:
    """Swap set-up facts with the peer (bounded by --timeout); raise the same UsageError on both if any is wrong.

    A peer that sends nothing in time ends the job in one line (exit 3), as a peer lost later does.
    """
    from kd.channel import Channel
    from runtime import transport

    comm = setup.comm
    peer = EDGE if comm.Get_rank() == CLOUD else CLOUD
    channel = Channel(comm, peer, args.timeout, f"rank {peer}")
    request = channel.send_object(mine)
    try:
        theirs = channel.recv_object("set-up")
    except transport.PeerTimeout as err:
        print(f"aflkd: error: rank {comm.Get_rank()}: {err}", file=sys.stderr, flush=True)
        transport.abort(comm, 3)
        raise
    transport.wait_by([request], time.monotonic() + args.timeout)
    cloud, edge = (mine, theirs) if comm.Get_rank() == CLOUD else (theirs, mine)
    problem = cloud.get("problem") or edge.get("problem")
    if problem is None and cloud["classes"] != edge["classes"]:
        problem = (f"the teacher has {cloud['classes']} classes but the student has {edge['classes']}; give a "
                   "student and a teacher of the same dataset")
    if problem is None and cloud["channels"] != edge["channels"]:
        problem = (f"the teacher takes {cloud['channels']}-channel images but the buffer holds "
                   f"{edge['channels']}-channel ones; use a buffer of this dataset")
    if problem is not None:
        from runtime.transport import AgreedError  # every rank of the stream raises it

        raise AgreedError(problem)
    return theirs


def _cloud(setup: _Setup, args):
    """Rank 0's set-up: load the teacher, agree with the edge (one UsageError on both ranks if anything is
    wrong); returns the serving loop to run next."""
    import numpy as np
    import torch

    from kd.incremental import serve_cloud
    from kd.teacher import to_tensor
    from kd.teacher_source import run_teacher


    teacher = None
    if setup.problem is not None:
        facts = {"problem": setup.problem}
    else:
        facts = {"problem": None, "classes": setup.data.classes, "channels": setup.data.channels}
        try:
            teacher = options.load_teacher(args, setup.data, setup.device)
        except UsageError as err:
            facts["problem"] = str(err)
    _agree(setup, args, facts)

    def logits_of(images: np.ndarray) -> np.ndarray:
        x = to_tensor(images, setup.data)
        return torch.cat([run_teacher(teacher, x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()

    def log(line: str) -> None:
        if not args.no_progress:
            print(line, flush=True)

    def serve() -> int:
        served = serve_cloud(setup.comm, EDGE, logits_of, args.timeout, log)
        print(f"cloud: labelled {served} images in all", flush=True)
        return 0

    return serve


def _edge_config(args):
    from kd.config import EdgeConfig

    return EdgeConfig("aflkd", args.net, steps=args.steps, lr=args.lr, t_rule=args.t_rule, unit=args.unit,
                      seed=args.seed)


def _edge_facts(setup: _Setup, args, buffer_path: str, student_path: str, student_check: bool = True,
                must_exist: bool = False):
    """Rank 1's set-up: open the buffer, check the student fits, reconcile them (crash recovery).
    ``must_exist``: a missing buffer is refused (``update run`` has nothing to train on; it used to create an
    empty one and exit 0)."""
    from kd.buffer import Buffer, hold_for_training
    from kd.incremental import read_student, reconcile
    from models import edge_net, load_weights

    if setup.problem is not None:
        return None, {"problem": setup.problem}
    data = setup.data
    facts = {"problem": None, "classes": data.classes, "channels": data.channels}
    buffer = None
    try:
        if must_exist and not os.path.isfile(buffer_path):
            raise UsageError(f"--buffer {buffer_path}: no such buffer (fill one with 'aflkd update add')")
        options.prepare_output(buffer_path, "--buffer")
        hold_for_training(buffer_path)  # one training job per buffer: the lock lasts until this process exits
        buffer = Buffer(buffer_path, data.x_train.shape[1:])
        facts["channels"] = buffer.shape[2]
        if student_check:
            state, _ = read_student(student_path)
            load_weights(edge_net(args.net, data.channels, 32, data.classes), student_path,
                         f"--student must be edge net {args.net} trained on {data.name} (check --net)")
            facts["classes"] = int(state["fc2.weight"].shape[0]) if "fc2.weight" in state else data.classes
            _, note = reconcile(buffer, student_path)  # here, so a foreign student is refused on both ranks
            if note:
                print(note, flush=True)
    except UsageError as err:
        facts["problem"] = str(err)
    return buffer, facts


def _with_peer_errors(comm, work) -> int:
    """Run a rank's part after set-up: a lost peer, or bad input found by one rank only, ends the job in one line."""
    from runtime import transport

    try:
        return work()
    except transport.PeerTimeout as err:
        print(f"aflkd: error: rank {comm.Get_rank()}: {err}; the buffer keeps every acknowledged image, rerun to "
              "resume", file=sys.stderr, flush=True)
        transport.abort(comm, 3)
        return 3
    except UsageError as err:  # found on this rank only: the peer waits in an exchange, so end the job
        print(f"aflkd: error: {err}", file=sys.stderr, flush=True)
        transport.abort(comm, 2)
        return 2


def _edge_loop(setup: _Setup, args, link, buffer, student_path: str, camera=None, on_update=None) -> list:
    """Rank 1 after set-up: (append camera frames,) run every full increment, say goodbye."""
    from kd.incremental import AflkdUpdate, run_updates

    update = AflkdUpdate(_edge_config(args), setup.data, setup.device, progress=not args.no_progress)
    records = []

    def log(line: str) -> None:
        print(line, flush=True)

    for frames in camera if camera is not None else [None]:
        if frames is not None:
            buffer.append(*frames)
        records += run_updates(buffer, student_path, link, update, args.increment,
                               max_updates=getattr(args, "max_updates", None), on_update=on_update, log=log)
    link.close()
    return records


def _print_record(record, info: dict) -> None:
    on = f" on {info['test_images']} test images" if "test_images" in info else ""
    acc = f"test acc {info['test_acc']:.2%}{on}, " if "test_acc" in info else ""
    again = " (batch labelled by an interrupted run)" if record.resumed else ""
    print(f"edge: generation {record.generation} from batch {record.batch} ({record.samples} images){again}: "
          f"{acc}T {info.get('final_T', float('nan')):.2f}, frozen {info.get('final_frozen')}, "
          f"{info.get('seconds', 0):.0f} s", flush=True)


def _run(args) -> int:
    setup = _start(args)
    comm = setup.comm
    if comm.Get_rank() == CLOUD:
        return _with_peer_errors(comm, _cloud(setup, args))
    buffer, facts = _edge_facts(setup, args, args.buffer, args.student, must_exist=True)
    _agree(setup, args, facts)

    def work() -> int:
        link = _link(setup, args)
        records = _edge_loop(setup, args, link, buffer, args.student, on_update=lambda r, s, i: _print_record(r, i))
        if link.encoder is not None:
            print(f"edge: uploaded the increments as {link.encoder.fmt} frames: {link.bytes_sent / 1e6:.1f} MB, "
                  f"encoding {link.encode_s:.1f} s", flush=True)
        counts = buffer.counts()
        print(f"edge: {len(records)} update(s); buffer {args.buffer}: pending {counts['pending']}, consumed "
              f"{counts['consumed']}; student {args.student} is generation {buffer.latest().generation}", flush=True)
        return 0

    return _with_peer_errors(comm, work)


# ---------------------------------------------------------------------- the demo
def _demo(args) -> int:
    setup = _start(args)
    comm = setup.comm
    if comm.Get_rank() == CLOUD:
        return _with_peer_errors(comm, _cloud(setup, args))
    out = args.out
    buffer_path, student_path = os.path.join(out, "buffer.sqlite"), os.path.join(out, "student.pt")
    if setup.problem is not None:
        _agree(setup, args, {"problem": setup.problem})  # raises it on both ranks
    facts = {"problem": None, "classes": setup.data.classes, "channels": setup.data.channels}
    buffer = None
    try:
        options.prepare_folder(out, "--out")
        _check_demo_settings(out, args)
        options.check_student_options([args.initial], setup.data, "--initial")
        need = args.initial + args.increments * args.increment
        if need > len(setup.data.x_train):
            raise UsageError(f"--initial + --increments x --increment = {need} images, more than the "
                             f"{len(setup.data.x_train)} training images of {args.dataset}")
    except UsageError as err:
        facts["problem"] = str(err)
    if facts["problem"] is None:
        buffer, facts = _edge_facts(setup, args, buffer_path, student_path, student_check=False)
    _agree(setup, args, facts)
    options.record_out_settings(out, _demo_settings(args))  # both ranks' set-up is sound: the folder holds this demo
    return _with_peer_errors(comm, lambda: _demo_edge(setup, args, buffer, student_path))


def _demo_settings(args) -> dict:
    keys = ("dataset", "net", "initial", "initial_steps", "increment", "increments", "steps", "lr", "t_rule", "unit",
            "seed", "teacher", "test_images")
    mine = {k: getattr(args, k) for k in keys}
    mine["teacher"] = options.teacher_path(args)
    return mine


def _check_demo_settings(out: str, args) -> None:
    """An --out folder resumes only the same demo: other settings are refused, not mixed into its CSV."""
    options.check_out_settings(out, _demo_settings(args), "a demo")


def _demo_edge(setup: _Setup, args, buffer, student_path: str) -> int:
    import torch

    from kd.datasets import balanced_subset
    from kd.incremental import file_sha256, save_student
    from kd.trainer import EdgeConfig, train_edge
    from models import cloud_net, load_weights, save_atomic

    data, out = setup.data, args.out
    link = _link(setup, args)
    initial = balanced_subset(data.y_train, args.initial, data.classes, seed=args.seed)
    if buffer.latest() is None and not os.path.exists(student_path):
        # Alg. 1 on the edge: the student starts from the cloud net's shared blocks (read here from the
        # same checkpoint the cloud rank holds) and distils on the labelled initial images.
        teacher = load_weights(cloud_net(data.channels, 32, data.classes), options.teacher_path(args))
        # the initial student is 'aflkd train edge' as it stands (its lr); --lr is the updates' own
        config = replace(_edge_config(args), steps=args.initial_steps or args.steps, lr=EdgeConfig.lr)
        print(f"edge: initial AFLKD student, edge net {args.net}, {args.initial} labelled images, "
              f"{config.steps} steps", flush=True)
        with link.keepalive():  # the cloud rank waits meanwhile: heartbeats tell it the edge lives
            result = train_edge(config, data, initial, teacher=teacher, progress=not args.no_progress,
                                device=setup.device)
        last = result.history[-1]
        initial_state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        save_atomic(initial_state, os.path.join(out, "initial-student.pt"))  # kept: student.pt moves on
        # durably, before the buffer records its sha; with its final T, where the first update's T starts
        save_student(student_path, initial_state, {"generation": 0, "info": {"final_T": round(last["T"], 4)}})
        _write_initial_info(out, {"test_acc": result.test_acc, "seconds": round(result.seconds, 2),
                                  "final_T": round(last["T"], 4), "final_frozen": last["frozen"],
                                  "steps": config.steps, "sha256": file_sha256(student_path)})
        on = f" on {args.test_images} test images" if args.test_images else ""
        print(f"edge: generation 0 (initial student): test acc {result.test_acc:.2%}{on}, T {last['T']:.2f}, "
              f"frozen {last['frozen']}, {result.seconds:.0f} s", flush=True)
    elif buffer.latest() is None and not os.path.exists(os.path.join(out, "initial.json")):
        # killed between writing the initial student and its record: measure it again (generation 0 is still it)
        from kd.teacher import evaluate, to_tensor
        from models import edge_net

        student = load_weights(edge_net(args.net, data.channels, 32, data.classes), student_path)
        _write_initial_info(out, {"test_acc": evaluate(student, to_tensor(data.x_test, data),
                                                       torch.from_numpy(data.y_test)),
                                  "sha256": file_sha256(student_path)})
    order = camera_order(len(data.x_train), initial, args.seed)
    camera = []
    for k in range(args.increments):
        idx = order[k * args.increment : (k + 1) * args.increment]
        camera.append((data.x_train[idx], [f"{args.dataset}/train/{i}" for i in idx]))

    def on_update(record, state, info) -> None:
        _print_record(record, info)
        _write_demo_results(out, buffer, args)

    _edge_loop(setup, args, link, buffer, student_path, camera=camera, on_update=on_update)
    rows = _write_demo_results(out, buffer, args)
    print(f"{'increments':>10} {'images':>7} {'test acc':>8} {'T':>6} {'frozen':>6}")
    for r in rows:
        print(f"{r['increments']:>10} {r['images']:>7} {float(r['test_acc']):>8.2%} {r['final_T']:>6} "
              f"{r['final_frozen']:>6}")
    return 0


def _write_text(path: str, text: str) -> None:
    from models.checkpoint import write_atomic

    write_atomic(path, lambda fh: fh.write(text.encode()))


def _write_initial_info(out: str, info: dict) -> None:
    _write_text(os.path.join(out, "initial.json"), json.dumps(info, indent=1))


def _write_demo_results(out: str, buffer, args) -> list[dict]:
    """The CSV (and plot) from the buffer's generations: rewritten whole after every update, atomically."""
    rows = []
    initial_path = os.path.join(out, "initial.json")
    initial = json.load(open(initial_path)) if os.path.exists(initial_path) else {}
    for g in buffer.generations():
        info = initial if g.generation == 0 else buffer.info(g.generation)
        rows.append({"increments": g.generation, "images": args.initial + g.generation * args.increment,
                     "new_images": 0 if g.generation == 0 else args.increment,
                     "test_acc": f"{info.get('test_acc', float('nan')):.4f}",
                     "test_images": args.test_images or "all", "steps": info.get("steps", ""),
                     "final_T": info.get("final_T", ""), "final_frozen": info.get("final_frozen", ""),
                     "seconds": info.get("seconds", ""), "sha256": g.sha256[:16]})
    if not rows:
        return rows
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path = os.path.join(out, f"incremental-{args.dataset}.csv")
    _write_text(csv_path, text.getvalue())
    if not args.no_plot and len(rows) > 1:
        _plot(rows, csv_path[:-4] + ".png", args)
    return rows


def _plot(rows: list[dict], path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.checkpoint import write_atomic

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([r["images"] for r in rows], [100 * float(r["test_acc"]) for r in rows], "o-", label="AFLKD")
    ax.set_xlabel("training images (initial labelled + cloud-labelled increments)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.dataset}, edge net {args.net}: incremental updates of {args.increment}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
