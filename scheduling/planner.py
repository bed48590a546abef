"""Exact core-allocation planner for N cycles of Comm, Forward, Backward (the edge-KD paper, Sec. III-IV).

Decision model ("rounds", the paper's Eq. 5 and Eq. 13 made precise)
---------------------------------------------------------------------
Tasks: Comm_1..Comm_N (data ``y`` each) form one chain; Forward_1, Backward_1,
..., Forward_N, Backward_N (work ``x_f``, ``x_b``) form the other.  Backward_i
also needs Comm_i (the teacher's logits); Comm runs ahead freely.  The state is
the paper's S(i, j, k): i Comm, j Forward, k Backward done (j in {k, k+1}).
The next Comm is *ready* if i < N; the next Comp task is Forward_{k+1} if j = k
(ready if j < N) or Backward_j if j = k+1 (ready if i >= j).

At each state one *round* runs, chosen by one decision:

* only Comm ready (Eq. 13, i < j): Comm_{i+1} alone on all ``c_total`` cores, time g(y, c_total);
* only Comp ready (Eq. 13, i = N): the Comp task alone, time f(x, 0);
* both ready (Eq. 13, Alloc): either ``("pair", c)`` with 1 <= c <= c_total-1:
  Comm_{i+1} gets c cores and the Comp task c_total-c; at the first finish (an
  event) the survivor gets all c_total cores (the paper's reallocation to
  c-hat, Eq. 5) and the round ends when it finishes; or ``("comm",)`` /
  ``("comp",)``: that task alone on all cores, the other waits.

A round always ends with its tasks done, so the next state is discrete and the
planner is an exact dynamic program over S(i, j, k) (Eq. 14-15):
``T(S) = min over decisions of round_time + T(next)``, memoised, O(N^2 c_total).
It is exact for this model; a model that starts the next task of the faster chain
mid-round carries a continuous remainder in the state and its DP blows up
(measured: 7e5 states at N = 5, c_total = 6), so it is not the model here.

g's argument (the trap in Algorithm 2, ``t_Comm <- g(y, c_Comp)``): Eq. 4 defines
g's c as the cores given to communication, and a literal c_Comp would evaluate
g(y, 0) = y / log(0) whenever Comm runs alone (Eq. 13, i < j).  Here Comm's time
is always g(y, c_Comm) and Comp's f(x, c_Comm) (as Algorithm 2 already does for f).

Baselines (Sec. V-A): *priority* never shares, each task runs alone on all cores
(Comm-first and Comp-first give the same total, as the paper notes); *random*
pairs every time both are ready with c uniform in 1..c_total-1.
"""
from __future__ import annotations

import math
import random as _random
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

from runtime.errors import UsageError

from .costmodel import CostModel

__all__ = ["Workload", "Step", "Plan", "plan", "plan_reference", "round_time", "run_policy", "priority", "random_allocation",
           "RandomStats", "exhaustive_search", "decisions"]


@dataclass(frozen=True)
class Workload:
    """N cycles, per-cycle Comm data ``comm`` (y), Forward and Backward work, and ``cores`` (c_total)."""
    cycles: int
    comm: float
    forward: float
    backward: float
    cores: int

    def check(self, cost: CostModel) -> None:
        if self.cycles < 1:
            raise UsageError(f"cycles must be >= 1, got {self.cycles}")
        if self.cores < 1:
            raise UsageError(f"cores must be >= 1, got {self.cores}")
        for name in ("comm", "forward", "backward"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"{name} workload must be a positive number, got {value}")
        cost.check(self.cores)


@dataclass(frozen=True)
class Step:
    """One round: the state before it, the decision, the cores Comm got, and its duration."""
    state: tuple[int, int, int]
    decision: tuple
    comm_cores: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    total: float
    steps: tuple[Step, ...]


def _ready(state, n):
    i, j, k = state
    comm = i < n
    comp = (j == k and j < n) or (j == k + 1 and i >= j)
    return comm, comp


def _comp_work(state, work: Workload) -> float:
    i, j, k = state
    return work.forward if j == k else work.backward


def _advance_comp(state):
    i, j, k = state
    return (i, j + 1, k) if j == k else (i, j, k + 1)


def decisions(state, work: Workload) -> list[tuple]:
    """The decisions open at ``state`` (see the module docstring)."""
    comm, comp = _ready(state, work.cycles)
    if comm and comp:
        return [("comm",), ("comp",)] + [("pair", c) for c in range(1, work.cores)]
    if comm:
        return [("comm",)]
    if comp:
        return [("comp",)]
    return []


def round_time(cost: CostModel, work: Workload, state, decision) -> tuple[float, tuple[int, int, int], int]:
    """Duration of one round, the state after it, and the cores Comm had at its start."""
    cores = work.cores
    x = _comp_work(state, work)
    i, j, k = state
    if decision[0] == "comm":
        return cost.comm_time(work.comm, cores), (i + 1, j, k), cores
    if decision[0] == "comp":
        return cost.comp_time(x, 0), _advance_comp(state), 0
    c = decision[1]
    t_comm, t_comp = cost.comm_time(work.comm, c), cost.comp_time(x, c)
    nxt = _advance_comp((i + 1, j, k))
    if t_comm <= t_comp:   # Comm first; Comp's remaining fraction runs on every core
        return t_comm + cost.comp_time(x * (1.0 - t_comm / t_comp), 0), nxt, c
    return t_comp + cost.comm_time(work.comm * (1.0 - t_comp / t_comm), cores), nxt, c


def _best_pair(cost: CostModel, work: Workload, x: float) -> tuple[float, int]:
    """The shortest ``("pair", c)`` round for Comp work ``x``, and its c.

    A pair round ends with both tasks done and leads to the same state whatever c is, so the best c
    depends only on x (Forward or Backward work), never on the state: found once, not per state."""
    best = (math.inf, 0)
    for c in range(1, work.cores):
        t, _, _ = round_time(cost, work, (0, 0, 0) if x == work.forward else (1, 1, 0), ("pair", c))
        if t < best[0]:
            best = (t, c)
    return best


def plan(cost: CostModel, work: Workload) -> Plan:
    """The optimal round sequence (exact DP over S(i, j, k), Eq. 14-15), in O(N^2) array operations.

    States are (i, p) with p = j + k the Comp tasks done (p even: Forward_{p/2+1} next; odd: Backward_j,
    ready once i >= j).  Along i within one p the only move is "Comm alone" (i -> i+1, cost g_all),
    so T_p[i] = min(g_all + T_p[i+1], o[i]) with o the best other move (Comp alone or a pair, into
    layer p+1); unrolled, T_p[i] = min over m >= i of (o[m] + g_all (m - i)): a suffix minimum, one
    numpy pass per layer.  N = 2000 at 16 cores plans in well under a second (the state-by-state
    memoised DP, :func:`plan_reference`, took minutes); totals are the same (tests).
    """
    import numpy as np

    work.check(cost)
    n, cores = work.cycles, work.cores
    g_all = cost.comm_time(work.comm, cores)
    alone = {work.forward: cost.comp_time(work.forward, 0), work.backward: cost.comp_time(work.backward, 0)}
    pair = {x: _best_pair(cost, work, x) if cores > 1 else (math.inf, 0) for x in (work.forward, work.backward)}
    i = np.arange(n + 1)
    # choice per state: 0 Comm alone, 1 Comp alone, 2 pair (kept small: int8, (2N+1) x (N+1))
    choice = np.zeros((2 * n + 1, n + 1), dtype=np.int8)
    nxt = g_all * (n - i).astype(float)  # p = 2N: only Comm left
    layers = [None] * (2 * n + 1)
    layers[2 * n] = nxt
    for p in range(2 * n - 1, -1, -1):
        x = work.forward if p % 2 == 0 else work.backward
        ready = np.ones(n + 1, dtype=bool) if p % 2 == 0 else i >= (p + 1) // 2
        comp_alone = np.where(ready, alone[x] + nxt, np.inf)
        shifted = np.append(nxt[1:], np.inf)  # T_{p+1}[i+1]; none at i = N (no Comm left to pair)
        with_pair = np.where(ready, pair[x][0] + shifted, np.inf)
        other = np.minimum(comp_alone, with_pair)
        v = other + g_all * i
        suffix = np.minimum.accumulate(v[::-1])[::-1]
        here = suffix - g_all * i
        # Comm alone where it beats (or ties, as the memoised DP tries it first) every other move
        via_comm = np.append(g_all + here[1:] <= other[:-1], False)
        choice[p] = np.where(via_comm, 0, np.where(with_pair < comp_alone, 2, 1))
        layers[p] = nxt = here
    steps, state = [], (0, 0, 0)
    while state != (n, n, n):
        ci, cj, ck = state
        p = cj + ck
        code = 0 if p == 2 * n else int(choice[p, ci])
        x = _comp_work(state, work)
        decision = ("comm",) if code == 0 else ("comp",) if code == 1 else ("pair", pair[x][1])
        t, after, c = round_time(cost, work, state, decision)
        steps.append(Step(state, decision, c, t))
        state = after
    return Plan(float(layers[0][0]), tuple(steps))


def plan_reference(cost: CostModel, work: Workload) -> Plan:
    """The same DP memoised state by state, as Eq. 14-15 read (O(N^2 c) Python calls): :func:`plan`'s check."""
    work.check(cost)
    n = work.cycles

    @lru_cache(maxsize=None)
    def best(state) -> tuple[float, Optional[tuple]]:
        if state == (n, n, n):
            return 0.0, None
        out = (math.inf, None)
        for d in decisions(state, work):
            t, nxt, _ = round_time(cost, work, state, d)
            total = t + best(nxt)[0]
            if total < out[0]:
                out = (total, d)
        return out

    # fill the table from the end so the recursion stays shallow
    for i in range(n, -1, -1):
        for k in range(n, -1, -1):
            for j in (k + 1, k):
                if j <= n:
                    best((i, j, k))
    state, steps = (0, 0, 0), []
    while state != (n, n, n):
        d = best(state)[1]
        t, nxt, c = round_time(cost, work, state, d)
        steps.append(Step(state, d, c, t))
        state = nxt
    return Plan(best((0, 0, 0))[0], tuple(steps))


def run_policy(cost: CostModel, work: Workload, choose: Callable[[tuple, list], tuple]) -> float:
    """Total time of the rounds picked by ``choose(state, open_decisions)``."""
    state, total, n = (0, 0, 0), 0.0, work.cycles
    while state != (n, n, n):
        t, state, _ = round_time(cost, work, state, choose(state, decisions(state, work)))
        total += t
    return total


def priority(cost: CostModel, work: Workload, first: str = "comm") -> float:
    """Priority allocation: all cores to one task at a time, ``first`` ("comm" or "comp") when both are ready."""
    work.check(cost)
    if first not in ("comm", "comp"):
        raise UsageError(f"priority first must be 'comm' or 'comp', got {first!r}")
    return run_policy(cost, work, lambda s, ds: (first,) if (first,) in ds else ds[0])


@dataclass(frozen=True)
class RandomStats:
    mean: float
    best: float
    worst: float
    draws: int


def random_allocation(cost: CostModel, work: Workload, draws: int = 1000, seed: int = 0) -> RandomStats:
    """Random allocation: when both are ready they share, Comm getting c uniform in 1..c_total-1."""
    work.check(cost)
    if draws < 1:
        raise UsageError(f"random draws must be >= 1, got {draws}")
    rng = _random.Random(seed)

    def choose(state, ds):
        pairs = [d for d in ds if d[0] == "pair"]
        return rng.choice(pairs) if pairs else ds[0]

    totals = [run_policy(cost, work, choose) for _ in range(draws)]
    lo, hi = min(totals), max(totals)
    return RandomStats(min(max(math.fsum(totals) / draws, lo), hi), lo, hi, draws)   # clamp: rounding


def _event_round(cost: CostModel, cores: int, rem_comm: float, rem_comp: float, c: int) -> float:
    """One round simulated as events with the tasks' rates (work per second), not f and g's closed forms.

    ``rem_comm``/``rem_comp``: the round's work (0 = absent); ``c``: Comm's cores while both run.
    """
    comp_rate = lambda cc: 1.0 / cost.comp_time(1.0, cc)       # work per second with cc comm cores
    comm_rate = lambda cc: 1.0 / cost.comm_time(1.0, cc)
    t = 0.0
    while rem_comm > 0 or rem_comp > 0:
        if rem_comm > 0 and rem_comp > 0:
            rm, rp = comm_rate(c), comp_rate(c)
        else:
            rm, rp = comm_rate(cores), comp_rate(0)
        dt = min(rem_comm / rm if rem_comm > 0 else math.inf, rem_comp / rp if rem_comp > 0 else math.inf)
        t += dt
        rem_comm = 0.0 if rem_comm <= rm * dt * (1 + 1e-12) else rem_comm - rm * dt
        rem_comp = 0.0 if rem_comp <= rp * dt * (1 + 1e-12) else rem_comp - rp * dt
    return t


def exhaustive_search(cost: CostModel, work: Workload, limit: int = 50_000_000) -> tuple[float, int]:
    """Brute force: the minimum over EVERY decision sequence of the round model, and how many there were.

    Independent of :func:`plan` and :func:`round_time`: rounds are simulated as
    events with the tasks' rates (:func:`_event_round`), and nothing is minimised
    before the end.  Every partial sequence is carried forward as its own elapsed
    time in numpy arrays per state, states are visited in order of i + j + k
    (each round raises it), and the arrays reaching (N, N, N) hold the total of every
    complete sequence (14,491,441 of them at N = 6, c_total = 6): the answer is their
    minimum and their count.  ``limit`` caps the partial sequences held at once (memory).
    """
    import numpy as np

    work.check(cost)
    n, cores = work.cycles, work.cores
    lone_comm = _event_round(cost, cores, work.comm, 0.0, cores)
    lone = {True: _event_round(cost, cores, 0.0, work.forward, 0),       # on Forward?
            False: _event_round(cost, cores, 0.0, work.backward, 0)}
    pair = {fw: [_event_round(cost, cores, work.comm, x, c) for c in range(1, cores)]
            for fw, x in ((True, work.forward), (False, work.backward))}
    frontier: dict[tuple[int, int, int], list] = {(0, 0, 0): [np.zeros(1)]}
    carried, best, count = 1, math.inf, 0
    for level in range(3 * n):       # i + j + k of the states expanded now
        for state in sorted(s for s in frontier if sum(s) == level):
            chunks = frontier.pop(state)
            here = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
            del chunks
            i, j, k = state
            on_forward = j == k
            comm_ok = i < n
            comp_ok = j < n if on_forward else i >= j
            nj, nk = (j + 1, k) if on_forward else (j, k + 1)
            nexts = []
            if comm_ok:
                nexts.append(((i + 1, j, k), [lone_comm]))
            if comp_ok:
                nexts.append(((i, nj, nk), [lone[on_forward]]))
            if comm_ok and comp_ok:
                nexts.append(((i + 1, nj, nk), pair[on_forward]))
            for nxt, times in nexts:
                for t in times:
                    totals = here + t
                    if nxt == (n, n, n):    # complete sequences: only their minimum and count are kept
                        best, count = min(best, float(totals.min())), count + totals.size
                    else:
                        frontier.setdefault(nxt, []).append(totals)
                        carried += totals.size
            carried -= here.size
            if carried > limit:
                raise UsageError(f"exhaustive search over more than {limit} sequences; use fewer cycles or cores")
    return best, int(count)


def _exhaustive_search_recursive(cost: CostModel, work: Workload, limit: int = 5_000_000) -> tuple[float, int]:
    """The same brute force one sequence at a time by depth-first search (slow: about 55k sequences/s).

    Kept as a reference for :func:`exhaustive_search` on small cases.
    """
    work.check(cost)
    n, cores = work.cycles, work.cores
    best, count = [math.inf], [0]

    def walk(i: int, j: int, k: int, elapsed: float) -> None:
        if count[0] > limit:
            raise UsageError(f"exhaustive search over more than {limit} sequences; use fewer cycles or cores")
        if i == n and j == n and k == n:
            count[0] += 1
            best[0] = min(best[0], elapsed)
            return
        comm_ok = i < n
        on_forward = j == k
        comp_ok = j < n if on_forward else i >= j
        x = work.forward if on_forward else work.backward
        nj, nk = (j + 1, k) if on_forward else (j, k + 1)
        if comm_ok:
            walk(i + 1, j, k, elapsed + _event_round(cost, cores, work.comm, 0.0, cores))
        if comp_ok:
            walk(i, nj, nk, elapsed + _event_round(cost, cores, 0.0, x, 0))
        if comm_ok and comp_ok:
            for c in range(1, cores):
                walk(i + 1, nj, nk, elapsed + _event_round(cost, cores, work.comm, x, c))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20 * n + 100))
    try:
        walk(0, 0, 0, 0.0)
    finally:
        sys.setrecursionlimit(old)
    return best[0], count[0]
