"""A pipeline's transfers lowered, for each rank, to the instructions it runs per image, checked without MPI.

Compile, then run: :func:`lower_stream` decides once, from the deployment
(grid, stage cuts, each stage's rows per cluster, the head), where each
rank's input band comes from, where its output band goes and what the root
collects; :class:`runtime.pipeline.PipelineExecutor` interprets the result and
decides nothing.  The stage's own computation (halos, windows, collectives)
is the stage's split program (:mod:`runtime.program`); here it is one
:class:`RunStage`.  ``aflkd plan --program --stages S`` prints both, and
:func:`check_stream` pairs every band sent with the band received, so a
program set with a transfer missing is found before any image moves.

Every rank runs its instructions once per image, in order; the root also
posts its :class:`Collect` when the image starts (its receives must be there
before the last stage sends) and runs :class:`Head` once the image's rows are in.
Ranks are job ranks; bands between stages travel on the cluster's
communicator, where a rank's number is its stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .geometry import RowRange

__all__ = ["ScatterIn", "RecvBand", "RunStage", "SendBand", "Keep", "Collect", "Head", "StreamInstruction",
           "StreamProgram", "lower_stream", "lower_pipeline", "check_stream"]


def _span(rows: RowRange) -> str:
    return rows.described()  # first to last row, both included


@dataclass(frozen=True)
class ScatterIn:
    """Stage 0: this rank's rows of the image, scattered by the root over the stage's communicator."""
    rows: RowRange

    def text(self) -> str:
        return f"ScatterIn  {_span(self.rows)} of the image"


@dataclass(frozen=True)
class RecvBand:
    """This rank's input rows from the previous stage of its cluster (posted one image ahead)."""
    src: int
    rows: RowRange
    shape: tuple[int, int]  # channels, width

    def text(self) -> str:
        return f"RecvBand   {_span(self.rows)} x {self.shape} <- rank {self.src}"


@dataclass(frozen=True)
class RunStage:
    """The stage's split program on this rank's rows (layers ``first:stop``)."""
    stage: int
    first: int
    stop: int

    def text(self) -> str:
        return f"RunStage   {self.stage} (layers {self.first}:{self.stop})"


@dataclass(frozen=True)
class SendBand:
    """Send this rank's output rows to ``dst``: the next stage of its cluster, or the root (``final``: rows of
    the last map, or with ``rows`` None the model's output under a split head)."""
    dst: int
    rows: Optional[RowRange]
    shape: tuple[int, ...]
    final: bool = False

    def text(self) -> str:
        what = "the output" if self.rows is None else _span(self.rows)
        return f"SendBand   {what} x {self.shape} -> rank {self.dst}{' (final)' if self.final else ''}"


@dataclass(frozen=True)
class Keep:
    """The root's own output: its rows of the last map (``rows``), or the model's output (None)."""
    rows: Optional[RowRange]

    def text(self) -> str:
        return f"Keep       {'the output' if self.rows is None else _span(self.rows)}"


@dataclass(frozen=True)
class Collect:
    """The root, when an image starts: post the receive of each ``(src, rows)`` of the last map (rows None:
    the model's output from the last stage's root)."""
    sources: tuple[tuple[int, Optional[RowRange]], ...]

    def text(self) -> str:
        parts = "; ".join(f"{'the output' if r is None else _span(r)} <- rank {s}" for s, r in self.sources)
        return f"Collect    {parts or 'nothing (all kept)'}"


@dataclass(frozen=True)
class Head:
    """The root: the head on the gathered map (a split head has run in the last stage: nothing left)."""
    split: bool

    def text(self) -> str:
        return f"Head       {'done by the split head' if self.split else 'on the gathered map'}"


StreamInstruction = Union[ScatterIn, RecvBand, RunStage, SendBand, Keep, Collect, Head]


@dataclass(frozen=True)
class StreamProgram:
    rank: int
    cluster: int
    stage: int
    instructions: tuple[StreamInstruction, ...]

    def find(self, kind: type) -> Optional[StreamInstruction]:
        return next((i for i in self.instructions if isinstance(i, kind)), None)

    def text(self) -> str:
        lines = [f"rank {self.rank} (cluster {self.cluster}, stage {self.stage}), per image:"]
        lines += [f"  {i.text()}" for i in self.instructions]
        return "\n".join(lines)


def lower_stream(clusters: int, stages: int, bounds: Sequence[int], in_rows: Sequence[Sequence[RowRange]],
                 out_rows: Sequence[Sequence[RowRange]], shapes: Sequence[tuple[int, int, int]],
                 final_rows: Sequence[RowRange], split_head: bool,
                 out_features: tuple[int, ...] = ()) -> list[StreamProgram]:
    """Every rank's per-image program (pure).

    ``in_rows[s][c]`` / ``out_rows[s][c]``: the rows of stage ``s``'s input / output map on cluster ``c`` (from
    the stage's plan); ``shapes[k]``: (channels, height, width) of the map at cut ``k`` (``shapes[s]`` is
    stage ``s``'s input); ``final_rows[c]``: cluster ``c``'s rows of the last map; ``out_features``: the
    model's output per image under a split head.  Rank ``c * stages + s`` is cluster ``c``, stage ``s``.
    """
    last = stages - 1
    programs = []
    for rank in range(clusters * stages):
        c, s = divmod(rank, stages)
        code: list = []
        if rank == 0:
            if split_head:
                src = last  # the last stage's cluster-0 rank holds the output
                code.append(Collect(() if src == 0 else ((src, None),)))
            else:
                code.append(Collect(tuple((cl * stages + last, r) for cl, r in enumerate(final_rows)
                                          if cl * stages + last != 0 and len(r))))
        if s == 0:
            code.append(ScatterIn(in_rows[0][c]))
        else:
            channels, _, width = shapes[s]
            code.append(RecvBand(rank - 1, in_rows[s][c], (channels, width)))
        code.append(RunStage(s, bounds[s], bounds[s + 1]))
        channels, _, width = shapes[s + 1]
        if s < last:
            code.append(SendBand(rank + 1, out_rows[s][c], (channels, width)))
        elif split_head:
            if c == 0:
                code.append(Keep(None) if rank == 0 else SendBand(0, None, tuple(out_features), final=True))
        elif rank == 0:
            code.append(Keep(final_rows[0]))
        elif len(out_rows[s][c]):  # a cluster without rows sends nothing (the root posts no receive for it)
            code.append(SendBand(0, out_rows[s][c], (channels, width), final=True))
        if rank == 0:
            code.append(Head(split_head))
        programs.append(StreamProgram(rank, c, s, tuple(code)))
    return programs


def lower_pipeline(clusters: int, stages: int, bounds: Sequence[int], shapes: Sequence[tuple[int, int, int]],
                   shares: Sequence[float], split_head: bool, out_features: tuple[int, ...] = ()) -> list[StreamProgram]:
    """:func:`lower_stream` with every map cut by the clusters' ``shares`` (what each stage's plan owns: a
    stage's output rows on a cluster are the next stage's input rows there, the same share of the same map);
    ``shapes[k]``: the map at layer cut ``k`` (every cut of the model, not only the stage cuts)."""
    from .geometry import split_rows

    cuts = [shapes[b] for b in bounds]
    rows = [split_rows(shape[1], shares) for shape in cuts]
    return lower_stream(clusters, stages, bounds, rows[:-1], rows[1:], cuts, rows[-1], split_head, out_features)


def check_stream(programs: Sequence[StreamProgram], final_height: Optional[int] = None) -> list[str]:
    """Problems with a set of per-image programs; [] when every band sent is received with the same rows and
    shape, every receive has its sender, and (given ``final_height``) the root ends with every row of the last
    map exactly once."""
    problems = []
    by_rank = {p.rank: p for p in programs}
    for p in programs:
        for ins in p.instructions:
            if isinstance(ins, SendBand) and not ins.final:
                other = by_rank.get(ins.dst)
                recv = other.find(RecvBand) if other else None
                if recv is None or recv.src != p.rank or recv.rows != ins.rows or recv.shape != ins.shape:
                    problems.append(f"rank {p.rank} sends {_span(ins.rows)} x {ins.shape} to rank {ins.dst}, which "
                                    "never receives them")
            if isinstance(ins, RecvBand):
                other = by_rank.get(ins.src)
                send = other.find(SendBand) if other else None
                if send is None or send.final or send.dst != p.rank or send.rows != ins.rows or send.shape != ins.shape:
                    problems.append(f"rank {p.rank} receives {_span(ins.rows)} x {ins.shape} from rank {ins.src}, "
                                    "which never sends them")
    root = by_rank.get(0)
    collect = root.find(Collect) if root else None
    if collect is None:
        return problems + ["rank 0 collects nothing: no image would finish"]
    finals = {p.rank: i for p in programs for i in p.instructions if isinstance(i, SendBand) and i.final}
    for src, rows in collect.sources:
        send = finals.pop(src, None)
        if send is None or send.rows != rows:
            problems.append(f"rank 0 waits for {'the output' if rows is None else _span(rows)} from rank {src}, "
                            "which never sends it")
    for src, send in finals.items():
        problems.append(f"rank {src} sends {'the output' if send.rows is None else _span(send.rows)} to rank 0, "
                        "which never receives it")
    head = root.find(Head)
    if final_height is not None and not (head is not None and head.split):
        kept = root.find(Keep)
        spans = sorted([r for _, r in collect.sources if r is not None] +
                       ([kept.rows] if kept is not None and kept.rows is not None else []),
                       key=lambda r: r.start)
        spans = [r for r in spans if r.stop > r.start]
        covered = 0
        for r in spans:
            if r.start != covered:
                break
            covered = r.stop
        if covered != final_height or sum(r.stop - r.start for r in spans) != final_height:
            problems.append(f"rank 0 ends with rows {[(r.start, r.stop) for r in spans]} of the last map, not "
                            f"each of 0-{final_height} once")
    return problems
