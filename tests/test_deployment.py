"""The plan every rank agrees on before any image moves (runtime/deployment.py), without MPI.

A rank that planned otherwise (other shares, another model) or could not set up (no weights) must make
every rank refuse with the same line naming it -- never a hang, a truncated receive or wrong rows.
"""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import build_model
from runtime.deployment import plan_digest, stage_plans_of
from runtime.graph import trace_model
from runtime.inprocess import run_ranks
from runtime.plan import plan_split
from runtime.skeleton import empty_weights
from runtime.split import SplitExecutor
from runtime.transport import AgreedError

SHAPE = (3, 32, 32)


def _plan(weights, net="edge3", head="gather"):
    model = build_model(net, 3, 32, 10).eval()
    return model, plan_split(trace_model(model, SHAPE), weights, head=head)


def _each_rank_refuses(size, build):
    """Run ``build(comm)`` on every rank; return each rank's refusal line (every rank must refuse)."""
    def rank(comm):
        try:
            build(comm)
        except AgreedError as err:
            return str(err)
        return None

    started = time.monotonic()
    lines = run_ranks(size, rank, timeout_s=10.0)
    assert time.monotonic() - started < 5.0
    return lines


def test_a_rank_with_other_shares_is_named_on_every_rank_before_any_image():
    model, plan = _plan([1.0, 1.0, 1.0])
    _, other = _plan([1.0, 2.0, 1.0])  # rank 1 read another topology: other rows, other receive sizes
    lines = _each_rank_refuses(3, lambda comm: SplitExecutor(other if comm.Get_rank() == 1 else plan, model, comm))
    assert len(set(lines)) == 1 and lines[0] is not None
    assert "rank 1 has another split plan than rank 0" in lines[0]


def test_a_rank_without_weights_is_named_on_every_rank():
    model, plan = _plan([1.0, 1.0, 1.0])
    with empty_weights():
        meta = build_model("edge3", 3, 32, 10).eval()
    lines = _each_rank_refuses(3, lambda comm: SplitExecutor(plan, meta if comm.Get_rank() == 2 else model, comm))
    assert len(set(lines)) == 1 and lines[0] is not None
    assert lines[0].startswith("rank 2: rank 2 runs node") and "holds no weights" in lines[0]


def test_agreeing_ranks_still_equal_plain_torch():
    model, plan = _plan([1.0, 2.0, 1.0])
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = run_ranks(3, lambda comm: SplitExecutor(plan, model, comm)(x if comm.Get_rank() == 0 else None, batch=2))
    with torch.no_grad():
        assert (out[0] - model(x)).abs().max().item() <= 1e-5


@settings(max_examples=30, deadline=None, derandomize=True)
@given(a=st.lists(st.integers(1, 6), min_size=2, max_size=4), b=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       net=st.sampled_from(["edge1", "edge3"]), head=st.sampled_from(["gather", "split"]))
def test_plan_digests_differ_exactly_when_the_rows_differ(a, b, net, head):
    """Two independent traces agree; the digest differs iff some value's rows or buffers differ (brute force
    over the plans' values), so shares that give the same rows run the same program."""
    if len(a) != len(b):
        b = (b * 4)[: len(a)]
    _, pa = _plan([float(w) for w in a], net, head)
    _, pb = _plan([float(w) for w in b], net, head)
    _, pa2 = _plan([float(w) for w in a], net, head)
    assert plan_digest(pa) == plan_digest(pa2)
    same_rows = all(pa.values[k].owned == pb.values[k].owned and pa.values[k].buffers == pb.values[k].buffers
                    for k in pa.values)
    same_reads = all(pa.windows[k].reads == pb.windows[k].reads for k in pa.windows)
    same_head = pa.head == pb.head and pa.head_split == pb.head_split
    assert (plan_digest(pa) == plan_digest(pb)) == (same_rows and same_reads and same_head)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(stages=st.integers(1, 4), data=st.data())
def test_stage_plans_name_every_rank_that_differs_from_its_stage(stages, data):
    reports = data.draw(st.lists(st.tuples(st.integers(0, stages - 1), st.sampled_from(["a", "b"])),
                                 min_size=1, max_size=8))
    plans, problems = stage_plans_of(reports, stages)
    first = {}
    for r, (s, d) in enumerate(reports):
        first.setdefault(s, d)
    differing = [r for r, (s, d) in enumerate(reports) if d != first[s]]
    missing = [s for s in range(stages) if s not in first]
    assert len(problems) == len(differing) + (1 if missing else 0)
    for r, text in zip(differing, problems):
        assert text.startswith(f"rank {r} planned stage {reports[r][0]} otherwise")
    assert plans == tuple(first[s] for s in sorted(first))
