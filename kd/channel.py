"""kd's one channel between two ranks: typed headers, payloads, heartbeats, every wait bounded.

Incremental updates (edge <-> cloud, their set-up agreement included), the whole system
(trainer <-> inference root, and the reports every rank sends the trainer) and
streamed distillation's set-up (hello, verdict) talk through it, so there is one message format, one set of tags and one way to tell a
busy peer from a dead one:

* a message is a **header** -- int64[8]: its :class:`Kind`, then up to seven values (a
  count, a shape, a generation) -- on :data:`TAG_HEADER`, followed, for the kinds that
  carry one, by a **payload** tensor on :data:`TAG_DATA` whose size the header announced
  (MPI keeps the messages of one source and tag in posting order, so a payload always
  follows its own header, even with heartbeats sent between them from another thread);
* :meth:`Channel.keepalive` sends :attr:`Kind.HEARTBEAT` every ``timeout_s / 4`` s while
  this side works (an update may train longer than the timeout), and :meth:`Channel.recv`
  skips heartbeats, each restarting its deadline: a peer silent for ``timeout_s`` is
  dead or stalled, a :class:`runtime.transport.PeerTimeout` naming it;
* small objects (set-up, verdicts, reports) travel pickled on :data:`TAG_OBJECT`.

Two channels may share a communicator when their peers differ (the trainer talks to
the cloud and to the inference root on one): MPI matches by source as well as tag.
Streamed distillation's hot path pre-posts a run of receives ahead of the trainer
(:mod:`kd.teacher_source`) on its own communicator; its tags are here too, so every
tag kd uses comes from this module.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import torch

from runtime.errors import UsageError

__all__ = ["Kind", "Header", "Channel", "gather_reports", "HEADER", "TAG_HEADER", "TAG_DATA", "TAG_OBJECT", "TAG_LOGITS", "TAG_CREDIT",
           "TAG_FRAMES"]

HEADER = 8  # int64 words of a header
TAG_HEADER, TAG_DATA, TAG_OBJECT = 7001, 7002, 7003
# streamed distillation's per-batch hot path, on each stream's own communicator
TAG_LOGITS, TAG_CREDIT, TAG_FRAMES = 1, 2, 3


class Kind(IntEnum):
    """What a header announces (its values; its payload)."""
    REQUEST = 1    # edge -> cloud: n, h, w, c; the uint8 pixels (n, h, w, c)
    HEARTBEAT = 2  # either way: the sender lives (busy)
    BYE = 3        # edge -> cloud: no more requests
    REPLY = 4      # cloud -> edge: n, classes; the float32 logits (n, classes)
    FRAMES = 5     # edge -> cloud: n, h, w, c, bytes, frame size, jpeg; the encoded frames (uint8)
    WEIGHTS = 11   # trainer -> inference root: generation, n; the float64 flat weights (n,)
    DONE = 12      # trainer -> inference root: generation (the last one); no more students


@dataclass(frozen=True)
class Header:
    kind: Kind
    values: tuple[int, ...]


class Channel:
    """This rank's end of the link with ``peer`` on ``comm`` (``name`` says who the peer is in errors)."""

    def __init__(self, comm, peer: int, timeout_s: float, name: str):
        self.comm, self.peer, self.timeout_s, self.name = comm, peer, timeout_s, name

    # -- sending --------------------------------------------------------------------------------------------
    def send(self, kind: Kind, *values: int, payload: Optional[torch.Tensor] = None,
             what: Optional[str] = None) -> None:
        """Send a header (and its payload, contiguous), bounded: ``what`` names the message in the error."""
        from runtime import transport

        if len(values) > HEADER - 1:
            raise ValueError(f"a header holds {HEADER - 1} values, got {len(values)}")
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = int(kind)
        header[1: 1 + len(values)] = torch.tensor(values, dtype=torch.int64)
        requests = [transport.isend(self.comm, header, self.peer, TAG_HEADER)]
        if payload is not None:
            requests.append(transport.isend(self.comm, payload, self.peer, TAG_DATA))
        transport.wait_or_raise(requests, self.timeout_s,
                                f"{self.name} took no {what or kind.name.lower() + ' message'}")

    def beat(self) -> None:
        self.send(Kind.HEARTBEAT, what="heartbeat")

    @contextmanager
    def keepalive(self):
        """While the body runs: a heartbeat every ``timeout_s / 4`` s from a thread (a failed one is raised
        when the body ends)."""
        from runtime import transport

        with transport.heartbeats(lambda: self.beat(), self.timeout_s, name="aflkd-keepalive"):
            yield

    def send_object(self, obj):
        """Start sending a small pickled object; the request (wait on it with a deadline)."""
        from runtime import transport

        return transport.send_object(self.comm, obj, self.peer, TAG_OBJECT)

    # -- receiving ------------------------------------------------------------------------------------------
    def waiting(self) -> bool:
        """Whether a header from the peer has arrived (never blocks)."""
        from runtime import transport

        return transport.iprobe(self.comm, self.peer, TAG_HEADER)

    def recv(self, what: str, heartbeats: bool = False) -> Header:
        """The next header, each wait bounded by ``timeout_s``; heartbeats are skipped (each restarts the
        deadline) unless ``heartbeats``.  ``what``: what the peer failed to send, for the error."""
        from runtime import transport

        header = torch.zeros(HEADER, dtype=torch.int64)
        while True:
            transport.wait_or_raise([transport.irecv(self.comm, header, self.peer, TAG_HEADER)], self.timeout_s,
                                    f"{self.name} sent no {what}")
            try:
                kind = Kind(int(header[0]))
            except ValueError:
                raise UsageError(f"{self.name} sent an unknown message {header.tolist()}") from None
            if kind != Kind.HEARTBEAT or heartbeats:
                return Header(kind, tuple(int(v) for v in header[1:]))

    def expect(self, header: Header, *kinds: Kind) -> Header:
        """``header`` if it is one of ``kinds``, else one :class:`UsageError` naming the peer."""
        if header.kind not in kinds:
            wanted = " or ".join(k.name.lower() for k in kinds)
            raise UsageError(f"{self.name} sent a {header.kind.name.lower()} message {list(header.values)} where "
                             f"a {wanted} was due")
        return header

    def recv_payload(self, buffer: torch.Tensor, what: str) -> torch.Tensor:
        """Receive the payload announced by the last header into ``buffer`` (its exact size), bounded."""
        from runtime import transport

        transport.wait_or_raise([transport.irecv(self.comm, buffer, self.peer, TAG_DATA)], self.timeout_s,
                                f"{self.name} sent no {what}")
        return buffer

    def recv_object(self, what: str):
        """A small pickled object from the peer within ``timeout_s``."""
        import time

        from runtime import transport

        return transport.recv_object_by(self.comm, self.peer, TAG_OBJECT, time.monotonic() + self.timeout_s,
                                        f"{self.name} sent no {what} within {self.timeout_s:g} s (--timeout): "
                                        "it died or stalled")


def gather_reports(comm, mine, timeout_s: float, root: int = 0, mine_too: bool = True) -> Optional[list]:
    """Every rank's report (a small object) on ``root``, in rank order (with ``root``'s own when ``mine_too``),
    each wait bounded by ``timeout_s``; None on the other ranks.  Point to point and polled, not a collective:
    the root may wait on a rank's last evaluation without spinning on a core."""
    import time

    from runtime import transport

    me = comm.Get_rank()
    if me != root:
        to_root = Channel(comm, root, timeout_s, f"rank {root}")
        if not transport.wait_by([to_root.send_object(mine)], time.monotonic() + timeout_s):
            raise transport.PeerTimeout(f"rank {root} took no report from rank {me} within {timeout_s:g} s "
                                        "(--timeout): it died or stalled")
        return None
    return [mine if r == root else Channel(comm, r, timeout_s, f"rank {r}").recv_object("report")
            for r in range(comm.Get_size()) if mine_too or r != root]
