"""The MPI layer of streamed distillation: non-blocking byte buffers, bounded waits, set-up objects.

Thin on purpose (every mpi4py call of the stream lives here; what to send and
when is :mod:`kd.streaming`'s business).  Hot-path messages are contiguous
torch tensors sent through the buffer API (``Isend``/``Irecv`` on numpy views,
no pickling); set-up and results are small pickled objects.  No wait here
blocks forever: each polls ``Test`` (sleeping between polls, so a waiting rank
leaves the cores to the ones that compute) until a deadline, and reports a
peer that never answered instead of hanging.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from mpi4py import MPI

from .comm import message

__all__ = ["PeerTimeout", "POLL_S", "dup", "free", "isend", "irecv", "wait_by", "wait_or_raise", "cancel",
           "send_object",
           "recv_object_by", "abort"]

#: Seconds between two polls of a waiting rank: short against a training step, long enough not to spin.
POLL_S = 0.0005


class PeerTimeout(RuntimeError):
    """A peer rank sent nothing before the deadline: it died or stalled."""


def dup(comm: MPI.Comm) -> MPI.Comm:
    """A private communicator (collective): a stream's messages never match anyone else's."""
    return comm.Dup()


def free(comm: MPI.Comm) -> None:
    comm.Free()


def isend(comm: MPI.Comm, buffer: torch.Tensor, dest: int, tag: int) -> MPI.Request:
    """Non-blocking send of a contiguous tensor (it must stay untouched until the request completes)."""
    return comm.Isend(message(buffer), dest=dest, tag=tag)


def irecv(comm: MPI.Comm, buffer: torch.Tensor, source: int, tag: int) -> MPI.Request:
    """Non-blocking receive into a contiguous tensor of exactly the message's size."""
    return comm.Irecv(message(buffer), source=source, tag=tag)


def wait_by(requests: list, deadline: Optional[float], poll_s: float = POLL_S) -> bool:
    """Wait for every request until ``deadline`` (``time.monotonic()``; None: no limit); False if time ran out."""
    while not MPI.Request.Testall(requests):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def cancel(requests: list, grace_s: float = 1.0) -> None:
    """Cancel requests that have not completed (posted receives of a stream that ends early).

    A cancelled request must still be completed; one whose cancellation does not
    go through within ``grace_s`` (a send already on its way) is left to
    MPI_Finalize.
    """
    for request in requests:
        if request == MPI.REQUEST_NULL or request.Test():
            continue
        request.Cancel()
        wait_by([request], time.monotonic() + grace_s)


def wait_or_raise(requests: list, timeout_s: float, what: str, error: type = PeerTimeout) -> None:
    """Wait for every request for ``timeout_s`` s; else cancel the ones still open and raise ``error``.

    Cancelling first matters: a receive left posted after the timeout could later
    write into a buffer its owner has reused or freed, and it keeps MPI_Finalize
    waiting.  The message is ``"{what} within {timeout_s} s (--timeout): it died or stalled"``.
    """
    if not wait_by(requests, time.monotonic() + timeout_s):
        cancel(requests)
        raise error(f"{what} within {timeout_s:g} s (--timeout): it died or stalled")


def send_object(comm: MPI.Comm, obj, dest: int, tag: int) -> MPI.Request:
    """Non-blocking send of a small pickled object (set-up, verdicts, results; never a hot path)."""
    return comm.isend(obj, dest=dest, tag=tag)


def recv_object_by(comm: MPI.Comm, source: int, tag: int, deadline: Optional[float], what: str,
                   poll_s: float = POLL_S):
    """Receive a pickled object from ``source``, polling until ``deadline``; :class:`PeerTimeout` naming ``what``."""
    while not comm.iprobe(source=source, tag=tag):
        if deadline is not None and time.monotonic() > deadline:
            raise PeerTimeout(what)
        time.sleep(poll_s)
    return comm.recv(source=source, tag=tag)


#: seconds between the last line a rank prints and MPI_Abort: Hydra forwards a rank's stderr
#: asynchronously and tears its proxies down on abort, so a line printed just before could be lost
#: (seen: 1 run in 4 of the stalled-cloud test printed nothing)
ABORT_GRACE_S = 0.5


def abort(comm: MPI.Comm, code: int) -> None:
    """End every rank of the job now (a peer may be stalled where it never sees an error).

    Flushes this rank's output and gives the launcher a moment to forward it first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


@contextmanager
def heartbeats(send_beat: Callable[[], None], timeout_s: float, name: str = "aflkd-heartbeat"):
    """While the body runs: ``send_beat()`` every ``timeout_s / 4`` s from a thread, so a peer whose
    every wait is bounded by ``timeout_s`` can tell "busy" from "dead".  A failed send is raised here
    once the body ends.  (The beats' MPI calls come from a second thread: MPI_THREAD_MULTIPLE.)"""
    stop = threading.Event()
    failed: list[BaseException] = []

    def beat() -> None:
        while not stop.wait(timeout_s / 4):
            try:
                send_beat()
            except BaseException as err:  # noqa: BLE001 -- reported by the caller's thread
                failed.append(err)
                return

    thread = threading.Thread(target=beat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]
