"""Clocks the executor reports to: per-node seconds and bytes, or nothing at all.

The executor always calls its clock; when no timing is asked for the clock is
:data:`NO_CLOCK`, whose methods do nothing, so the hot path carries no
``if clock is not None`` tests and no ``perf_counter`` calls.
"""
from __future__ import annotations

from time import perf_counter

import numpy as np

__all__ = ["NodeClock", "NoClock", "NO_CLOCK"]


class NoClock:
    """Records nothing; :meth:`now` costs one call."""

    def now(self) -> float:
        return 0.0

    def spent(self, node: int, since: float) -> None:
        pass

    def waited(self, node: int, since: float) -> None:
        pass

    def sent(self, node: int, nbytes: int) -> None:
        pass

    def step(self, index: int, since: float) -> None:
        """Instruction ``index`` of the pass's program ran from ``since`` until now."""

    def split_done(self) -> None:
        """The split part of the pass is over (the head follows on the root)."""


NO_CLOCK = NoClock()


class NodeClock(NoClock):
    """Seconds of compute and of halo exchange, and bytes sent, per graph node, summed over passes; and
    seconds per instruction of the program run (``steps`` of them; 0: not recorded)."""

    def __init__(self, nodes: int, steps: int = 0) -> None:
        self.compute = np.zeros(nodes)
        self.halo = np.zeros(nodes)
        self.bytes = np.zeros(nodes, dtype=np.int64)
        self.steps = np.zeros(steps)

    def now(self) -> float:
        return perf_counter()

    def spent(self, node: int, since: float) -> None:
        self.compute[node] += perf_counter() - since

    def waited(self, node: int, since: float) -> None:
        self.halo[node] += perf_counter() - since

    def sent(self, node: int, nbytes: int) -> None:
        self.bytes[node] += nbytes

    def step(self, index: int, since: float) -> None:
        if len(self.steps):
            self.steps[index] += perf_counter() - since
