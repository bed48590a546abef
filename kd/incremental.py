"""Incremental updates of the edge student (AFLKD Alg. 2), crash-safe at every step.

One update, on the edge, each arrow a durable step::

    buffer: >= increment pending ──(1) images to the cloud, its logits back──> (2) label: one transaction
      ──> (3) AFLKD update of the student on them ──> (4) student file written atomically (fsync, rename)
      ──> (5) consume: one transaction marks the batch consumed *and* records generation g + sha256

What a rerun finds after a kill -9 at any point, and does (:func:`reconcile`):

* before (2) commits: the samples are still pending; the cloud is asked again (it keeps no state);
* between (2) and (4): an open batch with its logits, the student file still generation g-1:
  the update is trained again from that student (the cloud is not asked again);
* between (4) and (5): the student file is generation g of this buffer's open batch (its
  metadata says so) but the buffer does not record it: the consumption is completed, **not**
  trained again;
* after (5): nothing to do.

So no acknowledged sample is lost, and no batch ever updates the student twice.  A
student file that is none of these (replaced by hand, another buffer's) is refused.

The cloud is anything with ``logits(images) -> (n, classes) float32``; over MPI it is
:class:`CloudLink` (edge side) and :func:`serve_cloud` (cloud side), on kd's one
channel (:class:`kd.channel.Channel`).  Every wait on the peer is bounded (``timeout_s``,
else :class:`runtime.transport.PeerTimeout`): a header announces the sizes, then the
contiguous uint8 images (or their frames) or float32 logits follow; while the edge
trains it sends heartbeats, so the cloud can tell "busy" from "dead or stalled"; the
cloud does the same while its teacher labels an increment (a CPU teacher on a big
increment may take longer than ``timeout_s``).
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from models.checkpoint import read_saved, write_atomic
from runtime.errors import UsageError

from .buffer import Buffer

__all__ = ["Fault", "UpdateRecord", "reconcile", "run_updates", "update_student", "save_student", "read_student",
           "file_sha256", "AflkdUpdate", "CloudLink", "serve_cloud"]

#: Called at each step boundary with the step's name (tests kill the process there).
Fault = Callable[[str], None]
#: ``update(student_state, images uint8 (n,H,W,C), logits float32 (n,classes), generation, temperature)
#: -> (new state, info)``; ``temperature`` is the T the previous generation ended with (None when it did not
#: record one); ``info`` (JSON-able, e.g. the test accuracy, ``final_T``) is recorded with the generation.
Update = Callable[[dict, np.ndarray, np.ndarray, int, Optional[float]], tuple[dict, dict]]


def _no_fault(_: str) -> None:
    return None


@dataclass(frozen=True)
class UpdateRecord:
    generation: int
    batch: int
    samples: int
    sha256: str
    resumed: bool  # True: the batch was labelled by an earlier, interrupted run (the cloud was not asked again)


# ---------------------------------------------------------------------- the student file
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_student(path: str, state: dict, update: dict, fault: Fault = _no_fault) -> str:
    """Write ``{"model": state, "update": update}`` atomically and durably; return its sha256.

    :func:`models.checkpoint.write_atomic` (temp file + rename: a reader never sees a
    torn file), with the temp file fsynced before the rename and the folder after
    it, so the new student is on disk before the buffer records it.
    """
    raw = io.BytesIO()
    torch.save({"model": state, "update": update}, raw)
    data = raw.getvalue()

    def write(fh) -> None:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        fault("student_partial")  # a kill here leaves a torn temp file, never a torn student
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())

    write_atomic(path, write)
    _fsync_dir(path)
    return hashlib.sha256(data).hexdigest()


def read_student(path: str) -> tuple[dict, Optional[dict]]:
    """``(state dict, update metadata or None)`` of a student file (a plain state dict has none)."""
    state, rest = read_saved(path, what="student", absent=f"train one first ('aflkd train edge --save {path}')")
    return state, rest.get("update")


def _remove_stale_temps(path: str) -> None:
    """Temp files of a writer killed mid-write (write_atomic names them ``NAME.*.tmp``)."""
    for stale in glob.glob(glob.escape(path) + ".*.tmp"):
        os.remove(stale)


# ---------------------------------------------------------------------- recovery and the update loop
def reconcile(buffer: Buffer, student: str) -> tuple[str, str]:
    """Bring the buffer and the student file into agreement after any crash: ``(action, note)``.

    ``action``: ``"started"`` (generation 0 registered), ``""`` (already in agreement),
    ``"recorded"`` (a written update's consumption completed).
    See the module doc for the cases.  Raises :class:`UsageError` for a student file
    that is neither the buffer's latest generation nor its open batch's update.
    """
    _remove_stale_temps(student)
    _, meta = read_student(student)  # also refuses a missing or unreadable file
    sha = file_sha256(student)
    latest = buffer.latest()
    if latest is None:
        buffer.start(sha)
        return "started", f"buffer {buffer.path}: starts from student {student} (generation 0, sha256 {sha[:16]})"
    if sha == latest.sha256:
        return "", ""
    open_batch = buffer.open_batch()
    if (meta is not None and meta.get("buffer") == buffer.uuid and open_batch is not None
            and meta.get("generation") == latest.generation + 1 and meta.get("batch") == open_batch):
        buffer.consume(open_batch, latest.generation + 1, sha, meta.get("info") or {})
        return "recorded", (f"buffer {buffer.path}: the update of batch {open_batch} had written generation "
                f"{latest.generation + 1} but not recorded it; recorded now (not trained again)")
    said = (f"generation {meta.get('generation')} of buffer {meta.get('buffer')}" if meta else "a plain state dict")
    raise UsageError(f"student {student} (sha256 {sha[:16]}, {said}) is not generation {latest.generation} of buffer "
                     f"{buffer.path} (sha256 {latest.sha256[:16]}) nor its next update; put that student back, or "
                     "start a new --buffer for this student")


def run_updates(buffer: Buffer, student: str, cloud, update: Update, increment: int,
                max_updates: Optional[int] = None, fault: Fault = _no_fault,
                on_update: Optional[Callable[[UpdateRecord, dict, dict], None]] = None,
                log: Callable[[str], None] = lambda s: None) -> list[UpdateRecord]:
    """Run updates while the buffer holds an open batch or ``>= increment`` pending samples.

    ``cloud.logits(images)`` labels a batch; ``cloud.keepalive()`` (if it has one)
    wraps the training.  ``on_update(record, state, info)`` sees each new student.
    """
    if increment < 1:
        raise UsageError(f"--increment must be >= 1, got {increment}")
    action, note = reconcile(buffer, student)
    if note:
        log(note)
    records: list[UpdateRecord] = []
    while max_updates is None or len(records) < max_updates:
        batch = buffer.open_batch()
        if batch is None:
            if buffer.counts()["pending"] < increment:
                break
            ids, images = buffer.pending(increment)
            fault("selected")
            logits = np.asarray(cloud.logits(images), dtype=np.float32)
            if logits.ndim != 2 or len(logits) != len(ids):
                raise UsageError(f"the cloud returned logits of shape {logits.shape} for {len(ids)} images")
            fault("exchanged")
            batch = buffer.label(ids, logits)
            fault("labelled")
            resumed = False
        else:
            resumed = True  # an earlier run was cut off after labelling: train from the same student again
            log(f"buffer {buffer.path}: batch {batch} was labelled by an interrupted run; updating with it now")
        _, images, logits = buffer.batch(batch)
        latest = buffer.latest()
        state, meta = read_student(student)
        # Alg. 2 goes on updating W and T (lines 5-6) and initialises neither: T is where the last update
        # left it, as in the experiments' chain (kd/experiments.py); only Alg. 1 draws a starting T
        temperature = ((meta or {}).get("info") or {}).get("final_T")
        generation = latest.generation + 1
        keepalive = getattr(cloud, "keepalive", None)
        with keepalive() if keepalive else nullcontext():
            new_state, info = update(state, images, logits, generation, temperature)
        fault("trained")
        sha = save_student(student, new_state, {"buffer": buffer.uuid, "generation": generation, "batch": batch,
                                                "info": info}, fault)
        fault("student_written")
        buffer.consume(batch, generation, sha, info)
        fault("consumed")
        record = UpdateRecord(generation, batch, len(images), sha, resumed)
        records.append(record)
        if on_update is not None:
            on_update(record, new_state, info)
    return records


# ---------------------------------------------------------------------- the exchange over MPI
def update_student(config, data, state: dict, images: np.ndarray, logits: np.ndarray, generation: int,
                   device=None, progress: bool = False, wrap_source: Optional[Callable] = None,
                   temperature: Optional[float] = None):
    """One incremental update: the student in ``state`` trained on cloud-labelled ``images``.

    The cloud's argmax is the label (the paper takes the cloud's output as the true
    label) and its logits the soft target; T is learnt and Eq. 17 freezes as in the
    initial training.  ``wrap_source(source, config)`` may wrap the logits' source
    (the whole system's core-allocation controller).  ``temperature``: the T the
    previous generation ended with; a method that learns T (aflkd, ctkd) starts from
    it, within [t_min, t_max] (else from ``config.temperature``).  Returns the new
    state (CPU tensors), a summary, and the source used.
    """
    from dataclasses import replace

    from models import edge_net

    from .datasets import ImageArrays
    from .teacher_source import PrecomputedLogits
    from .trainer import train_edge

    student = edge_net(config.net, data.channels, 32, data.classes)
    student.load_state_dict(state)
    batch = ImageArrays(data.name, images, logits.argmax(1).astype(np.int64), data.x_test, data.y_test,
                        data.classes, data.mean, data.std)
    config = replace(config, seed=config.seed + generation)
    if temperature is not None and config.method in ("aflkd", "ctkd"):
        config = replace(config, temperature=min(max(float(temperature), config.t_min), config.t_max))
    source = PrecomputedLogits(torch.from_numpy(logits))
    if wrap_source is not None:
        source = wrap_source(source, config)
    result = train_edge(config, batch, np.arange(len(images)), source=source, progress=progress, device=device,
                        student=student)
    last = result.history[-1]
    info = {"test_acc": result.test_acc, "seconds": round(result.seconds, 2), "start_T": round(config.temperature, 4),
            "final_T": round(last["T"], 4),
            "final_frozen": last["frozen"], "steps": config.steps, "test_images": len(data.y_test)}
    return {k: v.detach().cpu() for k, v in result.model.state_dict().items()}, info, source


class CloudLink:
    """The edge's end of the exchange with the cloud rank (a :class:`kd.channel.Channel`): bounded waits,
    heartbeats while training."""

    def __init__(self, comm, cloud_rank: int, timeout_s: float, encoder=None):
        """``encoder`` (a :class:`kd.frames.FrameEncoder`): the images travel as frames at its size, raw or
        JPEG (``--upload``), encoded on all its threads; None: as the buffer's uint8 pixels."""
        from .channel import Channel

        self.channel = Channel(comm, cloud_rank, timeout_s, f"the cloud rank {cloud_rank}")
        self.encoder = encoder
        self.bytes_sent, self.encode_s = 0, 0.0

    def logits(self, images: np.ndarray) -> np.ndarray:
        from .channel import Kind

        n, h, w, c = images.shape
        if self.encoder is None:
            payload = torch.from_numpy(np.ascontiguousarray(images))
            header = (Kind.REQUEST, n, h, w, c)
        else:
            began = time.perf_counter()
            payload = self.encoder.encode_pixels(0, np.ascontiguousarray(images).transpose(0, 3, 1, 2),
                                                 self.encoder.max_threads)
            self.encode_s += time.perf_counter() - began
            fmt = self.encoder.fmt
            header = (Kind.FRAMES, n, h, w, c, payload.numel(), fmt.size, int(fmt.kind == "jpeg"))
        self.channel.send(*header, payload=payload, what=f"request for {n} images")
        self.bytes_sent += payload.numel()
        # the cloud sends heartbeats while it labels, then the reply
        reply = self.channel.recv(f"logits (nor a heartbeat) for {n} images")
        count, classes = self.channel.expect(reply, Kind.REPLY).values[:2]
        if count != n:
            raise UsageError(f"{self.channel.name} answered logits of {count} images, not {n}")
        logits = torch.empty(count, classes, dtype=torch.float32)
        return self.channel.recv_payload(logits, f"logits for {n} images").numpy()

    def keepalive(self):
        """While the edge trains: a heartbeat every ``timeout_s / 4`` s, so the cloud waits on."""
        return self.channel.keepalive()

    def close(self) -> None:
        from .channel import Kind

        self.channel.send(Kind.BYE)


class AflkdUpdate:
    """The one incremental update step (:data:`Update`): AFLKD on the cloud-labelled batch, from the current
    student, optionally under the core-allocation controller.

    The cloud's argmax is the label (the paper takes the cloud's output as the true label) and its logits
    the soft target (:class:`kd.teacher_source.PrecomputedLogits`); T is learnt from where the last update
    left it and the first n shared units frozen by Eq. 17, as in the initial training.  ``control``:
    ``(policy, cores, cost model or None, cpus)`` feeds the logits through
    :func:`scheduling.controller.controlled` (``aflkd system --control``); the logits of an increment
    arrive in one exchange before it trains, so the controller's Comm phase is then the per-batch hand-over
    of those logits, not a network receive.  Used by ``update run``/``demo`` and ``system`` alike.
    """

    def __init__(self, config, data, device, progress: bool = False, control: Optional[tuple] = None):
        self.config, self.data, self.device, self.progress, self.control = config, data, device, progress, control

    def __call__(self, state: dict, images, logits, generation: int, temperature=None):
        wrap = None if self.control is None else self._controlled
        state, info, source = update_student(self.config, self.data, state, images, logits, generation,
                                             device=self.device, progress=self.progress, wrap_source=wrap,
                                             temperature=temperature)
        if self.control is not None:
            info.update(replans=len(source.ctl.replans), cores=self.control[1],
                        comm_cores=[list(r["comm_cores"]) for r in source.ctl.log if "comm_cores" in r])
        return state, info

    def _controlled(self, source, config):
        from scheduling.controller import controlled

        policy, cores, cost, cpus = self.control
        return controlled(source, policy, cores, config.steps, cost, cpus=list(cpus))


def _frames_back(message: np.ndarray, values: tuple, edge_rank: int) -> np.ndarray:
    """The uint8 pixels ``(n, h, w, c)`` of an upload of frames (values: n, h, w, c, bytes, size, jpeg)."""
    from .frames import FrameFormat, decode_message, frames_to_pixels

    n, h, w, c, _, size, jpeg = values[:7]
    fmt = FrameFormat("jpeg" if jpeg else "raw", size)
    try:
        fmt.check(h)
        if h != w:
            raise ValueError(f"frames of {h}x{w} images (square images only)")
        return frames_to_pixels(decode_message(message, fmt, n, c, 0), h)
    except (UsageError, ValueError) as err:
        raise UsageError(f"the edge rank {edge_rank} sent frames the cloud cannot read: {err}") from None


def serve_cloud(comm, edge_rank: int, logits_of: Callable[[np.ndarray], np.ndarray], timeout_s: float,
                log: Callable[[str], None] = lambda s: None) -> int:
    """The cloud rank: answer the edge's requests with ``logits_of(images)`` until it says bye.

    Returns the number of images labelled.  Every wait is bounded (:class:`kd.channel.Channel`): the edge
    sends a request, a heartbeat or bye at least every ``timeout_s / 4`` s while it lives, and this rank
    sends the edge heartbeats while ``logits_of`` runs (the reply ends them).
    """
    from .channel import Channel, Kind

    edge = Channel(comm, edge_rank, timeout_s, f"the edge rank {edge_rank}")
    served = 0
    while True:
        header = edge.expect(edge.recv("request, heartbeat or goodbye"), Kind.REQUEST, Kind.FRAMES, Kind.BYE)
        if header.kind == Kind.BYE:
            return served
        n, h, w, c = header.values[:4]
        if header.kind == Kind.REQUEST:
            pixels = torch.empty(n, h, w, c, dtype=torch.uint8)
        else:  # frames (--upload): the bytes announced, decoded and averaged back to the buffer's pixels
            pixels = torch.empty(header.values[4], dtype=torch.uint8)
        edge.recv_payload(pixels, f"pixels of the {n} images it announced")
        if header.kind == Kind.FRAMES:
            pixels = torch.from_numpy(_frames_back(pixels.numpy(), header.values, edge_rank))
        with edge.keepalive():  # a slow teacher is not a dead cloud
            labels = logits_of(pixels.numpy())
        logits = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        edge.send(Kind.REPLY, n, logits.shape[1], payload=logits, what="logits")
        served += n
        log(f"cloud: labelled {n} images for the edge rank {edge_rank}")
