"""Programs: a split plan lowered, for each rank, to the instructions that rank runs, in order.

Compile, then run.  :func:`lower` makes every decision the executor used to make
on its own while it built its steps -- which element-wise chains write straight
into a buffer, which pools run in parts so that the rows other ranks wait for go
first, where BatchNorm is folded, when a halo exchange is posted and where it is
awaited, which collectives finish a global pool or a split head, what is
gathered -- once, as frozen dataclasses that print (``aflkd plan --program``)
and can be checked without MPI (:func:`check_programs`).  The executor
(:class:`runtime.split.SplitExecutor`) interprets a program; it decides nothing.

A program has two parts: ``split`` (every rank, its own rows) and ``head`` (what
runs after: gathers and the head on the root, the collective of a split head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .geometry import RowRange, merge_ranges, subtract_ranges
from .layers import ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, is_elementwise_function
from .plan import GraphPlan, Transfer

__all__ = ["Input", "Window", "Fused", "Compute", "PostHalo", "AwaitHalo", "Partial", "AllReduce", "Reduce",
           "SplitLinear", "Gather", "Output", "Drain", "Instruction", "Program", "lower", "lower_all",
           "check_programs", "is_elementwise"]


def _rows(spans: Sequence[RowRange]) -> str:
    """"row 9", "rows 10-20" or "rows 2-3,6-7" (first to last row, both included), "no rows"."""
    if len(spans) == 1:
        return spans[0].described()
    return f"rows {','.join(str(r) for r in spans)}" if spans else "no rows"


@dataclass(frozen=True)
class Input:
    """This rank's rows of the input: stored in the input's buffer when it has one."""

    value: str

    def text(self) -> str:
        return f"Input      {self.value}"


@dataclass(frozen=True)
class Window:
    """A conv or pool over the input rows its output rows need (the plan's read for this rank).

    ``parts`` None: all own output rows in one call (stored in the node's buffer if it has one);
    else only these output rows, each written into the node's buffer (a pool whose rows others need first).
    ``empty``: this rank owns no output row (an empty map of the right shape).
    """

    node: str
    source: str
    kind: str
    parts: Optional[tuple[RowRange, ...]] = None
    empty: bool = False

    def text(self) -> str:
        how = "no rows" if self.empty else ("own rows" if self.parts is None else _rows(self.parts))
        return f"Window     {self.node} <- {self.source} ({self.kind}, {how})"


@dataclass(frozen=True)
class Fused:
    """A chain of element-wise nodes written straight into the buffer of its last node, rows ``parts`` only."""

    chain: tuple[str, ...]
    parts: tuple[RowRange, ...]

    @property
    def node(self) -> str:
        return self.chain[-1]

    def text(self) -> str:
        return f"Fused      {' -> '.join(self.chain)} ({_rows(self.parts)})"


@dataclass(frozen=True)
class Compute:
    """One node on this rank's rows (``where`` "rows"), on every rank whole ("all") or on the root ("root").

    ``how``: "call" (the node's own op), "reshape" (the traced shape with this rank's rows), "batchnorm"
    (eval BatchNorm folded into a per-channel scale and shift) or "identity" (a no-op in eval, e.g. an
    adaptive pool to the size the map already has).
    """

    node: str
    how: str
    where: str

    def text(self) -> str:
        return f"Compute    {self.node} ({self.how}, {self.where})"


@dataclass(frozen=True)
class PostHalo:
    """Post the halo exchange of ``value``: Isend own rows to other ranks, Irecv theirs into the buffer."""

    value: str
    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]

    def text(self) -> str:
        sends = "; ".join(f"{t.rows.described()} -> {t.dst}" for t in self.sends) or "nothing"
        recvs = "; ".join(f"{t.rows.described()} <- {t.src}" for t in self.recvs) or "nothing"
        return f"PostHalo   {self.value}: send {sends}; receive {recvs}"


@dataclass(frozen=True)
class AwaitHalo:
    """Wait for the halo rows of ``value`` (before the first window on this rank that reads them)."""

    value: str

    def text(self) -> str:
        return f"AwaitHalo  {self.value}"


@dataclass(frozen=True)
class Partial:
    """A global pool's share of this rank: the sum (mean) or max over its own rows."""

    node: str
    reduce: str

    def text(self) -> str:
        return f"Partial    {self.node} ({self.reduce} over own rows)"


@dataclass(frozen=True)
class AllReduce:
    """Finish a global pool on every rank (squeeze-excitation mid-net)."""

    node: str
    op: str

    def text(self) -> str:
        return f"AllReduce  {self.node} ({self.op})"


@dataclass(frozen=True)
class Reduce:
    """Finish a global pool on the root (the head's pool)."""

    node: str
    op: str
    root: int

    def text(self) -> str:
        return f"Reduce     {self.node} ({self.op}, onto rank {self.root})"


@dataclass(frozen=True)
class SplitLinear:
    """Own rows of ``value`` times own columns of Linear ``node``, summed onto the root (which adds the bias)."""

    node: str
    value: str
    root: int

    def text(self) -> str:
        return f"SplitLinear {self.node} <- {self.value} (Reduce sum onto rank {self.root})"


@dataclass(frozen=True)
class Gather:
    """Every rank's own rows of ``value`` onto the root, as the whole map (for the head)."""

    value: str
    root: int

    def text(self) -> str:
        return f"Gather     {self.value} (onto rank {self.root})"


@dataclass(frozen=True)
class Output:
    """The root reads the model's output."""

    def text(self) -> str:
        return "Output"


@dataclass(frozen=True)
class Drain:
    """Wait for every exchange this pass posted (sends included) before the next pass reuses the buffers."""

    def text(self) -> str:
        return "Drain"


Instruction = Union[Input, Window, Fused, Compute, PostHalo, AwaitHalo, Partial, AllReduce, Reduce, SplitLinear,
                    Gather, Output, Drain]
COLLECTIVES = (AllReduce, Reduce, SplitLinear, Gather)


@dataclass(frozen=True)
class Program:
    """What one rank runs: ``split`` (own rows) then ``head``."""

    rank: int
    ranks: int
    split: tuple[Instruction, ...]
    head: tuple[Instruction, ...]

    @property
    def instructions(self) -> tuple[Instruction, ...]:
        return self.split + self.head

    def text(self) -> str:
        lines = [f"rank {self.rank} of {self.ranks}: {len(self.split)} split + {len(self.head)} head instructions"]
        lines += [f"  {i:3d}  {ins.text()}" for i, ins in enumerate(self.split)]
        lines += ["  head:"] + [f"  {i:3d}  {ins.text()}" for i, ins in enumerate(self.head, len(self.split))]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- lowering
def is_elementwise(fx_node, module) -> bool:
    """Whether a node maps each element on its own (so a chain of them can write into one buffer)."""
    if fx_node.op == "call_module":
        return isinstance(module, ELEMENTWISE_MODULES)
    if fx_node.op == "call_function":
        return is_elementwise_function(fx_node.target)
    return fx_node.op == "call_method" and fx_node.target in ELEMENTWISE_METHODS and fx_node.target != "contiguous"


def _module_lookup(model) -> Callable[[object], object]:
    """fx node -> the module it calls (None for everything else: only modules decide fusion and folding)."""
    def find(f):
        return model.get_submodule(f.target) if model is not None and f.op == "call_module" else None
    return find


class _Lowering:
    """The state of lowering one rank's program (see :func:`lower`)."""

    def __init__(self, plan: GraphPlan, rank: int, root: int, head: bool, module_of) -> None:
        self.plan, self.graph, self.rank, self.root = plan, plan.graph, rank, root
        self.is_root = rank == root and head
        self.split_head = plan.head_split if head else None
        self.fx = list(self.graph.fx.nodes)
        self.index = {n.name: i for i, n in enumerate(self.graph.nodes)}
        self.module_of = module_of
        self.batchnorm = nn.BatchNorm2d
        self.buffered = {name for name, v in plan.values.items() if v.buffers[rank] is not None}
        self.awaited: set[str] = set()
        self.split: list[Instruction] = []
        self.head: list[Instruction] = []

    # -- decisions
    def main_input(self, name: str) -> Optional[str]:
        """The first split input of the same shape as the node's output (the one it is computed from)."""
        g = self.graph[name]
        for a in self.fx[self.index[name]].all_input_nodes:
            other = self.graph[a.name]
            if other.placement == "rows" and other.shape == g.shape and other.hdim == g.hdim:
                return a.name
        return None

    def segment_member(self, name: str) -> bool:
        g = self.graph[name]
        f = self.fx[self.index[name]]
        return (g.role == "rowwise" and g.placement == "rows" and g.shape is not None and len(g.shape) == 4
                and g.hdim == 2 and is_elementwise(f, self.module_of(f)) and self.main_input(name) is not None)

    def segments(self) -> dict[str, tuple[str, ...]]:
        """Chains of element-wise nodes that end in a buffered value: they write into its buffer."""
        found = {}
        for name in sorted(self.buffered, key=self.index.get):
            g = self.graph[name]
            if g.role != "rowwise" or not self.segment_member(name):
                continue
            chain = [name]
            while True:
                main = self.main_input(chain[0])
                if (main is None or main in self.buffered or self.graph[main].gather
                        or len(self.graph.consumers(main)) != 1 or not self.segment_member(main)):
                    break
                chain.insert(0, main)
            found[name] = tuple(chain)
        return found

    def how(self, f, g) -> str:
        if g.placement == "rows" and f.target in ("view", "reshape", torch.reshape):
            return "reshape"
        if isinstance(self.module_of(f), self.batchnorm) and g.placement == "rows":
            return "batchnorm"
        if g.identity:
            return "identity"
        return "call"

    # -- emission
    def post(self, name: str) -> None:
        """The halo exchange of ``name``, right after its rows are written (when this rank takes part)."""
        value = self.plan.values.get(name)
        if value is None or value.exchange is None:
            return
        sends, recvs = tuple(value.exchange.sends(self.rank)), tuple(value.exchange.recvs(self.rank))
        if sends or recvs:
            self.split.append(PostHalo(name, sends, recvs))

    def await_halo(self, source: str) -> None:
        value = self.plan.values[source]
        if value.exchange is not None and value.exchange.needs(self.rank) and source not in self.awaited:
            self.awaited.add(source)
            self.split.append(AwaitHalo(source))

    def window(self, f, g) -> None:
        r, name = self.rank, g.name
        wplan = self.plan.windows[name]
        read, source = wplan.reads[r], wplan.source
        kind = g.window.kind
        if read is None:  # this rank owns no output row
            self.split.append(Window(name, source, kind, empty=True))
            self.post(name)
            return
        self.await_halo(source)
        out = self.plan.values.get(name)
        if (kind != "conv" and read.from_buffer and not read.repad and name in self.buffered
                and out.exchange is not None and out.exchange.sends(r)):
            # a pool others need rows of: those rows first, their sends posted, then the rest
            own = out.owned[r]
            sent = tuple(merge_ranges([t.rows for t in out.exchange.sends(r)]))
            rest = tuple(subtract_ranges([own], sent)) if len(own) else ()
            if sent:
                self.split.append(Window(name, source, kind, parts=sent))
            self.post(name)
            if rest or not sent:  # (at least one part instruction: it also names the own rows)
                self.split.append(Window(name, source, kind, parts=rest))
            return
        self.split.append(Window(name, source, kind))
        self.post(name)

    def fused(self, chain: tuple[str, ...]) -> None:
        """The chain over all own rows in one part, then its halo posted.  (Writing the rows others need first
        and posting before the rest cost a second call per member and layer, which measured more than the
        earlier post saved: 10 alternated pairs on edge net 3, README "Boundary-first parts".)"""
        own = self.plan.values[chain[-1]].owned[self.rank]
        self.split.append(Fused(chain, (own,) if len(own) else ()))
        self.post(chain[-1])

    def run(self) -> Program:
        segments = self.segments()
        absorbed = {m for chain in segments.values() for m in chain[:-1]}
        hs = self.split_head
        for f, g in zip(self.fx, self.graph.nodes):
            name = g.name
            if name in absorbed:
                continue
            if g.role == "output":
                self.head.append(Output())
                continue
            if hs is not None and name in hs.skip:
                continue  # the flatten (and eval dropouts) before the split Linear: folded into its columns
            if hs is not None and name == hs.linear:
                self.head.append(SplitLinear(name, hs.value, self.root))
                continue
            if g.role == "reduce":
                op = "sum" if g.reduce == "mean" else "max"
                self.split.append(Partial(name, g.reduce))
                if g.placement == "all":
                    self.split.append(AllReduce(name, op))
                else:
                    self.head.append(Reduce(name, op, self.root))
                continue
            if g.placement == "root":
                if self.is_root:
                    self.head.append(Compute(name, self.how(f, g), "root"))
                continue
            if g.role == "input":
                self.split.append(Input(name))
                self.post(name)
            elif g.role == "window":
                self.window(f, g)
            elif name in segments:
                self.fused(segments[name])
            else:
                self.split.append(Compute(name, self.how(f, g), g.placement))
                if g.placement == "rows":
                    self.post(name)
            if g.placement == "rows" and g.gather and not (hs is not None and name == hs.value):
                self.head.append(Gather(name, self.root))
        self.split.append(Drain())
        return Program(self.rank, self.plan.ranks, tuple(self.split), tuple(self.head))


def lower(plan: GraphPlan, rank: int, model=None, root: int = 0, head: bool = True,
          module_of: Optional[Callable] = None) -> Program:
    """Rank ``rank``'s program for ``plan``.  ``model`` (its modules may be on the meta device: only their types
    are read) or ``module_of`` (fx node -> module) tells which nodes are element-wise modules and BatchNorms.
    ``head`` False: the split part only (a benchmark's bound)."""
    return _Lowering(plan, rank, root, head, module_of or _module_lookup(model)).run()


def lower_all(plan: GraphPlan, model=None, root: int = 0, head: bool = True) -> list[Program]:
    """Every rank's program."""
    find = _module_lookup(model)
    return [lower(plan, r, root=root, head=head, module_of=find) for r in range(plan.ranks)]


# ---------------------------------------------------------------------------------------------- checking
def check_programs(programs: Sequence[Program]) -> list[str]:
    """Problems with a set of programs (one per rank), found without MPI; [] when they pair and finish.

    * pairing: every rows a rank sends of a value, the destination receives from it (same rows), and the
      other way round; a rank that receives halo rows awaits them;
    * collectives: every rank meets the same collectives in the same order;
    * progress: run all programs together, a rank blocking at AwaitHalo until every sender has posted and at
      a collective until every rank is at it; a set that stops short names where each rank waits.
    """
    problems: list[str] = []
    posts: dict[tuple[int, str], PostHalo] = {}
    for p in programs:
        for ins in p.instructions:
            if isinstance(ins, PostHalo):
                posts[(p.rank, ins.value)] = ins
    for (rank, value), ins in sorted(posts.items()):
        for t in ins.sends:
            other = posts.get((t.dst, value))
            if other is None or Transfer(rank, t.dst, t.rows) not in other.recvs:
                problems.append(f"rank {rank} sends {t.rows.described()} of {value} to rank {t.dst}, "
                                f"which never receives them")
        for t in ins.recvs:
            other = posts.get((t.src, value))
            if other is None or Transfer(t.src, rank, t.rows) not in other.sends:
                problems.append(f"rank {rank} receives {t.rows.described()} of {value} from rank "
                                f"{t.src}, which never sends them")
        awaited = any(isinstance(i, AwaitHalo) and i.value == value for i in programs[rank].instructions)
        if ins.recvs and not awaited:
            problems.append(f"rank {rank} receives halo rows of {value} but never awaits them")
    sequences = [[ins for ins in p.instructions if isinstance(ins, COLLECTIVES)] for p in programs]
    for p, seq in zip(programs[1:], sequences[1:]):
        if seq != sequences[0]:
            k = next((i for i, (a, b) in enumerate(zip(sequences[0], seq)) if a != b), min(len(seq), len(sequences[0])))
            a = sequences[0][k].text() if k < len(sequences[0]) else "nothing"
            b = seq[k].text() if k < len(seq) else "nothing"
            problems.append(f"collective {k + 1}: rank 0 runs '{a}' but rank {p.rank} runs '{b}'")
    if problems:
        return problems
    return _simulate(programs)


def _simulate(programs: Sequence[Program]) -> list[str]:
    """Run every program in lock-step (see :func:`check_programs`); [] if all finish."""
    n = len(programs)
    code = [p.instructions for p in programs]
    pc = [0] * n
    posted: set[tuple[int, str]] = set()
    while True:
        moved = False
        for r in range(n):
            while pc[r] < len(code[r]):
                ins = code[r][pc[r]]
                if isinstance(ins, AwaitHalo):
                    post = next((i for i in code[r] if isinstance(i, PostHalo) and i.value == ins.value), None)
                    senders = [] if post is None else [t.src for t in post.recvs]
                    if post is None or (r, ins.value) not in posted or \
                            not all((s, ins.value) in posted for s in senders):
                        break
                elif isinstance(ins, COLLECTIVES):
                    break  # advanced below, together
                elif isinstance(ins, PostHalo):
                    posted.add((r, ins.value))
                pc[r] += 1
                moved = True
        at = [code[r][pc[r]] if pc[r] < len(code[r]) else None for r in range(n)]
        if all(a is None for a in at):
            return []
        if all(isinstance(a, COLLECTIVES) for a in at) and len(set(at)) == 1:
            pc = [c + 1 for c in pc]
            continue
        if not moved:
            waits = "; ".join(f"rank {r} at {'the end' if a is None else a.text()}" for r, a in enumerate(at))
            return [f"the programs stop: {waits}"]
