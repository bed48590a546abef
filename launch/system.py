"""``aflkd system``: the whole system in one mpiexec job (cloud, training rank, inference ranks).

The topology names the roles: its cloud host is the cloud rank (the last rank), the
devices of the cluster ``--train-cluster`` (default ``train``, one device) are the
training rank, and every other device is an inference rank (the height split runs
over them, cluster order).  ``hostfiles/local-system.toml`` is that layout on one
host: rank 0 trains, ranks 1-2 serve, rank 3 is the cloud.  The mechanics (and why a
new student is only ever swapped in between two images) are in :mod:`kd.system`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser"]

EPILOG = """\
examples:
  .venv/bin/mpiexec -n 4 .venv/bin/aflkd system --topology hostfiles/local-system.toml --out out/system
  .venv/bin/mpiexec -n 4 .venv/bin/aflkd system --topology hostfiles/local-system.toml --dataset cifar10 \\
      --net 1 --updates 3 --increment 256 --steps 20 --images 300 --out out/system-cifar
"""


def add_parser(sub) -> None:
    from kd.config import EdgeConfig

    p = sub.add_parser("system", help="under mpiexec: cloud + training rank + inference ranks in one job, "
                       "students swapped in between images",
                       description="Runs the whole system in one job: the cloud rank labels with the teacher; the "
                       "training rank appends camera frames (training images in a seeded order) to a durable "
                       "buffer and runs --updates incremental AFLKD updates of --increment images each; the "
                       "inference ranks serve a stream of test images with the height-split executor, and every "
                       "new student is swapped in between two images (never during one). Reports images/s "
                       "served, test accuracy after each update and the time each update took (table; JSON in "
                       "OUT/system.json).", epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    p.add_argument("--topology", required=True, help="topology file with a cloud, a cluster --train-cluster of one "
                   "device and at least one other device (e.g. hostfiles/local-system.toml)")
    p.add_argument("--train-cluster", default="train", help="the cluster whose one device is the training rank")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (tiny, seeded, an untrained seeded teacher: checks the mechanics), cifar10, "
                   "cifar100 or fashion-mnist (the shipped teacher)")
    p.add_argument("--data-root", default=str(options.DATA_ROOT), help="folder with the dataset files")
    p.add_argument("--teacher", default=None, help="cloud net weights (default: checkpoints/cloud-DATASET.pt)")
    p.add_argument("--net", type=options.edge_net, default="edge3",
                        help="the edge net: 1, 2 or 3 (or edge1, edge2, edge3)")
    p.add_argument("--student", default=None, help="initial student weights (default: a student seeded with "
                   "--seed); ignored when OUT/student.pt exists (the run resumes from it)")
    p.add_argument("--out", required=True, metavar="FOLDER", help="buffer, student and system.json go here")
    p.add_argument("--updates", type=options.positive_int, default=2, help="incremental updates to run")
    p.add_argument("--increment", type=options.positive_int, default=64, help="camera images per update")
    p.add_argument("--steps", type=options.positive_int, default=5, help="optimiser steps of each update")
    p.add_argument("--lr", type=options.positive_float, default=EdgeConfig.lr, help="peak learning rate of an update")
    p.add_argument("--images", type=options.positive_int, default=100,
                   help="serve at least this many images (serving goes on until the last update is swapped in "
                   "and has served an image)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds the inference ranks wait between images "
                   "(a camera's frame interval; 0: as fast as they can)")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write every served input, output and generation (DIR/served.npz) and each generation's "
                   "student (DIR/student-gG.pt), for an independent check; one-host runs (default: none, nothing recorded)")
    p.add_argument("--timeout", type=options.positive_float, default=120.0,
                   help="seconds a rank waits for a peer in any exchange before it ends the job")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream order, the synthetic data and students")
    from .distill import control_options, frame_options

    control_options(p)  # --control, --control-cores, --constants: the training rank's core allocation
    frame_options(p)  # --upload: the training rank sends each increment's images to the cloud as frames
    options.device_option(p, "cloud runs the teacher and the training rank trains")
    p.add_argument("--threads", type=options.threads, default=None,
                   help="torch threads per rank (default: this host's cores / ranks on this host)")
    p.add_argument("--no-progress", action="store_true", help="hide progress lines")
    options.test_images_option(p)
    p.set_defaults(func=_run, sets_own_threads=True)


# ---------------------------------------------------------------------- set-up, the same on every rank
def _roles(topology, train_cluster: str) -> tuple[int, list[int], int]:
    """(training rank, inference ranks, cloud rank) from the topology, or one UsageError."""
    if topology.cloud is None:
        raise UsageError(f"{topology.path} has no cloud host; 'aflkd system' needs one (role = \"cloud\")")
    if train_cluster not in topology.cluster_names:
        raise UsageError(f"{topology.path} has no cluster {train_cluster!r} for the training rank (clusters: "
                         f"{', '.join(topology.cluster_names)}); add one or pass --train-cluster")
    trainers = [d.rank for d in topology.devices if topology.cluster_names[d.cluster] == train_cluster]
    if len(trainers) != 1:
        raise UsageError(f"{topology.path}: cluster {train_cluster!r} has {len(trainers)} devices; the training "
                         "cluster is one device")
    infer = [d.rank for d in topology.devices if d.rank != trainers[0]]
    if not infer:
        raise UsageError(f"{topology.path} has no inference device besides the training rank; add a cluster")
    return trainers[0], infer, topology.cloud_rank


def _data(args):
    from kd.datasets import load_dataset, with_test_subset
    from kd.system import synthetic_dataset

    if args.dataset == "synthetic":
        return with_test_subset(synthetic_dataset(args.seed), args.test_images)
    return with_test_subset(load_dataset(args.dataset, args.data_root), args.test_images)


def _teacher(args, data, device):
    import torch

    if args.dataset == "synthetic" and args.teacher is None:
        from models import cloud_net

        torch.manual_seed(args.seed + 1)
        return cloud_net(data.channels, 32, data.classes).eval().to(device)

    return options.load_teacher(args, data, device)


def _student(args, data):
    import torch

    from models import edge_net

    torch.manual_seed(args.seed)
    return edge_net(args.net, data.channels, 32, data.classes)


def _out_settings(args) -> dict:
    """What an --out folder may only be resumed with: dataset, net and teacher (and, for the synthetic data set,
    whose images and untrained teacher come from it, the seed)."""
    synthetic = args.dataset == "synthetic"
    settings = {"dataset": args.dataset, "net": args.net,
                "teacher": args.teacher or ("untrained, seeded" if synthetic else options.teacher_path(args))}
    return {**settings, "seed": args.seed} if synthetic else settings


def _check_out(args, data, out: str) -> None:
    """--out resumes only a run of the same settings (:func:`_out_settings`); a student left there must load
    into this net (a folder from before settings were recorded has none to compare)."""
    options.check_out_settings(out, _out_settings(args), "a system run")
    left = os.path.join(out, "student.pt")
    if os.path.exists(left):
        from kd.incremental import read_student

        try:
            _student(args, data).load_state_dict(read_student(left)[0])
        except RuntimeError:
            raise UsageError(f"--out {out} holds a student that is not edge net {args.net} for {args.dataset} "
                             "(student.pt); give another --out") from None


def _run(args) -> int:
    from runtime import transport as mpi
    from runtime import transport

    from .ranks import controlled_cpus, default_threads, set_threads
    from .topology import check_world_size, load_topology

    world = mpi.world()
    mpi.abort_on_uncaught_exception(world)
    # the same on every rank: each raises the same UsageError, no exchange needed
    topology = load_topology(args.topology)
    check_world_size(topology, mpi.size(world), with_cloud=True)
    trainer, infer_ranks, cloud = _roles(topology, args.train_cluster)
    if args.interval < 0:
        raise UsageError(f"--interval must be >= 0 seconds, got {args.interval:g}")
    rank = mpi.rank(world)
    threads = default_threads(world)  # a collective (ranks on this host): every rank, outside the try below
    # a problem found on one rank only (a folder, a missing teacher or student file, a dataset) must end every
    # rank with the same one line: every rank-local check runs here and the ranks agree before any exchange
    problem = None
    teacher = device = data = out = None
    try:
        out = options.prepare_folder(args.out, "--out") if rank == trainer else None
        if args.record and rank in (trainer, infer_ranks[0]):
            options.prepare_folder(args.record, "--record")
        set_threads(args.threads or threads)
        from scheduling.controller import check_cores

        from .distill import control_cost

        args.control_cores = check_cores(args.control_cores or threads)
        args.control_model = control_cost(args)
        if args.control_model is not None:
            args.control_model.check(args.control_cores)
        data = _data(args)
        if data.x_train.shape[1:3] not in ((32, 32), (28, 28)):
            raise UsageError(f"{args.dataset} images are {data.x_train.shape[1:3]}; the students take 32x32")
        from kd.frames import parse_frames

        args.upload_format = parse_frames(args.upload, args.frame_size, args.jpeg_quality,
                                          image_size=data.x_train.shape[1])
        if args.updates * args.increment > len(data.x_train):
            raise UsageError(f"--updates x --increment = {args.updates * args.increment} camera images, more than "
                             f"the {len(data.x_train)} training images of {args.dataset}")
        if rank in (trainer, cloud):
            from kd.device import pick_device

            device = pick_device(args.device)
        if rank == cloud:
            teacher = _teacher(args, data, device)
        if rank == trainer:
            _check_out(args, data, str(out))
        if rank == trainer and args.student and not os.path.exists(os.path.join(str(out), "student.pt")):
            from kd.incremental import read_student

            state, _ = read_student(args.student)
            _student(args, data).load_state_dict(state)
    except (UsageError, RuntimeError, OSError) as err:
        problem = f"rank {rank}: {err}".splitlines()[0]
    problems = [p for p in mpi.allgather_objects(world, problem) if p]
    if problems:
        raise mpi.AgreedError(problems[0])
    if rank == trainer:  # every rank's set-up is sound: the folder now holds this run
        options.record_out_settings(str(out), _out_settings(args))
    args.control_cpus = controlled_cpus(world, args.control_cores)  # the trainer's own block of its host
    link = transport.dup(world)
    infer = mpi.split_comm(world, 1 if rank in infer_ranks else 0, rank)
    work = {trainer: lambda: _train(args, data, device, link, trainer, infer_ranks[0], cloud, out),
            cloud: lambda: _cloud(args, data, device, teacher, link, trainer),
            }.get(rank, lambda: _infer(args, data, link, infer, trainer, infer_ranks[0]))
    return _with_peer_errors(world, work)


def _with_peer_errors(comm, work) -> int:
    from runtime import transport as mpi
    from runtime import transport

    try:
        return work()
    except transport.PeerTimeout as err:
        print(f"aflkd: error: rank {mpi.rank(comm)}: {err}; ending the job", file=sys.stderr, flush=True)
        transport.abort(comm, 3)
        return 3
    except UsageError as err:  # found on this rank only: peers wait in an exchange, so end the job
        print(f"aflkd: error: rank {mpi.rank(comm)}: {err}", file=sys.stderr, flush=True)
        transport.abort(comm, 2)
        return 2


# ---------------------------------------------------------------------- the roles
def _cloud(args, data, device, teacher, link, trainer: int) -> int:
    import torch

    from kd.channel import Channel
    from kd.incremental import serve_cloud
    from kd.teacher import to_tensor
    from kd.teacher_source import run_teacher
    from runtime import transport

    def logits_of(images):
        x = to_tensor(images, data).to(device)
        return torch.cat([run_teacher(teacher, x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()

    # twice --timeout: the trainer's own waits on the inference root are bounded by --timeout, so when the root
    # stalls the trainer (which knows who stalled) reports it, not the cloud waiting on the trainer
    labelled = serve_cloud(link, trainer, logits_of, 2 * args.timeout)
    to_trainer = Channel(link, trainer, args.timeout, f"the training rank {trainer}")
    transport.wait_by([to_trainer.send_object({"labelled": labelled})], time.monotonic() + args.timeout)
    return 0


def _infer(args, data, link, infer, trainer: int, root_world: int) -> int:
    import numpy as np

    from kd.channel import Channel
    from kd.system import serve_images
    from kd.teacher import to_tensor
    from runtime import transport as mpi
    from runtime import transport

    root = mpi.rank(infer) == 0
    to_trainer = Channel(link, trainer, args.timeout, f"the training rank {trainer}")
    beats = []  # once the trainer is done it waits for our report: it hears we still serve every --timeout / 4

    def serving(k: int) -> None:
        beats.append(to_trainer.send_object({"serving": k}))

    images = to_tensor(data.x_test, data).contiguous() if root else None
    def progress(k: int, generation: int) -> None:
        if k % 50 == 0:
            print(f"inference: {k} images served (student generation {generation})", flush=True)
    served = serve_images(link, infer, trainer, lambda: _student(args, data), (data.channels, 32, 32), images,
                          data.y_test, args.images, args.timeout, args.interval, bool(args.record),
                          progress=progress if root and not args.no_progress else None, serving=serving)
    if not root:
        return 0
    if args.record:
        np.savez(os.path.join(args.record, "served.npz"), inputs=np.concatenate(served.inputs),
                 outputs=np.concatenate(served.outputs), generations=np.asarray(served.generations))
    request = to_trainer.send_object(served.summary())
    if not transport.wait_by([*beats, request], time.monotonic() + args.timeout):
        raise transport.PeerTimeout(f"the training rank {trainer} took no report within {args.timeout:g} s")
    return 0


def _train(args, data, device, link, trainer: int, root: int, cloud: int, out) -> int:
    import numpy as np
    import torch

    from kd.buffer import Buffer
    from kd.incremental import AflkdUpdate, CloudLink, reconcile, read_student, run_updates, save_student
    from kd.channel import Channel
    from kd.system import send_done, send_weights
    from kd.config import EdgeConfig
    from runtime import transport as mpi

    student_path = str(out / "student.pt")
    buffer = Buffer(str(out / "buffer.sqlite"), data.x_train.shape[1:])
    if not os.path.exists(student_path):
        state, meta = read_student(args.student) if args.student else (_student(args, data).state_dict(), None)
        # a trained student's T is where the first update's T starts (Alg. 2); a fresh one starts at --temperature
        final_t = ((meta or {}).get("info") or {}).get("final_T")
        save_student(student_path, state, {"info": {"final_T": final_t}} if final_t is not None else {})
    reconcile(buffer, student_path)
    start_gen = buffer.latest().generation
    config = EdgeConfig("aflkd", args.net, steps=args.steps, lr=args.lr, seed=args.seed)
    update = AflkdUpdate(config, data, device,
                         control=(args.control, args.control_cores, args.control_model, args.control_cpus or ()))
    encoder = None
    if args.upload_format is not None:
        from kd.frames import FrameEncoder

        encoder = FrameEncoder(args.upload_format, data.mean, data.std, data.channels,
                               image_size=data.x_train.shape[1], max_threads=torch.get_num_threads())
    link_cloud = CloudLink(link, cloud, args.timeout, encoder)
    order = np.random.default_rng(args.seed).permutation(len(data.x_train))

    def record_student(generation: int, state: dict) -> None:
        if args.record:
            torch.save({k: v.detach().cpu() for k, v in state.items()},
                       os.path.join(args.record, f"student-g{generation}.pt"))

    state, _ = read_student(student_path)
    record_student(start_gen, state)
    to_root = Channel(link, root, args.timeout, f"the inference root (rank {root})")
    send_weights(to_root, start_gen, state)
    with to_root.keepalive():  # an update may take longer than --timeout: the root hears we live
        initial_acc = _test_accuracy(args, data, state)  # while the inference ranks already serve
        rows = []
        for u in range(args.updates):
            at = ((start_gen + u) * args.increment) % len(order)
            idx = order[np.arange(at, at + args.increment) % len(order)]
            buffer.append(data.x_train[idx], [f"train:{i}" for i in idx])
            begin = time.monotonic()
            sent = {}

            def on_update(record, new_state, info) -> None:
                sent["generation"], sent["state"], sent["info"] = record.generation, new_state, info

            run_updates(buffer, student_path, link_cloud, update, args.increment, max_updates=1, on_update=on_update)
            seconds = time.monotonic() - begin
            if not sent:
                raise UsageError(f"update {u + 1}: the buffer had fewer than --increment {args.increment} new images "
                                 "(the camera stream repeats frames already used); lower --updates or --increment")
            record_student(sent["generation"], sent["state"])
            send_weights(to_root, sent["generation"], sent["state"])
            rows.append({"generation": sent["generation"], "images": args.increment, "update_s": round(seconds, 3),
                         "test_acc": sent["info"].get("test_acc"), "train_s": sent["info"].get("seconds"),
                         "replans": sent["info"].get("replans"), "comm_cores": sent["info"].get("comm_cores")})
            if not args.no_progress:
                print(f"trainer: generation {sent['generation']} sent to the inference ranks ({seconds:.2f} s, test acc "
                      f"{sent['info'].get('test_acc', float('nan')):.2%})", flush=True)
    send_done(to_root, start_gen + len(rows))
    link_cloud.close()
    clouded = Channel(link, cloud, args.timeout, f"the cloud (rank {cloud})").recv_object("report")
    served = {"serving": 0}
    while "serving" in served:  # the root serves until --images: each "serving" message restarts the deadline
        served = to_root.recv_object("report")
    report = {"command": getattr(args, "command_line", ""), "dataset": args.dataset, "net": args.net,
              "inference_ranks": mpi.size(link) - 2, "initial": {"generation": start_gen, "test_acc": initial_acc},
              "test_images": len(data.y_test),
              "updates": rows, "served": served,
              "cloud_labelled": clouded["labelled"], "control": args.control, "control_cores": args.control_cores,
              "upload": str(args.upload_format) if args.upload_format else None,
              "upload_bytes": link_cloud.bytes_sent, "upload_encode_s": round(link_cloud.encode_s, 3)}
    with open(out / "system.json", "w") as fh:
        json.dump(report, fh, indent=2)
    _print_report(report, out / "system.json")
    return 0


def _test_accuracy(args, data, state: dict) -> float:
    """Top-1 accuracy of a student on the whole test split (plain torch, unsplit)."""
    import torch

    from kd.teacher import evaluate, to_tensor

    model = _student(args, data)
    model.load_state_dict(state)
    return evaluate(model, to_tensor(data.x_test, data), torch.from_numpy(data.y_test))


def _print_report(report: dict, path) -> None:
    served = report["served"]
    swaps = {s["generation"]: s for s in served["swaps"]}
    per = served["per_generation"]
    print(f"{'gen':>4} {'update s':>9} {'test acc':>9} {'swapped at image':>17} {'swap s':>8} "
          f"{'images served':>14} {'served acc':>11}")
    gens = sorted(set(swaps) | {r["generation"] for r in report["updates"]})
    by_gen = {r["generation"]: r for r in report["updates"]}
    by_gen.setdefault(report["initial"]["generation"], {"test_acc": report["initial"]["test_acc"]})
    for g in gens:
        r, s, p = by_gen.get(g, {}), swaps.get(g, {}), per.get(g, per.get(str(g), {}))
        upd = f"{r['update_s']:.2f}" if "update_s" in r else "-"
        acc = f"{r['test_acc']:.2%}" if r.get("test_acc") is not None else "-"
        print(f"{g:>4} {upd:>9} {acc:>9} {s.get('image', '-'):>17} "
              f"{s.get('swap_s', 0):>8.3f} {p.get('images', 0):>14} {p.get('served_acc', 0):>11.2%}")
    print(f"(test acc: on {report['test_images']} test images)")
    print(f"served {served['images']} images in {served['seconds']:.2f} s: {served['images_per_s']:.1f} images/s on "
          f"{report['inference_ranks']} inference ranks; {len(report['updates'])} update(s), cloud labelled "
          f"{report['cloud_labelled']} images; JSON in {path}", flush=True)
