"""Where the trainer's teacher logits come from: one interface, four sources.

The trainer calls, for every optimiser step ``s`` that distils::

    source.start(s, rows, images)   # ask for batch s's logits (for s > 0: as batch s-1's backward begins)
    source.forward(s)               # batch s's forward pass begins (a controller marks its phases here)
    ...student forward...
    source.logits(s)                # before the loss: wait for them -- float32 (B, classes), CPU, a copy
    source.start(s+1, ...)          # batch s+1, so its transfer overlaps this backward and the next forward
    ...loss, backward, step...

so a source that computes elsewhere (the cloud rank) overlaps the student's
forward and backward passes (edge-KD paper, Fig. 3: Comm overlaps computation,
Backward depends on Comm).  ``rows`` are the batch's indices into the training
subset, ``images`` its augmented images (the same ones the student sees).

* :class:`LocalTeacher` -- a teacher module in this process (on its device, eval mode, no grad).
* :class:`PrecomputedLogits` -- a fixed ``(N, classes)`` table, indexed by ``rows`` (incremental updates).
* :class:`StreamedTeacher` -- logits sent by a cloud rank over MPI (:mod:`kd.streaming` sets it up).
* :class:`UploadingTeacher` -- the edge uploads each batch's frames (:mod:`kd.frames`), the cloud answers
  with their logits: communication that costs the edge CPU (encoding) and bandwidth (MB per batch).

``weights`` is the teacher's state dict where the source has it (the student
of SSLF/AFLKD starts from the teacher's first blocks), else None.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from .channel import TAG_CREDIT, TAG_FRAMES, TAG_LOGITS
from .device import autocast
from .wire import WireFormat

__all__ = ["TeacherSource", "LocalTeacher", "PrecomputedLogits", "StreamedTeacher", "UploadingTeacher", "run_teacher",
           "CloudLost"]

CL = torch.channels_last


class CloudLost(RuntimeError):
    """The cloud rank sent no logits within the timeout: it died or stalled."""


@torch.no_grad()
def run_teacher(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Teacher logits of ``images`` on the teacher's device (autocast on CUDA), as float32 on the CPU.

    The one function every source that runs a teacher uses (in-process and cloud
    rank alike), so streamed and local training see the same numbers.
    """
    device = next(teacher.parameters()).device
    with autocast(device):
        out = teacher(images.to(device, non_blocking=True))
    return out.float().cpu()


class TeacherSource:
    """Batch ``step``'s teacher logits; see the module doc for the calling order."""

    classes: int
    weights: Optional[dict] = None

    def start(self, step: int, sample_idx: torch.Tensor, images: torch.Tensor) -> None:
        """Ask for batch ``step``'s logits (may return before they exist)."""
        raise NotImplementedError

    def logits(self, step: int) -> torch.Tensor:
        """Wait for batch ``step``'s logits: float32 ``(batch, classes)`` on the CPU."""
        raise NotImplementedError

    def forward(self, step: int) -> None:
        """Batch ``step``'s forward pass begins (a controller marks its phases here; sources ignore it)."""

    def close(self) -> None:
        """Release what the source holds (posted receives, buffers)."""


class LocalTeacher(TeacherSource):
    """A teacher module in this process, in eval mode, under ``no_grad`` (on whatever device it is)."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher.eval().to(memory_format=CL)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.weights = teacher.state_dict()
        head = next((m for m in reversed(list(teacher.modules())) if isinstance(m, nn.Linear)), None)
        self.classes = head.out_features if head is not None else None
        self._ready: dict[int, torch.Tensor] = {}

    def start(self, step, sample_idx, images):
        self._ready[step] = run_teacher(self.teacher, images)

    def logits(self, step):
        return self._ready.pop(step)

    def close(self):
        self._ready.clear()


class PrecomputedLogits(TeacherSource):
    """Logits computed once, e.g. returned by the cloud for a batch of new images: ``rows[sample_idx]``."""

    def __init__(self, rows: torch.Tensor, weights: Optional[dict] = None):
        if rows.dim() != 2:
            raise ValueError(f"precomputed logits must be (N, classes), got shape {tuple(rows.shape)}")
        self.rows = rows.detach().float().cpu().contiguous()
        self.classes = rows.shape[1]
        self.weights = weights
        self._ready: dict[int, torch.Tensor] = {}

    def start(self, step, sample_idx, images):
        self._ready[step] = self.rows[sample_idx]

    def logits(self, step):
        return self._ready.pop(step)

    def close(self):
        self._ready.clear()


class _CloudFed(TeacherSource):
    """A source fed by a cloud rank: every wait bounded (:class:`CloudLost`), and heartbeats to the cloud
    from set-up to close (:meth:`keep_in_touch`)."""

    cloud: int
    timeout_s: float
    _touch = None  # (ExitStack of the heartbeat thread, the channel to the cloud) while keeping in touch
    _lost = False  # a wait on the cloud failed: no goodbye (the cloud is gone)

    def keep_in_touch(self, channel) -> None:
        """From now until :meth:`close`: a heartbeat to the cloud every ``timeout_s / 4`` s (from a thread), so
        a cloud whose every wait is bounded tells a slow edge (a long step, a slow set-up) from a dead one."""
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(channel.keepalive())
        self._touch = (stack, channel)

    def _stop_touch(self, goodbye: bool) -> None:
        """End the heartbeats; with ``goodbye``, tell the cloud this edge asks for nothing more."""
        if self._touch is None:
            return
        stack, channel = self._touch
        self._touch = None
        stack.close()  # joins the thread: every heartbeat is sent before the goodbye (one tag: in order)
        if goodbye:
            from .channel import Kind

            channel.send(Kind.BYE, what="goodbye")

    def _wait(self, requests: list, what: str) -> None:
        from runtime import transport

        try:
            transport.wait_or_raise(requests, self.timeout_s, f"cloud rank {self.cloud} {what}", CloudLost)
        except CloudLost:
            self._lost = True
            raise


class StreamedTeacher(_CloudFed):
    """Logits streamed from a cloud rank, at most ``run_ahead`` batches requested ahead of the loss.

    Flow control by credits: for every batch it wants, the edge posts the
    receive into one of ``run_ahead`` ring buffers and then sends the cloud a
    one-integer credit naming the step; the cloud computes a batch only for a
    credit, so neither side ever holds more than ``run_ahead`` batches
    (MPI's eager buffers included).  Steps are taken in order, 0, 1, 2, ...
    A wait longer than ``timeout_s`` raises :class:`CloudLost`.
    """

    LOGITS, CREDIT = TAG_LOGITS, TAG_CREDIT  # messages of one kind between one pair match in posting order

    def __init__(self, comm, cloud: int, steps: int, batch: int, classes: int, wire: WireFormat,
                 run_ahead: int = 2, timeout_s: float = 120.0, weights: Optional[dict] = None):
        if run_ahead < 1:
            raise ValueError(f"run_ahead must be >= 1, got {run_ahead}")
        self.comm, self.cloud, self.steps, self.batch, self.classes = comm, cloud, steps, batch, classes
        self.wire, self.run_ahead, self.timeout_s, self.weights = wire, run_ahead, timeout_s, weights
        self.nbytes = wire.nbytes(batch, classes)
        self.bytes_received = 0
        self.wait_s = 0.0  # time spent waiting for logits (0 when the stream keeps ahead of the edge)
        self._slots = [torch.empty(self.nbytes, dtype=torch.uint8) for _ in range(run_ahead)]
        self._credits = [torch.zeros(1, dtype=torch.int64) for _ in range(run_ahead)]
        self._credit_req: list = [None] * run_ahead
        self._recv: dict[int, object] = {}
        self._next = 0  # next step to request
        self._taken = 0  # next step whose logits the trainer takes
        self.owns_comm = False  # free ``comm`` on close (it was made for this stream)

    def start(self, step, sample_idx, images):
        from runtime import transport

        if step != self._taken:
            raise ValueError(f"streamed logits are taken in step order: expected step {self._taken}, got {step}")
        while self._next < min(step + self.run_ahead, self.steps):
            s, slot = self._next, self._next % self.run_ahead
            self._recv[s] = transport.irecv(self.comm, self._slots[slot], self.cloud, self.LOGITS)
            if self._credit_req[slot] is not None:  # a one-integer eager send: long done
                self._wait([self._credit_req[slot]], f"took no request for step {s - self.run_ahead}")
            self._credits[slot][0] = s
            self._credit_req[slot] = transport.isend(self.comm, self._credits[slot], self.cloud, self.CREDIT)
            self._next += 1

    def logits(self, step):
        if step != self._taken or step not in self._recv:
            raise ValueError(f"logits of step {step} were not started (next: {self._taken})")
        began = time.perf_counter()
        self._wait([self._recv.pop(step)], f"sent no logits for step {step}")
        self.wait_s += time.perf_counter() - began
        self._taken += 1
        self.bytes_received += self.nbytes
        # a copy: the slot takes batch s + run_ahead's logits as soon as the trainer asks for batch s+1,
        # which it does before batch s's loss (the transfer overlaps the backward pass)
        return self.wire.decode(self._slots[step % self.run_ahead], self.batch, self.classes).clone()

    def close(self):
        from runtime import transport

        transport.cancel(list(self._recv.values()))
        transport.cancel([r for r in self._credit_req if r is not None])
        self._recv.clear()
        self._stop_touch(goodbye=not self._lost)
        if self.owns_comm:
            self.owns_comm = False
            transport.free(self.comm, clean=self._taken >= self.steps)


class UploadingTeacher(_CloudFed):
    """Logits of frames this edge uploads: ``start(s)`` encodes batch s's images and sends them, the cloud
    labels them, ``logits(s)`` waits for the answer.  One batch in flight: the frames of step s+1 exist only
    once the trainer hands them over (it does so as batch s's backward pass begins).

    ``threads`` is how many encoder threads the next :meth:`start` uses (a controller sets it per phase).
    """

    LOGITS, FRAMES = TAG_LOGITS, TAG_FRAMES

    def __init__(self, comm, cloud: int, steps: int, batch: int, classes: int, wire: WireFormat, encoder,
                 timeout_s: float = 120.0, weights: Optional[dict] = None):
        self.comm, self.cloud, self.steps, self.batch, self.classes = comm, cloud, steps, batch, classes
        self.wire, self.encoder, self.timeout_s, self.weights = wire, encoder, timeout_s, weights
        self.threads = 1
        self.nbytes = wire.nbytes(batch, classes)
        self.bytes_received = self.bytes_sent = 0
        self.wait_s = self.encode_s = 0.0
        self._slot = torch.empty(self.nbytes, dtype=torch.uint8)
        self._recv = self._send = None
        self._message: Optional[torch.Tensor] = None
        self._pending: Optional[int] = None
        self._taken = 0
        self.owns_comm = False

    def start(self, step, sample_idx, images):
        from runtime import transport

        if step != self._taken or self._pending is not None:
            raise ValueError(f"frames are uploaded one batch at a time, in step order: expected step {self._taken}, "
                             f"got {step}")
        began = time.perf_counter()
        message = self.encoder.encode(step, images, self.threads)
        self.encode_s += time.perf_counter() - began
        self._recv = transport.irecv(self.comm, self._slot, self.cloud, self.LOGITS)
        if self._send is not None:  # the previous batch's frames: their logits came back, so they arrived
            self._wait([self._send], f"took no frames of step {step - 1}")
        self._message = message
        self._send = transport.isend(self.comm, message, self.cloud, self.FRAMES)
        self.bytes_sent += message.numel()
        self._pending = step

    def logits(self, step):
        if step != self._pending:
            raise ValueError(f"logits of step {step} were not started (next: {self._taken})")
        began = time.perf_counter()
        self._wait([self._recv], f"sent no logits for the frames of step {step}")
        self.wait_s += time.perf_counter() - began
        self._recv, self._pending = None, None
        self._taken += 1
        self.bytes_received += self.nbytes
        return self.wire.decode(self._slot, self.batch, self.classes).clone()  # the slot is reused at start(s+1)

    def close(self):
        from runtime import transport

        transport.cancel([r for r in (self._recv, self._send) if r is not None])
        self._recv = self._send = None
        self.encoder.close()
        self._stop_touch(goodbye=not self._lost)
        if self.owns_comm:
            self.owns_comm = False
            transport.free(self.comm, clean=self._taken >= self.steps)
