"""Streamed distillation: a cloud rank runs the teacher, edge ranks train students on its logits.

::

    edge rank                         cloud rank (teacher, --device)
    ─────────                         ──────────
    hello: config, subset, shapes ──▶ check every edge against the teacher
                                  ◀── verdict: ok + shared blocks, or one error for all
    per step s:
      post Irecv(logits s), credit s ─▶ rebuild batch s from (subset, seed, s)
      forward pass of the student       teacher forward, encode, Isend ──▶
      wait logits s (deadline) ◀──────
      loss, backward, step

With ``--upload raw|jpeg`` (:mod:`kd.frames`) an edge instead uploads each
batch's frames (as AFLKD's edge sends what it collected to the cloud for
labelling) and the cloud answers with their logits: the frames message is the
credit, one batch in flight.

The cloud answers credits round-robin over its edges, one batch per credit,
so it never runs more than ``run_ahead`` batches ahead of any edge.  Every wait
has a deadline: an edge whose cloud falls silent raises
:class:`kd.teacher_source.CloudLost`, a cloud whose edge does, :class:`EdgeLost`.
From its set-up to its goodbye, each edge sends the cloud a heartbeat every
``timeout / 4`` s from a thread (kd's channel), so a board slower than the
timeout (a long set-up, a long step) is waited for and only a silent one,
hung or dead, is given up on.
Set-up problems (another class count, input shape or training subset, a
teacher file that does not load) become one :class:`UsageError` with the same
text on every rank, before any logits move.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from runtime.progress import progress_bar

from runtime.errors import UsageError

from .batches import BatchStream
from .datasets import ImageArrays
from .teacher import to_tensor
from .teacher_source import LocalTeacher, StreamedTeacher
from .wire import WireFormat, parse_wire

__all__ = ["EdgeJob", "EdgeLost", "open_edge", "open_cloud", "Cloud", "subset_digest"]

from .channel import TAG_CREDIT as CREDIT, TAG_FRAMES as FRAMES, TAG_LOGITS as LOGITS, Channel, Kind  # noqa: E402


class EdgeLost(RuntimeError):
    """An edge rank sent nothing (no request, no heartbeat) within the timeout: it died or stalled."""


@dataclass
class EdgeJob:
    """What one edge rank trains: its config, its training subset (indices into ``x_train``), its wire format."""

    config: object  # kd.trainer.EdgeConfig
    train_idx: np.ndarray
    wire: WireFormat = field(default_factory=lambda: WireFormat("float32"))
    run_ahead: int = 2
    frames: Optional[object] = None  # a kd.frames.FrameFormat: upload the frames (None: the cloud rebuilds batches)
    encode_threads: int = 1  # encoder threads the edge keeps for its frames (a controller uses up to this many)


def subset_digest(data: ImageArrays, train_idx: np.ndarray) -> str:
    """Names the training images by content: the cloud must rebuild batches from the very same ones."""
    digest = hashlib.sha256(np.ascontiguousarray(data.x_train[train_idx]).tobytes())
    digest.update(np.ascontiguousarray(data.y_train[train_idx]).tobytes())
    return digest.hexdigest()[:16]


def _check_ranks(comm, cloud: int) -> None:
    """Every rank checks the same options against the same size: the same error everywhere (agreed)."""
    from runtime.transport import AgreedError

    size = comm.Get_size()
    if size < 2:
        raise UsageError(f"streamed distillation needs a cloud rank and at least one edge rank; run it under "
                         f"'mpiexec -n 2' or more (got {size} rank)")
    if not 0 <= cloud < size:
        raise AgreedError(f"--cloud-rank must be between 0 and {size - 1} for {size} ranks, got {cloud}")


def _input_shape(data: ImageArrays) -> tuple[int, int, int]:
    return tuple(to_tensor(data.x_train[:1], data).shape[1:])


def open_edge(comm, cloud: int, job: EdgeJob, data: ImageArrays, timeout_s: float = 120.0,
              problem: Optional[str] = None) -> StreamedTeacher:
    """The edge's half of the set-up (collective with :func:`open_cloud`): a teacher source fed by ``cloud``.

    ``problem`` is an error this rank found in its own set-up; it is reported
    to every rank as the job's :class:`UsageError`.
    """
    from models import edge_net
    from runtime import transport

    _check_ranks(comm, cloud)
    config = job.config
    if problem is None:
        try:
            job.wire.check(data.classes)
        except UsageError as err:
            problem = str(err)
    from .methods import make_method

    layers = [name for name, _ in edge_net(config.net, data.channels, 32, data.classes).named_children()]
    batches = config.steps if make_method(config).distils else 0  # SSLF, baseline: the teacher's weights only
    hello = {"rank": comm.Get_rank(), "problem": problem, "config": asdict(config), "dataset": data.name,
             "classes": data.classes, "shape": _input_shape(data), "train_idx": np.asarray(job.train_idx),
             "digest": subset_digest(data, job.train_idx), "layers": layers, "wire": str(job.wire),
             "run_ahead": job.run_ahead, "batches": batches,
             "frames": None if job.frames is None else asdict(job.frames)}
    private = transport.dup(comm)
    try:
        channel = Channel(private, cloud, timeout_s, f"cloud rank {cloud}")
        request = channel.send_object(hello)
        verdict = channel.recv_object("set-up answer")
        request.wait()
    except BaseException:
        transport.free(private)
        raise
    if verdict["problem"] is not None:
        transport.free(private)
        from runtime.transport import AgreedError  # every rank of the stream raises it

        raise AgreedError(verdict["problem"])
    batch = min(config.batch, len(job.train_idx))  # as BatchStream: full batches only
    if job.frames is not None:
        from .frames import FrameEncoder
        from .teacher_source import UploadingTeacher

        encoder = FrameEncoder(job.frames, data.mean, data.std, data.channels, max_threads=job.encode_threads)
        source = UploadingTeacher(private, cloud, config.steps, batch, data.classes, job.wire, encoder, timeout_s,
                                  verdict["weights"])
    else:
        source = StreamedTeacher(private, cloud, config.steps, batch, data.classes, job.wire, job.run_ahead,
                                 timeout_s, verdict["weights"])
    source.owns_comm = True
    source.keep_in_touch(channel)  # heartbeats until close: a slow set-up or step is not a dead edge
    return source


def _verdict(hellos: list[dict], cloud: int, classes: int, shape: tuple, dataset: str,
             problem: Optional[str]) -> Optional[str]:
    """The job's one set-up error (the cloud's own first, then edges' in rank order), or None."""
    if problem is not None:
        return problem
    for h in hellos:
        if h["problem"] is not None:
            return h["problem"]
    for h in hellos:
        r = h["rank"]
        if h["classes"] != classes:
            return (f"the teacher on cloud rank {cloud} has {classes} classes but the student on edge rank {r} "
                    f"has {h['classes']} ({h['dataset']}); give every rank the same --dataset and a teacher "
                    "trained on it")
        if h.get("frames"):
            from .frames import FrameFormat

            try:
                FrameFormat(**h["frames"]).check(shape[1])
            except (UsageError, TypeError) as err:
                return f"edge rank {r}: {err}"
        if tuple(h["shape"]) != tuple(shape):
            return (f"the teacher on cloud rank {cloud} takes {tuple(shape)} images but edge rank {r} trains on "
                    f"{tuple(h['shape'])} ({h['dataset']}); give every rank the same --dataset")
    return None


def open_cloud(comm, cloud: int, teacher: Optional[nn.Module], data: Optional[ImageArrays],
               timeout_s: float = 120.0, problem: Optional[str] = None) -> "Cloud":
    """The cloud's half of the set-up (collective with :func:`open_edge`).

    ``teacher`` runs where it is (move it to the device first); ``data`` is the
    dataset the edges draw their subsets from.  ``problem`` (a teacher that
    would not load, say) becomes every rank's :class:`UsageError`.
    """
    from runtime import transport

    _check_ranks(comm, cloud)
    private = transport.dup(comm)
    try:
        edges = [r for r in range(comm.Get_size()) if r != cloud]
        channels = [Channel(private, r, timeout_s, f"edge rank {r}") for r in edges]
        hellos = [c.recv_object("set-up message") for c in channels]
        classes = shape = None
        if problem is None and (teacher is None or data is None):
            problem = "the cloud rank has no teacher or no dataset"
        if problem is None:
            classes = LocalTeacher(teacher).classes
            shape = (next(m for m in teacher.modules() if isinstance(m, nn.Conv2d)).in_channels,
                     *_input_shape(data)[1:])
            problem = _verdict(hellos, cloud, classes, shape, data.name, None)
            if problem is None:
                for h in hellos:
                    if h["dataset"] != data.name or subset_digest(data, h["train_idx"]) != h["digest"]:
                        problem = (f"cloud rank {cloud} and edge rank {h['rank']} hold different training images "
                                   f"({data.name} vs {h['dataset']}); give every rank the same --dataset and "
                                   "--data-root")
                        break
        weights = {k: v.detach().cpu() for k, v in teacher.state_dict().items()} if problem is None else None
        requests = []
        for h, channel in zip(hellos, channels):
            mine = None
            if weights is not None:
                layers = set(h["layers"])
                mine = {k: v for k, v in weights.items() if k.split(".")[0] in layers}
            requests.append(channel.send_object({"problem": problem, "weights": mine}))
        if not transport.wait_by(requests, time.monotonic() + timeout_s):
            raise EdgeLost(f"an edge rank took no set-up answer within {timeout_s:g} s (--timeout): it died or stalled")
    except BaseException:
        transport.free(private)
        raise
    if problem is not None:
        transport.free(private)
        from runtime.transport import AgreedError  # every rank of the stream raises it

        raise AgreedError(problem)
    return Cloud(private, cloud, LocalTeacher(teacher), data, hellos, timeout_s)


class _Edge:
    """The cloud's view of one edge: its batches, wire format, credit and send rings."""

    def __init__(self, hello: dict, data: ImageArrays):
        from .trainer import EdgeConfig

        self.rank = hello["rank"]
        self.config = EdgeConfig(**hello["config"])
        self.steps = hello["batches"]  # batches of logits it will ask for (0: it does not distil)
        self.wire = parse_wire(hello["wire"])
        self.run_ahead = hello["run_ahead"]
        from .frames import FrameFormat

        self.frames = FrameFormat(**hello["frames"]) if hello.get("frames") else None
        self.batches = BatchStream(to_tensor(data.x_train[hello["train_idx"]], data), self.config.batch,
                                   self.config.seed)
        self.nbytes = self.wire.nbytes(self.batches.batch, data.classes)
        self.slots = [torch.empty(self.nbytes, dtype=torch.uint8) for _ in range(self.run_ahead)]
        self.sends: list = [None] * self.run_ahead
        self.credit = torch.zeros(1, dtype=torch.int64)
        self.credit_request = None
        self.served = 0
        self.bytes_sent = 0
        self.bytes_received = 0  # uploaded frames
        self.heard = 0.0  # time.monotonic() of the last message (request, frames, heartbeat) from the edge
        self.channel = None  # the cloud's kd channel to it (heartbeats, goodbye)


class Cloud:
    """A teacher serving every edge rank of the job until each has had all its batches."""

    def __init__(self, comm, rank: int, teacher: LocalTeacher, data: ImageArrays, hellos: list[dict],
                 timeout_s: float):
        self.comm, self.rank, self.teacher, self.timeout_s = comm, rank, teacher, timeout_s
        self.edges = [_Edge(h, data) for h in hellos]
        for e in self.edges:
            e.channel = Channel(comm, e.rank, timeout_s, f"edge rank {e.rank}")
        self.teacher_s = self.decode_s = 0.0
        self.channels, self.mean, self.std = data.channels, data.mean, data.std
        self.image_size = _input_shape(data)[1]
        self._pool = None  # JPEG decoding threads (made on the first upload)

    def serve(self, progress: bool = False) -> list[dict]:
        """Answer credits until every edge has all its batches; per edge: rank, steps, bytes sent, wire."""
        from runtime import transport

        active = [e for e in self.edges if e.steps > 0]
        for e in active:
            if e.frames is None:
                e.credit_request = transport.irecv(self.comm, e.credit, e.rank, CREDIT)
        bar = progress_bar(total=sum(e.steps for e in self.edges), desc=f"cloud rank {self.rank}", unit="batch",
                           disable=not progress)
        for e in self.edges:
            e.heard = time.monotonic()
        talking = list(self.edges)  # edges that have not said goodbye: each sends a heartbeat every timeout/4
        try:
            while active or talking:
                progressed = False
                for e in list(talking):
                    if self._listen(e):
                        talking.remove(e)
                for e in list(active):
                    if e.frames is not None:
                        probed = transport.probe_bytes(self.comm, e.rank, FRAMES)
                        if probed is None:
                            continue
                        self._answer_frames(e, probed)
                    else:
                        if not e.credit_request.Test():
                            continue
                        self._answer(e, int(e.credit[0]))
                    e.heard = time.monotonic()
                    if e.served >= e.steps:
                        e.credit_request = None
                        active.remove(e)
                    elif e.frames is None:
                        e.credit_request = transport.irecv(self.comm, e.credit, e.rank, CREDIT)
                    progressed = True
                    bar.update()
                silent = [e for e in talking if time.monotonic() - e.heard > self.timeout_s]
                if silent:
                    ranks = ", ".join(str(e.rank) for e in silent)
                    raise EdgeLost(f"edge rank(s) {ranks} sent nothing (no request, no heartbeat) within "
                                   f"{self.timeout_s:g} s (--timeout): died or stalled")
                if not progressed:  # only goodbyes left (SSLF edges train for long on the weights alone): rest
                    time.sleep(transport.POLL_S if active else 0.05)
            pending = [r for e in self.edges for r in e.sends if r is not None]
            if not transport.wait_by(pending, time.monotonic() + self.timeout_s):
                raise EdgeLost(f"an edge rank took no logits within {self.timeout_s:g} s (--timeout): "
                               "died or stalled")
        finally:
            bar.close()
        return [{"rank": e.rank, "steps": e.served, "wire": str(e.wire), "bytes_per_batch": e.nbytes,
                 "bytes_sent": e.bytes_sent, "frames": str(e.frames) if e.frames else None,
                 "frame_bytes_received": e.bytes_received} for e in self.edges]

    def _listen(self, edge: _Edge) -> bool:
        """Read ``edge``'s heartbeats (each says it lives); whether it said goodbye (it asks for nothing more)."""
        while edge.channel.waiting():
            header = edge.channel.expect(edge.channel.recv("heartbeat or goodbye", heartbeats=True),
                                         Kind.HEARTBEAT, Kind.BYE)
            edge.heard = time.monotonic()
            if header.kind == Kind.BYE:
                if edge.served < edge.steps:
                    raise EdgeLost(f"edge rank {edge.rank} stopped after {edge.served} of its {edge.steps} batches")
                return True
        return False

    def _answer(self, edge: _Edge, step: int) -> None:
        """Rebuild ``edge``'s batch ``step``, run the teacher, send the encoded logits."""
        if step != edge.served:
            raise RuntimeError(f"edge rank {edge.rank} asked for batch {step}, expected {edge.served}")
        rows = edge.batches.rows(step)
        self._reply(edge, step, rows, edge.batches.images(step, rows))

    def _answer_frames(self, edge: _Edge, probed) -> None:
        """Receive ``edge``'s uploaded frames, decode them back to images, reply with their logits."""
        from runtime import transport

        from .frames import decode_message, frames_to_images

        step = edge.served
        began = time.perf_counter()
        message = transport.recv_probed(probed, time.monotonic() + self.timeout_s,
                                        f"edge rank {edge.rank} stopped sending the frames of step {step} within "
                                        f"{self.timeout_s:g} s (--timeout)")
        try:
            frames = decode_message(message, edge.frames, edge.batches.batch, self.channels, step, self._decoders())
        except ValueError as err:
            raise transport.TransportError(f"edge rank {edge.rank} sent frames the cloud cannot read: {err}") from None
        images = frames_to_images(frames, self.mean, self.std, self.image_size)
        self.decode_s += time.perf_counter() - began
        edge.bytes_received += message.nbytes
        self._reply(edge, step, None, images)

    def _decoders(self):
        """Threads decoding uploaded JPEG frames: as many as torch's threads on the cloud rank."""
        if self._pool is None and torch.get_num_threads() > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="aflkd-decode")
        return self._pool

    def _reply(self, edge: _Edge, step: int, rows, images: torch.Tensor) -> None:
        """Run the teacher on batch ``step``'s images and send ``edge`` the encoded logits."""
        from runtime import transport

        slot = step % edge.run_ahead
        if edge.sends[slot] is not None and not transport.wait_by([edge.sends[slot]],
                                                               time.monotonic() + self.timeout_s):
            raise EdgeLost(f"edge rank {edge.rank} took no logits within {self.timeout_s:g} s (--timeout): "
                           "died or stalled")
        began = time.perf_counter()
        self.teacher.start(step, rows, images)
        logits = self.teacher.logits(step)
        self.teacher_s += time.perf_counter() - began
        edge.slots[slot].copy_(edge.wire.encode(logits))
        edge.sends[slot] = transport.isend(self.comm, edge.slots[slot], edge.rank, LOGITS)
        edge.served += 1
        edge.bytes_sent += edge.nbytes

    def close(self) -> None:
        from runtime import transport

        transport.cancel([e.credit_request for e in self.edges if e.credit_request is not None])
        sends = [r for e in self.edges for r in e.sends if r is not None]
        clean = all(e.served >= e.steps for e in self.edges) and transport.wait_by(sends, time.monotonic())
        transport.cancel(sends)
        transport.free(self.comm, clean=clean)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
