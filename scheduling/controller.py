"""The core-allocation controller on an edge training rank (the edge-KD paper, Sec. II-III, Fig. 3), applied for real.

What is pinned, and why
-----------------------
On the edge, *communication* (completing the receive of a batch's teacher
logits and decoding them: ``TeacherSource.start`` + ``logits`` -- for a
:class:`kd.teacher_source.StreamedTeacher` the Irecv/credit posting, the polled
wait on the requests and ``wire.decode``) and *computation* (the student's
forward and backward) compete for the same cores.  :class:`ControlledSource`
wraps any teacher source and moves every call into it onto one dedicated
**receive thread**, so the two kinds of work are two sets of OS threads whose
cores can be set:

* the receive thread (its native thread id) is pinned with
  ``os.sched_setaffinity(tid, comm_cpus)``;
* every *other* thread of the process (the main thread running the trainer and
  torch's intra-op worker threads, found in ``/proc/self/task``) is pinned to
  ``compute_cpus``, and ``torch.set_num_threads(compute_threads)`` sizes torch's
  pool to those cores.

All MPI calls of the stream happen on the receive thread (the main thread makes
none while training), which MPICH allows at ``MPI_THREAD_MULTIPLE`` (mpi4py's
default request; checked at start).  A source that uploads frames
(:class:`kd.teacher_source.UploadingTeacher`) encodes them on its encoder
threads, pinned with the receive thread.

Phases and what a plan means here
---------------------------------
The trainer marks **Forward_s** with ``forward(s)`` and ends it with
``logits(s)``; **Backward_s** runs from there to ``forward(s+1)``.  It hands
over batch s+1 (``start(s+1)``) as Backward_s begins, so the receive thread
works on batch s+1's communication (encoding and uploading its frames,
receiving its logits) during Backward_s and Forward_{s+1}: the round model's
Comm chain, one batch ahead of the Comp chain.  **Wait_s** is the time inside
``logits(s)`` while the logits are not there: computation is idle, so
communication gets every core (the planner's Comm-alone round).  Each
Forward/Backward phase gets ``c``, the cores communication holds during it:

* ``0 < c < c_total``: the receive and encoder threads on the last ``c`` cores
  (an encoding task started now uses ``c`` encoder threads), the rest of the
  process on the first ``c_total - c`` with as many torch threads (a "pair" round);
* ``c = 0``: computation alone on every core with ``c_total`` threads, and the
  receive thread is *held* (it starts no task until the phase ends: a
  Comp-alone round);
* ``first``: the plan ran the pending communication alone before this Comp
  task (a Comm-alone round), so its CPU part (encoding, sending) runs now on
  every core while computation waits, then the phase goes on;
* communication has a CPU part (encode and send: ``start``) and a remote part
  (the cloud decodes and runs the teacher, the logits cross the wire:
  ``logits``), which needs no core.  A phase entered while no CPU part is
  pending gives computation every core whatever the plan says: no core is kept
  for a thread that would sleep.

Policies: ``planner`` takes ``c`` for the k-th Comp task (F1, B1, F2, B2, ...)
from :func:`scheduling.planner.plan` (the rounds whose decision runs a Comp
task, in order); ``priority`` (the paper's priority allocation) is ``c = 0``
for every phase with ``first`` (exclusive, never shared, communication first:
the round model prices Comm-first and Comp-first the same, but only
Comm-first lets the remote part overlap the computation that follows);
``static:C`` is ``c = C`` in every
phase (the best fixed split is found by trying each); ``none`` runs the same
threads (equal thread counts: ``c_total`` torch threads, ``c_total`` encoder
threads, the receive thread), keeps the rank on its CPUs and moves nothing:
the OS shares the cores.

The round model counts communication as CPU work only.  Its ties between
Comm-alone and Comp-alone rounds are broken towards communication (the DP
tries it first), which here is what lets the remote part overlap.

Known mismatches with the round model: the Comm chain runs at most one batch
ahead (batch s+2's images are handed over only at Backward_{s+1}); threads
change only at phase boundaries, so a task that finishes mid-phase leaves its
cores idle until the phase ends (the model moves them at once, Eq. 5's c-hat).

Re-planning
-----------
The plan is made in the cost model's units (``--constants`` from ``aflkd
schedule profile``, else :func:`ideal_cost`) with workloads per batch.  Every
finished batch compares the measured Forward, Backward and receive times with
the model's ``f(x, c)``/``g(y, c)`` for the cores they had; when one is off by
more than ``tolerance`` (default 20%) for ``patience`` consecutive batches, the
workloads are re-estimated from those batches (``x = t / f(1, c)``,
``y = t / g(1, c)``) and the rest of the run is re-planned.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from runtime.errors import UsageError

from .costmodel import CommModel, CompModel, CostModel

__all__ = ["POLICIES", "parse_policy", "Allocation", "allocation", "machine_cpus", "rank_cpus", "check_cores", "ideal_cost", "phase_cores",
           "Controller", "ControlledSource", "controlled"]

from .policies import POLICIES, parse_policy  # noqa: E402 (the CLI reads them without torch)


def machine_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask when it started controlling)."""
    return sorted(os.sched_getaffinity(0))


def rank_cpus(machine: Sequence[int], cores: int, slot: int, slots: int) -> tuple[list[int], bool]:
    """The CPUs a controlled rank pins itself to: ``cores`` of its own block of the host's CPUs.

    The host's CPUs (``machine``) are cut into ``slots`` equal blocks, one per rank on the host in rank
    order (the cloud's included, so that edges stay off its cores); rank ``slot`` takes the first ``cores``
    of block ``slot``.  Returns (cpus, disjoint): when the blocks are too small for ``cores`` the ranks
    must share, and each takes ``cores`` CPUs from where its block starts (wrapping), so they overlap as
    little as they can.  Before this, every rank took ``machine[:cores]``: all edges on CPUs 0..cores-1.
    """
    machine = sorted(machine)
    n = len(machine)
    if not 1 <= cores <= n or not 0 <= slot < slots:
        raise UsageError(f"{cores} cores for rank slot {slot} of {slots} on a host of {n} CPUs")
    block = n // slots
    if block >= cores:
        return machine[slot * block: slot * block + cores], True
    start = slot * n // slots
    return [machine[(start + i) % n] for i in range(cores)], False


def check_cores(cores: int, available: Optional[int] = None, option: str = "--control-cores") -> int:
    """``cores`` if 1 <= cores <= the cores this process may use, else one clear :class:`UsageError`."""
    available = len(machine_cpus()) if available is None else available
    if not isinstance(cores, int) or cores < 1:
        raise UsageError(f"{option} must be a positive whole number of cores, got {cores}")
    if cores > available:
        raise UsageError(f"{option} {cores} is more than the {available} core(s) this process may use; "
                         f"give 1..{available}")
    return cores


def ideal_cost(cores: int) -> CostModel:
    """Default constants when none were profiled: compute scales with its cores, receive+decode hardly does.

    f(x, c) = x * c_total / (c_total - c) (a1 = 1, a2 = 1/c_total: the compute rate is proportional to the
    compute cores); g(y, c) = y / (0.05 c + 0.05 log(e^19 c)) ~ y / (1 + 0.1 c): the receive is one copy
    plus a small decode, little helped by more cores.
    """
    return CostModel(CompModel(a1=1.0, a2=1.0 / (cores + 1e-9)),
                     CommModel(b1=0.05, b2=0.05, b3=math.exp(19.0)), source="ideal (not profiled)")


def static_split_problem(what: str, cores: int) -> str:
    """Why a static split C of ``cores`` cores (communication C, computation the rest) is refused."""
    if cores < 2:
        return f"{what}: no static split exists on {cores} core (it needs 2 or more: at least one each)"
    return f"{what}: a static split gives communication 1 to {cores - 1} of the {cores} cores"


@dataclass(frozen=True)
class Allocation:
    """Torch threads and the CPUs of the computing threads and of the receive thread; ``hold``: comm waits."""
    compute_threads: int
    compute_cpus: tuple[int, ...]
    comm_cpus: tuple[int, ...]
    hold: bool = False


def allocation(cpus: list[int], comm_cores: int) -> Allocation:
    """The allocation giving communication ``comm_cores`` of ``cpus`` (0: held; len(cpus): comm alone)."""
    total = len(cpus)
    if not 0 <= comm_cores <= total:
        raise UsageError(f"communication cores must be in 0..{total}, got {comm_cores}")
    every = tuple(cpus)
    if comm_cores == 0:
        return Allocation(total, every, every, hold=True)
    if comm_cores == total:  # computation is idle (waiting for logits): the receive thread has every core
        return Allocation(total, every, every)
    return Allocation(total - comm_cores, every[:total - comm_cores], every[total - comm_cores:])


def phase_cores(policy: str, cost: CostModel, cycles: int, cores: int, forward: float, backward: float,
                comm: float) -> list[tuple[int, bool]]:
    """(c, first) for the Comp phases F1, B1, ..., FN, BN (length 2N) under ``policy``.

    ``c``: the cores communication holds during the phase.  ``first``: the communication pending when the
    phase begins (the next batch's, handed over one batch ahead) runs alone on every core before the phase's
    computation -- the plan's Comm-alone round before that Comp task.  The plan's state when Comp task
    (F or B) of cycle j+1 begins is (i, j, k); the communication pending then in the trainer is cycle j+1's,
    so ``first`` is set where the plan has finished it alone (i >= j+1) and the task runs alone.
    """
    from .planner import Workload, plan

    static = parse_policy(policy)
    if static is not None:
        return [(static, False)] * (2 * cycles)
    if policy == "priority":  # exclusive, communication first: its remote part then overlaps computation
        return [(0, True)] * (2 * cycles)
    if policy != "planner":
        raise UsageError(f"no phase plan for policy {policy!r}")
    steps = plan(cost, Workload(cycles, comm, forward, backward, cores)).steps
    out = []
    for st in steps:
        if st.decision[0] == "comm":
            continue
        i, j, _ = st.state
        pair = st.decision[0] == "pair"
        out.append((st.comm_cores if pair else 0, not pair and i >= j + 1))
    assert len(out) == 2 * cycles, (len(out), cycles)
    return out


@dataclass
class Controller:
    """Applies allocations to this process and re-plans on drift (see the module doc).

    ``steps`` is the number of batches the trainer will take; ``cost`` the model
    (default :func:`ideal_cost`); ``workloads`` the initial (forward, backward,
    comm) per batch in the model's units (default 1, 1, 1: the first re-plan
    measures them).
    """
    policy: str
    cores: int
    steps: int
    cost: Optional[CostModel] = None
    workloads: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tolerance: float = 0.2
    patience: int = 2
    cpus: list[int] = field(default_factory=list)
    replans: list[dict] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    background: bool = True  # re-plans on a planning thread: the trainer keeps the old plan until the new is ready

    def __post_init__(self):
        self.static = parse_policy(self.policy)
        if self.steps < 1:
            raise UsageError(f"a controlled run needs at least 1 step, got {self.steps}")
        if not self.tolerance > 0 or self.patience < 1:
            raise UsageError(f"drift tolerance must be > 0 and patience >= 1, got {self.tolerance}, {self.patience}")
        machine = machine_cpus()
        check_cores(self.cores, len(machine))
        self.cpus = list(self.cpus) or machine[:self.cores]
        if len(self.cpus) != self.cores or not set(self.cpus) <= set(machine):
            raise UsageError(f"the controller's CPUs {self.cpus} must be {self.cores} of the CPUs this process "
                             f"may use ({machine})")
        self.cost = self.cost or ideal_cost(self.cores)
        self.cost.check(self.cores)
        self._saved = (torch.get_num_threads(), set(machine))
        if self.static is not None and not 1 <= self.static < self.cores:
            raise UsageError(static_split_problem(f"--control {self.policy}", self.cores))
        self._comm_tids: set = set()
        self._current: Optional[Allocation] = None
        self._off = 0  # consecutive drifting batches
        self._cv = threading.Condition()
        self._wanted: Optional[tuple] = None  # (first step, workloads, request number) for the planning thread
        self._ready: Optional[tuple] = None  # (first step, phases, plan ms, request number) from it
        self._planner: Optional[threading.Thread] = None
        self._requests = self._taken = 0
        self._entered: dict = {}  # (step, phase) -> (c, first) of the plan in use when the phase began
        self.plan_from(0)

    # -- the plan ---------------------------------------------------------------------------------------------
    def _phases_from(self, step: int, workloads: tuple) -> tuple[dict, float]:
        began = time.perf_counter()
        f, b, y = workloads
        cs = phase_cores(self.policy, self.cost, self.steps - step, self.cores, f, b, y)
        return {(step + i // 2, i % 2): c for i, c in enumerate(cs)}, 1e3 * (time.perf_counter() - began)

    def plan_from(self, step: int) -> None:
        """(Re-)plan batches ``step`` .. steps-1 with the current workloads, on this thread."""
        if self.policy == "none":
            self._phases = {}
            return
        self._phases, self.plan_ms = self._phases_from(step, self.workloads)

    def _request_plan(self, step: int) -> None:
        """Ask the planning thread for a plan of batches ``step``.. with the current workloads (the newest
        request wins); the trainer keeps the plan it has until :meth:`comm_cores` finds the new one ready."""
        with self._cv:
            self._requests += 1
            self._wanted = (step, self.workloads, self._requests)
            self._cv.notify()
        if self._planner is None:
            self._planner = threading.Thread(target=self._plan_loop, name="aflkd-planner", daemon=True)
            self._planner.start()

    def _plan_loop(self) -> None:
        while True:
            with self._cv:
                while self._wanted is None:
                    self._cv.wait()
                step, workloads, number = self._wanted
                self._wanted = None
            if step < 0:
                return
            phases, ms = self._phases_from(step, workloads)
            with self._cv:
                self._ready = (step, phases, ms, number)
                self._cv.notify_all()

    def wait_for_plan(self, timeout_s: float = 60.0) -> None:
        """Block until the last requested plan is in use (tests; a run never waits for its planner)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._taken != self._requests and (self._ready is None or self._ready[3] != self._requests):
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("the planning thread gave no plan")
        self._take_plan()

    def _take_plan(self) -> None:
        with self._cv:
            ready, self._ready = self._ready, None
        if ready is None:
            return
        step, phases, ms, number = ready
        self._phases.update(phases)  # batches from ``step`` on; the ones already run are never read again
        self.plan_ms, self._taken = ms, number
        for entry in self.replans:
            if entry.get("request") == number:
                entry["plan_ms"] = ms

    def close(self) -> None:
        """Stop the planning thread (if one was started)."""
        if self._planner is not None:
            with self._cv:
                self._wanted = (-1, self.workloads, -1)
                self._cv.notify()
            self._planner.join(timeout=5)
            self._planner = None

    def comm_cores(self, step: int, phase: int) -> int:
        """Cores communication holds in batch ``step``'s phase 0 (Forward) or 1 (Backward)."""
        if self._ready is not None:
            self._take_plan()
        return self._phases[(step, phase)][0] if self.policy != "none" else 0

    def enter(self, step: int, phase: int) -> tuple[int, bool]:
        """(c, first) of batch ``step``'s ``phase`` as it begins; the phase keeps them (and the log records them)
        even when a re-plan arrives before it ends."""
        key = (step, phase)
        if key not in self._entered:
            self._entered[key] = (self.comm_cores(step, phase), self.comm_first(step, phase))
        return self._entered[key]

    def comm_first(self, step: int, phase: int) -> bool:
        """Whether communication pending when the phase begins runs alone first (a Comm-alone round)."""
        if self.policy == "none":
            return False
        if self._ready is not None:
            self._take_plan()
        return self._phases[(step, phase)][1]

    # -- applying it --------------------------------------------------------------------------------------------
    def attach(self, comm_tids: Sequence[int]) -> None:
        """The OS threads that communicate (the receive thread, encoder threads); under ``none`` the whole
        rank is kept on its CPUs once, and nothing moves after."""
        self._comm_tids = set(comm_tids)
        if self.policy == "none":
            self._pin(set(self.cpus), set(self.cpus))

    def comm_threads(self) -> int:
        """Encoder threads for a communication task starting now: the cores it holds (every core under none)."""
        current = self._current
        if self.policy == "none" or current is None:
            return self.cores
        return len(current.comm_cpus)

    def apply(self, alloc: Optional[Allocation]) -> None:
        """Set torch's threads and both affinities (no-op when unchanged or under policy ``none``)."""
        if self.policy == "none" or alloc is None or alloc == self._current:
            return
        if torch.get_num_threads() != alloc.compute_threads:
            torch.set_num_threads(alloc.compute_threads)
        self._pin(set(alloc.compute_cpus), set(alloc.comm_cpus))
        self._current = alloc

    def _pin(self, compute: set, comm: set) -> None:
        for name in os.listdir("/proc/self/task"):
            tid = int(name)
            try:
                os.sched_setaffinity(tid, comm if tid in self._comm_tids else compute)
            except (ProcessLookupError, FileNotFoundError):  # a thread that just ended
                pass

    def phase(self, step: int, phase: int, idle: bool = False) -> Optional[Allocation]:
        """The allocation of batch ``step``'s phase; ``idle``: communication has nothing to do, so computation
        gets every core whatever the plan says."""
        if self.policy == "none":
            return None
        c = self.enter(step, phase)[0]  # the phase keeps (and the log records) the plan it began under, idle too
        return allocation(self.cpus, self.cores if idle else c)

    def waiting(self) -> Optional[Allocation]:
        """Computation waits for logits: the receive thread gets every core."""
        return None if self.policy == "none" else allocation(self.cpus, self.cores)

    def restore(self) -> None:
        """Threads and affinity as they were before control (and no planning thread)."""
        self.close()
        threads, cpus = self._saved
        torch.set_num_threads(threads)
        self._pin(cpus, cpus)
        self._current = None

    # -- drift ----------------------------------------------------------------------------------------------
    def predicted(self, step: int) -> tuple[float, float, float]:
        """Model times of batch ``step``'s Forward, Backward and receive with its planned cores."""
        f, b, y = self.workloads
        cf, cb = self.comm_cores(step, 0), self.comm_cores(step, 1)
        return (self.cost.comp_time(f, cf), self.cost.comp_time(b, cb),
                self.cost.comm_time(y, cf if cf > 0 else self.cores))

    def observe(self, step: int, forward_s: float, backward_s: float, comm_s: float, wait_s: float = 0.0,
                threads: Optional[tuple[int, int]] = None, first_s: float = 0.0, remote_s: float = 0.0,
                comm_used: Optional[int] = None) -> bool:
        """Record batch ``step``'s measured times; re-plan the rest after ``patience`` drifting batches.

        ``forward_s``/``backward_s``: computation only; ``comm_s``: the CPU part of its communication
        (encoding, sending); ``wait_s``: computation idle, waiting for logits; ``first_s``: computation held
        while communication ran alone first; ``remote_s``: communication waiting on the cloud and the wire
        (no core needed); ``threads``: torch's threads in the forward and backward (so the cores computation
        really had, ``c_total - threads``, which an idle phase makes differ from the plan); ``comm_used``: the
        cores communication held when its CPU part started.  Predictions and re-estimates use these."""
        row = {"step": step, "forward_s": forward_s, "backward_s": backward_s, "comm_s": comm_s, "wait_s": wait_s,
               "first_s": first_s, "remote_s": remote_s}
        if threads is not None:
            row["threads"] = tuple(threads)
        if self.policy == "none":
            self.log.append(row)
            return False
        began = [self._entered.pop((step, p), None) or (self.comm_cores(step, p), self.comm_first(step, p))
                 for p in (0, 1)]
        planned = (began[0][0], began[1][0])
        taken = tuple(self.cores - t for t in threads) if threads is not None else planned  # cores not computing
        used = comm_used if comm_used else (planned[0] or self.cores)
        f, b, y = self.workloads
        pred = (self.cost.comp_time(f, taken[0]), self.cost.comp_time(b, taken[1]), self.cost.comm_time(y, used))
        measured = (forward_s, backward_s, comm_s)
        worst = max(abs(m / p - 1.0) for m, p in zip(measured, pred))
        row.update(comm_cores=planned, taken=taken, comm_used=used,
                   first=(began[0][1], began[1][1]), drift=worst)
        self.log.append(row)
        self._off = self._off + 1 if worst > self.tolerance else 0
        if self.policy != "planner" or self._off < self.patience or step + 1 >= self.steps:
            return False  # priority's plan does not depend on the workloads
        recent = self.log[-self.patience:]
        est = []
        for key, phase in (("forward_s", 0), ("backward_s", 1)):
            est.append(sum(r[key] / self.cost.comp_time(1.0, r["taken"][phase]) for r in recent) / len(recent))
        est.append(sum(r["comm_s"] / self.cost.comm_time(1.0, r["comm_used"]) for r in recent) / len(recent))
        old = self.workloads
        self.workloads = tuple(max(v, 1e-9) for v in est)
        if self.background:
            self._request_plan(step + 1)
            self.replans.append({"after_step": step, "drift": worst, "old": old, "new": self.workloads,
                                 "plan_ms": None, "request": self._requests})
        else:
            self.plan_from(step + 1)
            self.replans.append({"after_step": step, "drift": worst, "old": old, "new": self.workloads,
                                 "plan_ms": self.plan_ms})
        self._off = 0
        return True


_STOP = object()


class ControlledSource:
    """A :class:`kd.teacher_source.TeacherSource` whose calls run on a receive thread, under a controller.

    Pass it to ``train_edge(source=...)`` in place of the source it wraps; the
    loop does not change.  Every policy runs the same threads (equal thread
    counts): the trainer's, torch's pool, one receive thread and the wrapped
    source's encoder threads (``inner.encoder.tids``, when it uploads frames).
    Policy ``none`` keeps the whole rank on its CPUs and never moves a thread:
    the OS shares the cores; the others pin per phase (module doc).
    """

    def __init__(self, inner, controller: Controller, timeout_s: Optional[float] = None):
        if timeout_s is None:  # the wrapped source's own deadline, and a little: it reports its peer first
            inner_s = getattr(inner, "timeout_s", None)
            timeout_s = inner_s + 5.0 if inner_s else _default_wait_s()
        self.inner, self.ctl, self.timeout_s = inner, controller, timeout_s
        self.classes, self.weights = inner.classes, inner.weights
        self._jobs: queue.Queue = queue.Queue()
        self._done: dict[int, tuple] = {}
        self._cond = threading.Condition()
        # the cores the next communication task may start on, set by the trainer's thread *after* it applied
        # the allocation that gives them (None: held, the phase gives computation every core).  The receive
        # thread reads it under the lock when it starts a task, so a task never starts on a stale count.
        self._grant: Optional[int] = controller.cores
        self._closing = False
        self._outstanding = 0  # jobs queued on the receive thread whose CPU part (encode, send) is not done
        self._queued: Optional[int] = None  # the last step handed to the receive thread
        self._first_in: dict = {}  # (step, phase): seconds computation was held while communication ran first
        self._phase: Optional[tuple[int, int]] = None  # the phase the trainer is in
        self._marks: dict = {}
        self.comm_tid: Optional[int] = None
        from runtime.transport import require_threads

        require_threads("the controller's receive thread")
        ready = threading.Event()
        self._thread: Optional[threading.Thread] = threading.Thread(target=self._receive, args=(ready,),
                                                                    name="aflkd-receive", daemon=True)
        self._thread.start()
        ready.wait()
        encoder = getattr(inner, "encoder", None)
        controller.attach([self.comm_tid] + list(getattr(encoder, "tids", [])))

    # the receive thread ---------------------------------------------------------------------------------------
    def _receive(self, ready: threading.Event) -> None:
        self.comm_tid = threading.get_native_id()
        ready.set()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            step, rows, images = job
            with self._cond:  # held while computation has every core
                self._cond.wait_for(lambda: self._grant is not None or self._closing)
                if self._closing:  # the trainer stopped: a task not yet started never starts
                    self._outstanding -= 1
                    self._cond.notify_all()
                    continue
                used = self._grant
            began = time.perf_counter()
            sent = None
            try:
                if hasattr(self.inner, "threads"):  # encoder threads: the cores communication holds now
                    self.inner.threads = used
                self.inner.start(step, rows, images)
                sent = time.perf_counter()
                with self._cond:  # the CPU part is done: the rest waits on the cloud and the wire
                    self._outstanding -= 1
                    self._cond.notify_all()
                result = (self.inner.logits(step), None)
            except BaseException as err:  # handed to the trainer's thread
                result = (None, err)
            with self._cond:
                if sent is None:
                    self._outstanding -= 1
                    sent = time.perf_counter()
                self._done[step] = result + (sent - began, time.perf_counter() - sent, used)
                self._cond.notify_all()

    # the trainer's calls ---------------------------------------------------------------------------------------
    def _enter(self, step: int, phase: int) -> None:
        """Apply the plan of batch ``step``'s ``phase``.  Communication the plan runs first does its CPU part
        now, alone on every core, while computation waits; a phase entered with no CPU part pending (none
        queued, or only waiting on the cloud) gives computation every core: no core is kept for a thread
        that would sleep."""
        self._phase = (step, phase)
        with self._cond:
            pending = self._outstanding > 0
        if pending and self.ctl.enter(step, phase)[1]:
            began = time.perf_counter()
            self._grant_after(self.ctl.waiting())
            with self._cond:
                if not self._cond.wait_for(lambda: self._outstanding == 0, self.timeout_s):
                    from runtime.transport import PeerTimeout

                    raise PeerTimeout(f"the receive thread did not send batch {self._queued}'s request within "
                                      f"{self.timeout_s:g} s")
            key = (step, phase)
            self._first_in[key] = self._first_in.get(key, 0.0) + time.perf_counter() - began
            pending = False
        self._grant_after(self.ctl.phase(step, phase, not pending))

    def _grant_after(self, alloc: Optional[Allocation]) -> None:
        """Apply ``alloc``, then let a communication task start on the cores it gives (none if it holds)."""
        self.ctl.apply(alloc)
        with self._cond:
            self._grant = None if alloc is not None and alloc.hold else self.ctl.comm_threads()
            self._cond.notify_all()

    def forward(self, step):
        now = time.perf_counter()
        self._finish_batch(step - 1, now)
        self._marks[step] = [now, None, None, 0.0, 0.0, None, 0.0, 0.0, None]
        self._enter(step, 0)
        self._marks[step][5] = torch.get_num_threads()

    def start(self, step, sample_idx, images):
        with self._cond:
            self._outstanding += 1
            self._queued = step
            if self._phase is not None:  # the phase's allocation for pending communication grants it first
                self._grant = None
        self._jobs.put((step, sample_idx, images))
        if self._phase is not None:  # communication has work again: the current phase's plan applies
            self._enter(*self._phase)

    def logits(self, step):
        if step not in self._marks:  # a caller that does not mark forward passes: the phase starts here
            self._finish_batch(step - 1, time.perf_counter())
            self._marks[step] = [time.perf_counter(), None, None, 0.0, 0.0, torch.get_num_threads(), 0.0, 0.0,
                                 None]
        mark = self._marks[step]
        mark[1] = time.perf_counter()
        with self._cond:
            waits = step not in self._done
        if waits:  # computation is idle: communication gets every core
            self._grant_after(self.ctl.waiting())
        with self._cond:
            if step not in self._done:
                if not self._cond.wait_for(lambda: step in self._done, self.timeout_s):
                    from runtime.transport import PeerTimeout  # one line from the CLI, not a traceback

                    raise PeerTimeout(f"the receive thread gave no teacher logits for step {step} within "
                                      f"{self.timeout_s:g} s (the cloud stalled or the link is down)")
            out, err, busy, remote, used = self._done.pop(step)
        if err is not None:
            raise err
        mark[2], mark[3], mark[4] = time.perf_counter(), busy, time.perf_counter() - mark[1]
        mark[7], mark[8] = remote, used
        self._phase = (step, 1)  # applied when the trainer hands over the next batch (start) or goes on
        return out

    def _finish_batch(self, step: int, now: float) -> None:
        mark = self._marks.pop(step, None)
        if mark is None or mark[2] is None:
            return
        start, fwd_end, logits_end, comm_s, wait_s, forward_threads, _, remote_s, used = mark
        # the time computation was held for communication that ran first is not computation: taken out of
        # the phases (it fell in the forward, or in the backward when the next batch was handed over)
        first_f, first_b = self._first_in.pop((step, 0), 0.0), self._first_in.pop((step, 1), 0.0)
        forward_s, backward_s, first_s = fwd_end - start - first_f, now - logits_end - first_b, first_f + first_b
        self.ctl.observe(step, forward_s, backward_s, comm_s, wait_s=wait_s,
                         threads=(forward_threads, torch.get_num_threads()), first_s=first_s, remote_s=remote_s,
                         comm_used=used)

    def close(self):
        self._finish_batch(max(self._marks, default=-1), time.perf_counter())
        busy = False
        try:
            if self._thread is not None:
                with self._cond:  # tasks handed over but not started (an error ended training) never start
                    self._closing = True
                    self._cond.notify_all()
                self._jobs.put(_STOP)
                self._thread.join(self.timeout_s)  # a thread still blocked in a dead peer's receive is left
                busy = self._thread.is_alive()     # behind (a daemon): closing must not hang on it
                self._thread = None
        finally:
            self.ctl.restore()
            if not busy:  # never close the wrapped source under a thread still inside one of its calls
                self.inner.close()


def _default_wait_s() -> float:
    from runtime.transport import long_wait_s

    return long_wait_s()


def controlled(source, policy: str, cores: int, steps: int, cost: Optional[CostModel] = None,
               tolerance: float = 0.2, patience: int = 2, cpus: Sequence[int] = ()):
    """``source`` under a controller with ``policy`` on ``cores`` cores (the wrapper :class:`ControlledSource`);
    ``cpus``: which (see :func:`rank_cpus`; default the first ``cores`` this process may use)."""
    return ControlledSource(source, Controller(policy, cores, steps, cost, tolerance=tolerance, patience=patience,
                                               cpus=list(cpus)))
