"""The one module of the runtime that calls mpi4py: messages on plain tensors, every wait with a deadline.

Tensors travel through the buffer API (upper-case methods) as numpy views of
their memory, never pickled.  A message is any strided view of a tensor -- a
band of rows of a channels-last batch, say -- described to MPI by a derived
datatype built from the view's sizes and strides (cached), so no view is ever
copied into a staging buffer.  Small set-up objects are pickled.

**No wait here is unbounded.**  Every exchange, collective or point-to-point,
is started non-blocking and polled (a short spin, then sleeps, so a waiting
rank leaves the cores to the ones that compute) until the job's deadline
(:func:`set_deadline`, ``--deadline``; default :data:`DEFAULT_DEADLINE_S`).  A
peer that died or stalled becomes a :class:`PeerTimeout` naming the ranks (and
hosts, once :func:`agree` has run) instead of a hang.  A received message whose
size differs from the one the receiver planned is a :class:`MessageSizeError`
naming both ranks, never rows left unwritten or silently cut.

:func:`agree` is the one way a set-up step that can fail on one rank reports
it: every rank says whether it is ready; if any is not, every rank raises the
same :class:`AgreedError` (one line, printed once by the CLI) before any image
moves.

Tags: :func:`halo_tag` gives each halo exchange its node's tag, the same every pass (see
:class:`Prepared` for why that is safe); the fixed tags of set-up and benchmarks are
the ``TAG_*`` constants below, the only other place tags come from.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .errors import UsageError

T = TypeVar("T")

Comm = MPI.Comm
COMM_WORLD = MPI.COMM_WORLD
COMM_SELF = MPI.COMM_SELF

# ---------------------------------------------------------------------- tags: one table
#: Tags must stay below MPI_TAG_UB, which the standard guarantees to be at least 32767.
TAG_LIMIT = 32767
#: Tags of passes (:func:`halo_tag`, the pipeline's image counter) stay below this; fixed tags lie above.
TAG_PASSES = 32000
#: Fixed tags (set-up and measurements; hot-path tags come from :func:`halo_tag` or a pass counter).
TAG_COLUMNS = 32001  # runtime.distribute: a split head's weight columns
TAG_LINK = 32100  # runtime.headcost: the link measurement (+ repeat index, < 32200)
TAG_SIZE_CHECK = 32300  # tests: a deliberately wrong-sized message
TAG_FAULT = 32400  # fault_everywhere: a rank's error, told to every other rank

if TYPE_CHECKING:
    import torch  # imported where tensors are used: a set-up error is refused before torch's 1.3 s import

# ---------------------------------------------------------------------- deadlines
#: Seconds any wait may last before the peer counts as dead or stalled (``--deadline``, ``AFLKD_DEADLINE``).
DEFAULT_DEADLINE_S = 30.0
#: How many deadlines a wait may last while one rank works alone (:func:`long_wait_s`).
LONG_WAIT_FACTOR = 20
#: Seconds between two polls of a waiting rank once the spin is over: short against a layer, not spinning.
POLL_S = 0.0005
#: Seconds a hot-path wait (halo rows, a band, the per-image scatter and gather) spins before it starts
#: sleeping: as MPICH's own Waitall, so no poll interval is added to any exchange on the image path;
#: only a peer late by more than this lets the waiting rank's core rest.
HOT_SPIN_S = 1.0


def _oversubscribed() -> bool:
    """Whether this job has more ranks on this host than this process has cores (the launcher's count of local
    ranks: MPICH's ``MPI_LOCALNRANKS``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``); ``AFLKD_YIELD`` = 1 or 0
    overrides.  Then a spinning wait would hold the core the peer it waits for needs, so it yields instead."""
    forced = os.environ.get("AFLKD_YIELD", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        ranks = int(os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 1)
    except ValueError:
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ranks > cores


#: a spinning wait yields its core between two tests (see :func:`_oversubscribed`)
YIELD_WHILE_SPINNING = _oversubscribed()


def _deadline_from_env() -> float:
    text = os.environ.get("AFLKD_DEADLINE", "")
    try:
        value = float(text) if text else DEFAULT_DEADLINE_S
    except ValueError:
        return DEFAULT_DEADLINE_S
    return value if value > 0 else DEFAULT_DEADLINE_S


_deadline_s = _deadline_from_env()


def set_deadline(seconds: float) -> None:
    """How long any wait of this process may last from now on (seconds, > 0)."""
    global _deadline_s
    if not seconds > 0:
        raise UsageError(f"--deadline must be > 0 seconds, got {seconds}")
    _deadline_s = float(seconds)


def deadline_s() -> float:
    return _deadline_s


class TransportError(RuntimeError):
    """A fault between ranks found while the job runs: the CLI prints it in one line and ends the job."""


class PeerTimeout(TransportError):
    """A peer rank sent nothing before the deadline: it died or stalled."""


class MessageSizeError(TransportError):
    """A received message's size differs from the planned one: the ranks hold different plans."""


class AgreedError(UsageError):
    """A set-up problem that every rank knows about (raised identically on all of them by :func:`agree`)."""


# ---------------------------------------------------------------------- who is who (for messages)
_hosts: dict[int, str] = {}


def host_name() -> str:
    return socket.gethostname()


def _world_rank(comm: MPI.Comm, r: int) -> int:
    if comm == MPI.COMM_WORLD or r < 0:
        return r
    try:
        return MPI.Group.Translate_ranks(comm.Get_group(), [r], MPI.COMM_WORLD.Get_group())[0]
    except MPI.Exception:
        return r


def who(comm: MPI.Comm, r: int) -> str:
    """``rank W (host)``: the world rank of ``comm``'s rank ``r``, with its host once known."""
    w = _world_rank(comm, r)
    host = _hosts.get(w)
    return f"rank {w} ({host})" if host else f"rank {w}"


def me() -> str:
    return who(MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank()) if MPI.Is_initialized() else "rank 0"


# ---------------------------------------------------------------------- messages
def halo_tag(node: int, nodes: int) -> int:
    """The tag of the halo exchange of graph node ``node`` (of ``nodes``): the same every pass, which is safe
    because every pass posts the same messages in the same order (see :class:`Prepared`)."""
    if not 0 <= node < nodes:
        raise ValueError(f"node index {node} outside [0, {nodes})")
    if node >= TAG_PASSES:
        raise ValueError(f"a graph of {nodes} nodes has more halo exchanges than tags below {TAG_PASSES}")
    return node


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    """The predefined MPI datatype of a numpy dtype (reductions need predefined types)."""
    found = MPI._typedict.get(dtype.char)
    return found if found is not None else dtlib.from_numpy_dtype(dtype)


def _numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: such tensors travel as same-sized integers
        t = t.view(torch.int16)
    return t.numpy()


@lru_cache(maxsize=None)
def _strided_type(sizes: tuple[int, ...], strides: tuple[int, ...], numpy_dtype: str):
    """A committed MPI datatype laying out ``sizes`` elements at ``strides`` (in elements).

    Dimensions that are contiguous in memory are merged first, so a contiguous
    view is a plain ``count x base`` message and a band of rows of a
    channels-last batch one ``vector``.
    """
    base = _mpi_type(np.dtype(numpy_dtype))
    itemsize = np.dtype(numpy_dtype).itemsize
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    merged: list[list[int]] = []
    for n, s in reversed(dims):  # innermost first
        if merged and s == merged[-1][0] * merged[-1][1]:
            merged[-1][0] *= n
        else:
            merged.append([n, s])
    if not merged:
        return base, 1
    if merged[0][1] == 1 and len(merged) == 1:
        return base, merged[0][0]
    dtype = base
    if merged[0][1] == 1:
        inner, merged = merged[0][0], merged[1:]
        dtype = base.Create_contiguous(inner)
    for n, s in merged:
        dtype = dtype.Create_hvector(n, 1, s * itemsize)
    dtype.Commit()
    return dtype, 1


#: the wire order of a map's halo rows: (N, H, W, C), the memory order of a channels-last map, so that a
#: channels-last band is one contiguous block (no pack, no unpack) and any other layout still agrees with it
CHANNELS_LAST_ORDER = (0, 2, 3, 1)


def message(t: torch.Tensor, order: Optional[tuple[int, ...]] = None) -> list:
    """A buffer-API message over ``t``'s own memory (any strides, no copy): ``[array, count, datatype]``.

    The elements travel in ``t``'s logical order, or in the dimension order ``order`` (both ends must use
    the same one): a channels-last band in logical (NCHW) order is a nested strided type that MPI packs
    element by element, while in :data:`CHANNELS_LAST_ORDER` it is one contiguous block."""
    t = t.detach()
    if order is not None:
        t = t.permute(order)
    if t.numel() == 0:
        return [np.empty(0, dtype=np.float32), 0, MPI.FLOAT]
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = t.as_strided((span,), (1,), t.storage_offset())
    array = _numpy(flat)
    dtype, count = _strided_type(tuple(t.shape), tuple(t.stride()), array.dtype.str)
    return [array, count, dtype]


class Pending:
    """Requests in flight, with what each receive expects (communicator, peer, count, datatype), so that
    :func:`wait` can check the size of every message received and name the peer of a fault."""

    __slots__ = ("comm", "requests", "expect", "what")

    def __init__(self, comm: MPI.Comm, what: str = "an exchange"):
        self.comm, self.requests, self.expect, self.what = comm, [], [], what

    def recv(self, msg: list, source: int, tag: int) -> "Pending":
        self.requests.append(self.comm.Irecv(msg, source=source, tag=tag))
        self.expect.append((self.comm, source, msg[1], msg[2]))
        return self

    def send(self, msg: list, dest: int, tag: int) -> "Pending":
        self.requests.append(self.comm.Isend(msg, dest=dest, tag=tag))
        self.expect.append((self.comm, dest, None, None))
        return self

    def __bool__(self) -> bool:
        return bool(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


def _peers_text(peers: Sequence[tuple]) -> str:
    names = sorted({who(c, p) for c, p in peers if p is not None and p >= 0})
    return ", ".join(names) if names else "its peers"


def _poll(requests: list, statuses: Optional[list], timeout_s: float, on_timeout: Callable[[], str],
          on_error: Callable[[MPI.Exception], str], spin_s: float = HOT_SPIN_S) -> None:
    """Test ``requests`` until all complete: spin for ``spin_s``, then sleep :data:`POLL_S` between
    tests; raise at the deadline."""
    start = time.monotonic()
    end = start + timeout_s
    spin_end = start + spin_s
    pause = POLL_S
    while True:
        try:
            done = MPI.Request.Testall(requests, statuses) if statuses is not None else MPI.Request.Testall(requests)
        except MPI.Exception as err:
            _cancel_open(requests)
            raise MessageSizeError(on_error(err)) from None
        if done:
            return
        now = time.monotonic()
        if now > end:
            _cancel_open(requests)
            raise PeerTimeout(on_timeout())
        if now > spin_end and pause > 0:
            time.sleep(pause)
        elif YIELD_WHILE_SPINNING:
            os.sched_yield()


def _cancel_open(requests: list) -> None:
    """Cancel what is still open so no late message lands in a buffer its owner reuses."""
    for request in requests:
        try:
            if request == MPI.REQUEST_NULL or request.Test():
                continue
            request.Cancel()
        except MPI.Exception:
            continue


def wait(pending, what: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
    """Wait, within the deadline, for a :class:`Pending`, a request, or a list of either.

    Every receive of a :class:`Pending` has its size checked against the planned
    one: a :class:`MessageSizeError` names the sender, never rows left unwritten."""
    if pending is None:
        return
    items = pending if isinstance(pending, (list, tuple)) else [pending]
    requests, expect = [], []
    for item in items:
        if item is None:
            continue
        if isinstance(item, Pending):
            requests += item.requests
            expect += item.expect
            what = what or item.what
        else:
            requests.append(item)
            expect.append((None, None, None, None))
    if not requests:
        return
    label = what or "an exchange"
    timeout_s = _deadline_s if timeout_s is None else timeout_s
    statuses = [MPI.Status() for _ in requests]
    peers = [(c, p) for c, p, _, _ in expect if c is not None]
    senders = [(c, p) for c, p, n, _ in expect if n is not None]
    _poll(requests, statuses, timeout_s,
          lambda: (f"{me()}: no message from {_peers_text(peers)} within {timeout_s:g} s ({label}, --deadline): "
                   "it died or stalled"),
          lambda err: (f"{me()}: a message from {_peers_text(senders)} in {label} is larger than this rank "
                       f"planned ({err.Get_error_string().strip()}): the ranks hold different plans"))
    for item in items:  # done: a second wait on the same exchange returns at once
        if isinstance(item, Pending):
            item.requests, item.expect = [], []
    for (comm, peer, count, dtype), status in zip(expect, statuses):
        if count is None:
            continue
        got = status.Get_count(dtype)
        if got != count:
            source = status.Get_source() if status.Get_source() >= 0 else peer
            raise MessageSizeError(f"{me()}: the message from {who(comm, source)} in {label} is smaller than this "
                                   "rank planned: the ranks hold different plans")


def sendrecv(comm: MPI.Comm, send: Optional[torch.Tensor], dest: Optional[int],
             recv: Optional[torch.Tensor], source: Optional[int], tag: int, what: str = "a transfer") -> None:
    """Exchange: ``send`` to ``dest`` while receiving ``recv`` from ``source`` (None: no peer), with a deadline."""
    pending = Pending(comm, what)
    if recv is not None and source is not None:
        pending.recv(message(recv), source, tag)
    if send is not None and dest is not None:
        pending.send(message(send), dest, tag)
    wait(pending)


def post(comm: MPI.Comm, sends: Iterable[tuple[torch.Tensor, int]],
         recvs: Iterable[tuple[torch.Tensor, int]], tag: int) -> Pending:
    """Non-blocking exchange: receives posted first, then sends; wait with :func:`wait`.

    Messages between the same pair with the same tag match in posting order, so
    both ends must list them in the same order (the plan sorts them by row).
    """
    return post_messages(comm, [(message(t), dst) for t, dst in sends], [(message(t), src) for t, src in recvs], tag)


def post_messages(comm: MPI.Comm, sends: Iterable[tuple[list, int]], recvs: Iterable[tuple[list, int]],
                  tag: int, what: str = "a halo exchange") -> Pending:
    """:func:`post` with messages already built by :func:`message` (reused pass after pass on fixed buffers)."""
    pending = Pending(comm, what)
    for m, src in recvs:
        pending.recv(m, src, tag)
    for m, dst in sends:
        pending.send(m, dst, tag)
    return pending


class Prepared:
    """The same messages on the same buffers pass after pass (a buffered halo exchange): MPI persistent
    requests, made once and started (in order) each pass.

    Why: posting with ``Irecv``/``Isend`` parses every message and builds every request again, each pass
    (about 6 us per post measured on edge net 3); starting requests made once costs one call.  Their tag is
    fixed, which is safe because every pass posts the same messages in the same order: MPI matches
    messages of one sender and tag in the order they were sent, so a pass's receive can only take that
    pass's message.  A rank that finished a pass may start the next while its peer is still in the first:
    its new messages queue behind the old ones.  The requests are started one by one, in the order given:
    ``Startall`` may start them in any order, and one value can send two same-sized bands to one peer (a
    strided or dilated read leaves a gap between them), which must not swap."""

    __slots__ = ("comm", "what", "recvs", "sends", "all", "expect_recvs", "expect_sends", "received", "sent")

    def __init__(self, comm: MPI.Comm, sends: Iterable[tuple[list, int]], recvs: Iterable[tuple[list, int]],
                 tag: int, what: str = "a halo exchange"):
        recvs, sends = list(recvs), list(sends)
        self.comm, self.what, self.all, self.recvs, self.sends = comm, what, [], [], []
        self.recvs = [comm.Recv_init(m, source=src, tag=tag) for m, src in recvs]
        self.sends = [comm.Send_init(m, dest=dst, tag=tag) for m, dst in sends]
        self.all = self.recvs + self.sends  # receives first, as post_messages
        self.expect_recvs = [(comm, src, m[1], m[2]) for m, src in recvs]
        self.expect_sends = [(comm, dst, None, None) for _, dst in sends]
        self.received, self.sent = Pending(comm, what), Pending(comm, what)

    def start(self) -> tuple[Pending, Pending]:
        """Start every message: (the receives, the sends), each to :func:`wait` for.  The same two
        :class:`Pending` every pass (a wait empties them by rebinding their lists, never by changing these)."""
        for request in self.all:
            request.Start()
        self.received.requests, self.received.expect = self.recvs, self.expect_recvs
        self.sent.requests, self.sent.expect = self.sends, self.expect_sends
        return self.received, self.sent

    def free(self) -> None:
        """Release the requests (MPI's own objects: Python's collector does not; MPICH names every one left at
        the job's end).  Only after a finished pass: an executor whose pass failed is never run or freed again
        (:class:`runtime.split.SplitExecutor`), so no receive can land in a buffer already released."""
        if not MPI.Is_finalized():
            for request in self.all:
                if request != MPI.REQUEST_NULL:
                    request.Free()
        self.all, self.recvs, self.sends = [], [], []

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 -- at interpreter teardown MPI or this module may be gone already
            pass


def prepare_messages(comm: MPI.Comm, sends: Iterable[tuple[list, int]], recvs: Iterable[tuple[list, int]],
                     tag: int, what: str = "a halo exchange") -> Prepared:
    """Messages built by :func:`message` on fixed buffers, made ready to start every pass (:class:`Prepared`)."""
    return Prepared(comm, sends, recvs, tag, what)


def long_wait_s() -> float:
    """The deadline of a wait while one rank works alone for long (rank 0 profiling or timing the whole
    net, the others idle): :data:`LONG_WAIT_FACTOR` deadlines."""
    return _deadline_s * LONG_WAIT_FACTOR


def _collective(comm: MPI.Comm, request: MPI.Request, what: str, busy: bool = False,
                timeout_s: Optional[float] = None, spin_s: float = HOT_SPIN_S) -> None:
    """Wait for one collective request within the deadline (``busy``: never sleep, for timing;
    ``spin_s`` 0 for set-up and idle waits, which sleep from the start)."""
    timeout_s = _deadline_s if timeout_s is None else timeout_s
    members = comm.Get_size()
    _poll([request], None, timeout_s,
          lambda: (f"{me()}: {what} of {members} ranks did not complete within {timeout_s:g} s (--deadline): "
                   f"{_absent(comm)} died, stalled or left early"),
          lambda err: (f"{me()}: {what} of {members} ranks failed ({err.Get_error_string().strip()}): "
                       "the ranks hold different plans"),
          spin_s=timeout_s if busy else spin_s)


def _absent(comm: MPI.Comm) -> str:
    """Who a collective may be waiting for: the other rank by name when there is one, else a count."""
    others = [r for r in range(comm.Get_size()) if r != comm.Get_rank()]
    if len(others) == 1:
        return who(comm, others[0])
    if len(others) <= 3:
        return "one of " + ", ".join(who(comm, r) for r in others)
    return f"one of the other {len(others)} ranks"


def _row_counts(rows: Sequence, per_row: int) -> tuple[list[int], list[int]]:
    return [len(r) * per_row for r in rows], [r.start * per_row for r in rows]


def scatter_rows(comm: MPI.Comm, image: Optional[torch.Tensor], rows: Sequence, shape: tuple[int, int, int],
                 batch: int, dtype: Optional[torch.dtype] = None, root: int = 0) -> torch.Tensor:
    """Root's ``(N, C, H, W)`` batch -> each rank's band ``rows[rank]`` (objects with start/stop).

    Returns an ``(N, C, h, W)`` view, channels-last when ``N == 1``.
    """
    channels, _, width = shape
    per_row = batch * width * channels
    counts, displs = _row_counts(rows, per_row)
    send = None
    if comm.Get_rank() == root:
        full = image.detach().permute(2, 0, 3, 1).contiguous()  # H-major: each rank's band is contiguous
        array = _numpy(full)
        send = [array, counts, displs, _mpi_type(array.dtype)]
    import torch

    local = torch.empty(len(rows[comm.Get_rank()]), batch, width, channels, dtype=dtype or torch.float32)
    array = _numpy(local)
    _collective(comm, comm.Iscatterv(send, [array, _mpi_type(array.dtype)], root=root), "the input scatter")
    return local.permute(1, 3, 0, 2)


def gather_rows(comm: MPI.Comm, local: torch.Tensor, rows: Sequence, root: int = 0) -> Optional[torch.Tensor]:
    """Each rank's ``(N, C, h, W)`` band -> the whole ``(N, C, H, W)`` map on ``root`` (None elsewhere)."""
    batch, channels, _, width = local.shape
    height = max(r.stop for r in rows)
    per_row = batch * width * channels
    counts, displs = _row_counts(rows, per_row)
    mine = _numpy(local.detach().permute(2, 0, 3, 1).contiguous())
    base = _mpi_type(mine.dtype)
    full = recv = None
    if comm.Get_rank() == root:
        import torch

        full = torch.empty(height, batch, width, channels, dtype=local.dtype)
        recv = [_numpy(full), counts, displs, base]
    _collective(comm, comm.Igatherv([mine, base], recv, root=root), "the gather of the output map")
    return full.permute(1, 3, 0, 2) if full is not None else None


_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def allreduce_(comm: MPI.Comm, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a contiguous tensor over all ranks, in place; every rank gets the result.  One rank: ``t``, with no
    collective started (the bound and the unsplit reference run on ``COMM_SELF`` beside the split's ranks)."""
    if comm.Get_size() == 1:
        return t
    _collective(comm, comm.Iallreduce(MPI.IN_PLACE, message(t), op=_OPS[op]), "an all-reduce")
    return t


def reduce_(comm: MPI.Comm, t: torch.Tensor, op: str = "sum", root: int = 0) -> Optional[torch.Tensor]:
    """Reduce a contiguous tensor onto ``root`` (in place there); None on the other ranks.  One rank: ``t``."""
    if comm.Get_size() == 1:
        return t
    if comm.Get_rank() == root:
        _collective(comm, comm.Ireduce(MPI.IN_PLACE, message(t), op=_OPS[op], root=root), "a reduce")
        return t
    _collective(comm, comm.Ireduce(message(t), None, op=_OPS[op], root=root), "a reduce")
    return None


def idle_barrier(comm: MPI.Comm, what: str = "a barrier", timeout_s: Optional[float] = None) -> None:
    """A barrier whose waiting ranks sleep instead of spinning on a core (MPICH's ``Barrier`` busy-polls:
    while one rank times a multi-threaded run the others would steal its cores).  ``timeout_s``: default
    the deadline; :func:`long_wait_s` where one rank works alone meanwhile."""
    _collective(comm, comm.Ibarrier(), what, timeout_s=timeout_s, spin_s=0.0)


def barrier(comm: MPI.Comm, what: str = "a barrier") -> None:
    """A busy barrier: the tightest common start for timing (still bounded by the deadline)."""
    _collective(comm, comm.Ibarrier(), what, busy=True)


def self_comm() -> MPI.Comm:
    """This process alone (MPI_COMM_SELF): a self-send/recv times the local cost of a message."""
    return MPI.COMM_SELF


# ---------------------------------------------------------------------- small objects (pickled), with deadlines
def _bytes_of(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def bcast_object(comm: MPI.Comm, obj, root: int = 0, what: str = "a set-up broadcast"):
    """Small control data (pickled) from ``root`` to every rank: set-up, verdicts, never tensors on a hot path."""
    data = _bytes_of(obj) if comm.Get_rank() == root else None
    size = np.array([0 if data is None else len(data)], dtype=np.int64)
    _collective(comm, comm.Ibcast([size, MPI.INT64_T], root=root), what)
    buf = data if data is not None else np.empty(int(size[0]), dtype=np.uint8)
    _collective(comm, comm.Ibcast([buf, MPI.BYTE], root=root), what)
    return obj if comm.Get_rank() == root else pickle.loads(buf.tobytes())


def bcast_ints(comm: MPI.Comm, values: Sequence[int], root: int = 0, what: str = "a broadcast") -> tuple[int, ...]:
    """A few integers from ``root`` to every rank in one non-blocking broadcast (per-image control, no pickle)."""
    buf = np.array([int(v) for v in values], dtype=np.int64)
    _collective(comm, comm.Ibcast([buf, MPI.INT64_T], root=root), what)
    return tuple(int(v) for v in buf)


def gather_objects(comm: MPI.Comm, obj, root: int = 0, what: str = "a gather of results"):
    """Small control data (pickled) from every rank onto ``root``; None elsewhere."""
    data = _bytes_of(obj)
    n = comm.Get_size()
    sizes = np.zeros(n, dtype=np.int64)
    mine = np.array([len(data)], dtype=np.int64)
    is_root = comm.Get_rank() == root
    _collective(comm, comm.Igather([mine, MPI.INT64_T], [sizes, MPI.INT64_T] if is_root else None, root=root), what)
    recv = None
    if is_root:
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        buf = np.empty(int(sizes.sum()), dtype=np.uint8)
        recv = [buf, sizes.tolist(), displs.tolist(), MPI.BYTE]
    _collective(comm, comm.Igatherv([data, MPI.BYTE], recv, root=root), what)
    if not is_root:
        return None
    return [pickle.loads(buf[d:d + s].tobytes()) for d, s in zip(displs.tolist(), sizes.tolist())]


def gather_floats(comm: MPI.Comm, values: Sequence[float], root: int = 0, what: str = "a gather of timings"):
    """A few float64 from every rank onto ``root`` as a ``(ranks, len(values))`` array (None elsewhere); no pickle."""
    mine = np.asarray(values, dtype=np.float64).reshape(-1)
    is_root = comm.Get_rank() == root
    out = np.empty((comm.Get_size(), mine.size), dtype=np.float64) if is_root else None
    _collective(comm, comm.Igather([mine, MPI.DOUBLE], [out, MPI.DOUBLE] if is_root else None, root=root), what)
    return out


def allgather_objects(comm: MPI.Comm, obj, what: str = "a set-up exchange") -> list:
    """Small control data (pickled) from every rank, on every rank."""
    data = _bytes_of(obj)
    n = comm.Get_size()
    sizes = np.zeros(n, dtype=np.int64)
    _collective(comm, comm.Iallgather([np.array([len(data)], dtype=np.int64), MPI.INT64_T], [sizes, MPI.INT64_T]),
                what)
    displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    buf = np.empty(int(sizes.sum()), dtype=np.uint8)
    _collective(comm, comm.Iallgatherv([data, MPI.BYTE], [buf, sizes.tolist(), displs.tolist(), MPI.BYTE]), what)
    return [pickle.loads(buf[d:d + s].tobytes()) for d, s in zip(displs.tolist(), sizes.tolist())]


def scatter_objects(comm: MPI.Comm, objs: Optional[list], root: int = 0, what: str = "a set-up scatter"):
    """One small picklable object per rank from ``root`` (set-up only: e.g. each rank's own weights)."""
    n = comm.Get_size()
    is_root = comm.Get_rank() == root
    parts = [_bytes_of(o) for o in objs] if is_root else None
    sizes = np.array([len(p) for p in parts], dtype=np.int64) if is_root else None
    mine = np.zeros(1, dtype=np.int64)
    _collective(comm, comm.Iscatter([sizes, MPI.INT64_T] if is_root else None, [mine, MPI.INT64_T], root=root), what)
    send = None
    if is_root:
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        send = [np.concatenate(parts) if n else np.empty(0, np.uint8), sizes.tolist(), displs.tolist(), MPI.BYTE]
    buf = np.empty(int(mine[0]), dtype=np.uint8)
    _collective(comm, comm.Iscatterv(send, [buf, MPI.BYTE], root=root), what)
    return pickle.loads(buf.tobytes())


def judge_problems(problems: Sequence[Optional[str]], name: Callable[[int], str]) -> Optional[str]:
    """The one line every rank raises when any rank's set-up failed (None: none did); ``name(r)`` names rank r."""
    failed = [(r, p) for r, p in enumerate(problems) if p is not None]
    if not failed:
        return None
    if len(failed) == len(problems) and len({p for _, p in failed}) == 1:
        return failed[0][1]  # the same problem everywhere: no rank to name
    r, text = failed[0]
    more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    return f"{name(r)}: {text}{more}"


def judge_values(values: Sequence[str], root: int, what: str, name: Callable[[int], str]) -> Optional[str]:
    """The one line every rank raises when a rank's ``what`` differs from ``root``'s (None: all equal)."""
    want = values[root]
    for r, v in enumerate(values):
        if v != want:
            return (f"{name(r)} has another {what} than {name(root)} ({v} != {want}): "
                    "give every board the same files and versions")
    return None


def agree(comm: MPI.Comm, problem: Optional[str], what: str = "set-up") -> None:
    """Every rank says whether its set-up worked; if any did not, every rank raises the same :class:`AgreedError`.

    Called at the end of each set-up step that can fail on one board only (an
    output that cannot be written, a file missing, a plan that differs), so
    the job refuses in one line on every rank before any image moves.  Also
    learns every rank's host name, for the messages of later faults.
    """
    reports = allgather_objects(comm, (host_name(), problem), what=f"the {what} agreement")
    for r, (host, _) in enumerate(reports):
        _hosts[_world_rank(comm, r)] = host
    verdict = judge_problems([p for _, p in reports], lambda r: who(comm, r))
    if verdict is not None:
        raise AgreedError(verdict)


def agree_on(comm: MPI.Comm, value: str, what: str, root: int = 0) -> None:
    """Check that every rank computed the same ``value`` (a digest of a plan, a version...) as ``root``.

    Refuses on every rank, naming the first rank that differs, with both values."""
    values = allgather_objects(comm, (host_name(), value), what=f"the {what} agreement")
    for r, (host, _) in enumerate(values):
        _hosts[_world_rank(comm, r)] = host
    verdict = judge_values([v for _, v in values], root, what, lambda r: who(comm, r))
    if verdict is not None:
        raise AgreedError(verdict)


def share_from_root(comm: MPI.Comm, work: Callable[[], T], root: int = 0, error: type = ValueError) -> T:
    """Run ``work`` on ``root`` only and broadcast its (small, picklable) result.

    An ``error`` raised there is re-raised on every rank, so all ranks exit
    together instead of waiting for a dead root.  Set-up only: this pickles.
    """
    result, problem = None, None
    if comm.Get_rank() == root:
        try:
            result = work()
        except error as err:
            problem = str(err)
    result, problem = bcast_object(comm, (result, problem), root=root)
    if problem is not None:
        raise (AgreedError if error is UsageError else error)(problem)
    return result


def host_slot(comm: MPI.Comm) -> tuple[int, int]:
    """(this rank's index among the ranks of ``comm`` on its host, in rank order; how many ranks the host runs)."""
    names = allgather_objects(comm, MPI.Get_processor_name(), what="the host names")
    here = [r for r, name in enumerate(names) if name == names[comm.Get_rank()]]
    return here.index(comm.Get_rank()), len(here)


def ranks_on_this_host(comm: MPI.Comm) -> int:
    """How many ranks of ``comm`` run on this host (share its memory and cores)."""
    return host_slot(comm)[1]


def abort_on_uncaught_exception(comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Make an unexpected exception on one rank end the whole job instead of hanging its peers.

    Same effect as running under ``python -m mpi4py``: print the traceback with
    the rank, then ``Abort`` so no rank waits forever in its next exchange.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if comm.Get_size() > 1:
            sys.stderr.write(f"[rank {comm.Get_rank()}] ")
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
            comm.Abort(1)
        previous(kind, value, tb)

    sys.excepthook = hook


# ---------------------------------------------------------------------- communicators and row bands
def split_comm(comm: MPI.Comm, color: int, key: int) -> MPI.Comm:
    """A sub-communicator of the ranks that give the same ``color``, ordered by ``key``.

    A bounded barrier first: ``Split`` itself cannot time out, so it is only
    entered once every rank is known to be there."""
    idle_barrier(comm, "the split into clusters and stages")
    return comm.Split(color, key)


def free_comm(comm: MPI.Comm) -> None:
    if comm not in (MPI.COMM_WORLD, MPI.COMM_SELF) and comm != MPI.COMM_NULL:
        comm.Free()


def rows_major(rows: int, batch: int, channels: int, width: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty band stored rows-first ``(h, N, W, C)``: any run of rows is one contiguous block.

    ``band.permute(1, 3, 0, 2)`` is the ``(N, C, h, W)`` view the executors use
    (channels-last at batch 1), the layout :func:`scatter_rows` returns.
    """
    import torch

    return torch.empty(rows, batch, width, channels, dtype=dtype or torch.float32)


def isend_rows(comm: MPI.Comm, band: torch.Tensor, dest: int, tag: int, what: str = "a band of rows") -> Pending:
    """Start sending a contiguous rows-first band (keep ``band`` untouched until it completes)."""
    return Pending(comm, what).send(message(band), dest, tag)


def recv_rows(comm: MPI.Comm, band: torch.Tensor, source: int, tag: int, what: str = "a band of rows") -> torch.Tensor:
    """Receive into a contiguous rows-first band whose shape both ends know from the plan (size checked)."""
    wait(Pending(comm, what).recv(message(band), source, tag))
    return band


def irecv_rows(comm: MPI.Comm, band: torch.Tensor, source: int, tag: int, what: str = "a band of rows") -> Pending:
    """Post a receive into a contiguous rows-first band (e.g. one cluster's rows of the root's full map)."""
    return Pending(comm, what).recv(message(band), source, tag)


# ---------------------------------------------------------------------- the whole system: decisions between images
def ibcast(comm: MPI.Comm, t: torch.Tensor, root: int = 0) -> MPI.Request:
    """Non-blocking broadcast of a contiguous tensor (every rank of ``comm`` calls it; wait with a deadline)."""
    return comm.Ibcast(message(t), root=root)


def bcast_tensor(comm: MPI.Comm, t: torch.Tensor, root: int = 0, what: str = "a broadcast") -> torch.Tensor:
    """Broadcast a contiguous tensor in place, within the deadline (a missing rank is named)."""
    _collective(comm, comm.Ibcast(message(t), root=root), what)
    return t


#: a tag no message carries: :func:`progress` probes for it only to run MPI's progress engine
PROGRESS_TAG = 32000


def progress(comm: MPI.Comm) -> None:
    """Let MPI move the messages in flight (one non-blocking probe for a tag nothing uses).

    Without an asynchronous progress thread a large message between two ranks on
    one host moves only while both are inside MPI calls: a pipeline stage that
    calls this between its layers lets the previous stage's band arrive while it
    computes, instead of at its next wait.  Completes no request (their statuses
    stay for :func:`wait`'s size checks)."""
    comm.Iprobe(source=MPI.ANY_SOURCE, tag=PROGRESS_TAG)


def iprobe(comm: MPI.Comm, source: int, tag: int) -> bool:
    """Whether a message from ``source`` with ``tag`` is waiting (never blocks)."""
    return bool(comm.Iprobe(source=source, tag=tag))


def world() -> MPI.Comm:
    """The job's world communicator (so callers need not import mpi4py)."""
    return MPI.COMM_WORLD


def rank(comm: MPI.Comm) -> int:
    return comm.Get_rank()


def size(comm: MPI.Comm) -> int:
    return comm.Get_size()


def fault_everywhere(text: str, window_s: float = 1.5) -> Optional[list]:
    """Tell every other rank of this rank's error, then listen ``window_s`` for theirs.

    Returns every rank's error (by rank) when every rank reported one -- an
    error the whole job hit at once, such as an option checked against the
    world size on every rank -- so the job can end cleanly with one line;
    None when some rank stayed silent (this rank's fault alone: its peers are
    busy elsewhere, and the caller leaves the job).  Point-to-point on a tag
    of its own, so it never matches a collective a healthy peer is in.
    """
    comm = MPI.COMM_WORLD
    me_, size_ = comm.Get_rank(), comm.Get_size()
    sends = [comm.isend(text, dest=r, tag=TAG_FAULT) for r in range(size_) if r != me_]
    got: dict[int, str] = {me_: text}
    end = time.monotonic() + window_s
    status = MPI.Status()
    while len(got) < size_ and time.monotonic() < end:
        if comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_FAULT, status=status):
            source = status.Get_source()
            got[source] = comm.recv(source=source, tag=TAG_FAULT)
        else:
            time.sleep(POLL_S)
    if len(got) < size_:
        return None
    wait_by(sends, time.monotonic() + window_s)
    return [got[r] for r in range(size_)]


def is_running_job() -> bool:
    """Whether this process is one rank of a started MPI job of several ranks."""
    mpi = sys.modules.get("mpi4py.MPI")
    return bool(mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized()
                and mpi.COMM_WORLD.Get_size() > 1)


# ---------------------------------------------------------------------- streams (distillation): bounded waits
def dup(comm: MPI.Comm) -> MPI.Comm:
    """A private communicator (collective): a stream's messages never match anyone else's."""
    idle_barrier(comm, "the start of a stream")
    return comm.Dup()


#: communicators of streams that ended early, kept rather than freed (see :func:`free`)
_ABANDONED: list = []


def free(comm: MPI.Comm, clean: bool = True) -> None:
    """Free a stream's private communicator; one that ended early (``clean=False``) is kept instead.

    MPICH reuses a freed communicator's context id for a later ``Dup``, and messages still in flight
    on the old one (a credit or logits sent to a peer that gave up) then match the new stream's
    receives: seen in a test, a stream got the previous stream's logits for its first two batches.
    A communicator no rank has freed is never reused, so an abandoned one costs only its handle.
    """
    if clean:
        comm.Free()
    else:
        _ABANDONED.append(comm)


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


def probe_bytes(comm: MPI.Comm, source: int, tag: int):
    """A message from ``source`` with ``tag`` that has arrived, matched for this caller alone: (its size in
    bytes, a handle for :func:`recv_probed`), or None.  For messages whose size only the sender knows
    (a batch of JPEG frames): the receiver sizes its buffer from the message itself."""
    status = MPI.Status()
    message = comm.Improbe(source=source, tag=tag, status=status)
    if message is None:
        return None
    return status.Get_count(MPI.BYTE), message


def recv_probed(probed, deadline: Optional[float], what: str) -> np.ndarray:
    """The bytes of a message :func:`probe_bytes` matched, received by ``deadline``; :class:`PeerTimeout`
    naming ``what`` if its data stops coming."""
    nbytes, message = probed
    buffer = np.empty(nbytes, dtype=np.uint8)
    request = message.Irecv([buffer, MPI.BYTE])
    if not wait_by([request], deadline):
        raise PeerTimeout(what)
    return buffer


#: seconds between the last line a rank prints and leaving the job: Hydra forwards a rank's stderr
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


def require_threads(what: str) -> None:
    """One :class:`UsageError` unless MPI lets several threads call it at once (``MPI_THREAD_MULTIPLE``): every
    place that makes MPI calls from a second thread asks first, instead of crashing or corrupting MPI."""
    if MPI.Is_initialized() and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise UsageError(f"{what} needs MPI_THREAD_MULTIPLE; this MPI gives less (use a build of MPI with thread "
                         "support, e.g. the mpich wheel: pip install mpich)")


@contextmanager
def heartbeats(send_beat: Callable[[], None], timeout_s: float, name: str = "aflkd-heartbeat"):
    """While the body runs: ``send_beat()`` every ``timeout_s / 4`` s from a thread, so a peer whose
    every wait is bounded by ``timeout_s`` can tell "busy" from "dead".  A failed send is raised here
    once the body ends.  (The beats' MPI calls come from a second thread: MPI_THREAD_MULTIPLE, checked.)"""
    require_threads("sending heartbeats from a thread while this rank works")
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
