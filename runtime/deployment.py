"""What every rank must hold the same of before any image moves: digests of the plan it will run.

Each rank plans from its own files and its own torch (a topology, a profile,
``random.expovariate``'s libm, a tracer's version).  The options and files are
agreed before planning (:func:`launch.options.deployment_fingerprint`), but the
plan itself is what decides receive sizes and row ownership: a plan that
differs on one board hangs a receive, truncates it, or leaves rows unwritten.
So every executor agrees on a digest of what it built -- the flat split's
:func:`plan_digest`, the pipeline's :class:`Deployment` -- and a difference is
one line naming the rank, on every rank (:func:`runtime.transport.agree_on`).

The digests cover what running depends on (graph nodes and shapes, each
rank's rows, buffers, halo transfers, windows' reads, the head), not the
floating-point shares they came from: two shares that give the same rows run
the same program.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from .plan import GraphPlan

__all__ = ["plan_digest", "Deployment", "pipeline_deployment", "stage_plans_of"]


def _digest(obj) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def plan_digest(plan: GraphPlan) -> str:
    """A digest of everything in ``plan`` that a rank's program is lowered from (the fx graph excluded: its
    nodes' names, roles, placements and shapes are in ``plan.graph.nodes``)."""
    return _digest((plan.graph.in_shape, plan.graph.nodes, tuple(plan.values.items()),
                    tuple(plan.windows.items()), plan.head, plan.head_split))


@dataclass(frozen=True)
class Deployment:
    """A pipeline as the whole job runs it: the grid, the stage cuts, each stage's row split and plan, the head.

    ``stage_plans[s]``: :func:`plan_digest` of stage ``s``'s split plan (every rank of a stage computed the
    same one, or :meth:`agree_stage_plans` says which did not).  ``layers``: the labels of the layers cut,
    so that a model of another structure on one board differs here even when its shapes agree.
    """

    clusters: int
    stages: int
    bounds: tuple[int, ...]
    rows: tuple  # RowRange per cluster: the rows of the last stage's output each cluster owns
    head: str
    layers: tuple[str, ...]
    stage_plans: tuple[str, ...]

    def digest(self) -> str:
        return _digest(self)

    def text(self) -> str:
        rows = ", ".join(str(r) for r in self.rows)  # first to last row, both included
        return (f"deployment {self.digest()}: {self.clusters} cluster(s) x {self.stages} stage(s), stage cuts "
                f"{list(self.bounds)} of {self.bounds[-1]} layers, output rows per cluster {rows}, head "
                f"{self.head}, stage plans {', '.join(self.stage_plans)}")


def pipeline_deployment(layers, clusters: int, stages: int, bounds: Sequence[int], shares: Sequence[float],
                        head: str, stage_plans: Sequence[str] = ()) -> Deployment:
    """The :class:`Deployment` of a pipeline over ``layers`` (:class:`runtime.stages.Layers`): what
    :class:`runtime.pipeline.PipelineExecutor` agrees on and ``aflkd plan --program --stages`` prints."""
    from .geometry import split_rows

    n = len(layers)
    return Deployment(clusters, stages, tuple(int(b) for b in bounds), split_rows(layers.cut_shape(n)[1], shares),
                      head, tuple(f"{x.label}:{x.out_shape}" for x in layers.layers) + tuple(layers.head),
                      tuple(stage_plans))


def stage_plans_of(reports: Sequence[tuple[int, str]], stages: int) -> tuple[tuple[str, ...], list[str]]:
    """From every rank's (stage, plan digest), in rank order: each stage's digest (its lowest rank's) and the
    problems, one per rank whose digest differs from its stage's (pure: the caller agrees on the result)."""
    first: dict[int, tuple[int, str]] = {}
    problems = []
    for rank, (stage, digest) in enumerate(reports):
        if stage not in first:
            first[stage] = (rank, digest)
        elif first[stage][1] != digest:
            problems.append(f"rank {rank} planned stage {stage} otherwise than rank {first[stage][0]} "
                            f"({digest} != {first[stage][1]}): give every board the same files and versions")
    missing = [s for s in range(stages) if s not in first]
    if missing:
        problems.append(f"no rank runs stage(s) {missing}")
    return tuple(first[s][1] for s in range(stages) if s in first), problems
