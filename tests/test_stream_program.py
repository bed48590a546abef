"""A pipeline's per-image transfers (runtime/stream_program.py): lowered once, every band sent is received with
the same rows, the root ends with every row of the last map exactly once, and a broken set is found."""
import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from runtime.geometry import split_rows
from runtime.stream_program import (Collect, Head, Keep, RecvBand, RunStage, ScatterIn, SendBand, check_stream,
                                    lower_pipeline)


@st.composite
def pipelines(draw):
    clusters, stages = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    layers = draw(st.integers(stages, stages + 5))
    cuts = sorted(draw(st.lists(st.integers(1, layers - 1), min_size=stages - 1, max_size=stages - 1,
                                unique=True))) if stages > 1 else []
    heights = [draw(st.integers(1, 40)) for _ in range(layers + 1)]
    shapes = [(draw(st.integers(1, 8)), h, draw(st.integers(1, 8))) for h in heights]
    shares = [draw(st.floats(0.05, 4.0)) for _ in range(clusters)]
    split = draw(st.booleans())
    return clusters, stages, [0, *cuts, layers], shapes, shares, split


@settings(max_examples=300, deadline=None)
@given(pipelines())
def test_every_band_pairs_and_the_root_gets_each_row_once(case):
    clusters, stages, bounds, shapes, shares, split = case
    programs = lower_pipeline(clusters, stages, bounds, shapes, shares, split, (10,) if split else ())
    assert check_stream(programs, shapes[bounds[-1]][1]) == []
    last = stages - 1
    for p in programs:
        c, s = divmod(p.rank, stages)
        assert (p.cluster, p.stage) == (c, s)
        runs = [i for i in p.instructions if isinstance(i, RunStage)]
        assert runs == [RunStage(s, bounds[s], bounds[s + 1])]
        # brute force, from the grid alone: stage s of cluster c reads its share of stage s's input map
        rows_in = split_rows(shapes[bounds[s]][1], shares)[c]
        source = p.find(ScatterIn) or p.find(RecvBand)
        assert source.rows == rows_in and isinstance(source, ScatterIn) == (s == 0)
        if s < last:
            assert p.find(SendBand) == SendBand(p.rank + 1, split_rows(shapes[bounds[s + 1]][1], shares)[c],
                                                (shapes[bounds[s + 1]][0], shapes[bounds[s + 1]][2]))
        assert (p.find(Collect) is not None) == (p.find(Head) is not None) == (p.rank == 0)
    root = programs[0]
    if not split:  # the root's rows of the last map: what it keeps plus what it collects, each row once
        got = [r for _, r in root.find(Collect).sources] + ([root.find(Keep).rows] if root.find(Keep) else [])
        height = shapes[bounds[-1]][1]
        assert sorted(x for r in got for x in range(r.start, r.stop)) == list(range(height))


def _without(programs, rank, kind):
    p = programs[rank]
    return [q if q.rank != rank else dataclasses.replace(p, instructions=tuple(i for i in p.instructions
                                                                               if not isinstance(i, kind)))
            for q in programs]


def test_a_missing_receive_send_or_collect_is_found():
    programs = lower_pipeline(2, 2, [0, 3, 6], [(4, 16 - k, 4) for k in range(7)], [1, 1], False)
    assert check_stream(programs, 10) == []
    problems = check_stream(_without(programs, 1, RecvBand), 10)
    assert problems == ["rank 0 sends rows 0-5 x (4, 4) to rank 1, which never receives them"]
    problems = check_stream(_without(programs, 3, SendBand), 10)
    assert "rank 0 waits for rows 5-9 from rank 3, which never sends it" in problems
    problems = check_stream(_without(programs, 0, Collect), 10)
    assert problems == ["rank 0 collects nothing: no image would finish"]
    wrong = list(programs)
    send = wrong[2].find(SendBand)
    wrong[2] = dataclasses.replace(wrong[2], instructions=tuple(
        dataclasses.replace(i, rows=type(i.rows)(i.rows.start, i.rows.stop - 1)) if i is send else i
        for i in wrong[2].instructions))
    assert any("rank 2 sends rows 6-11 x (4, 4) to rank 3, which never receives them" in p
               for p in check_stream(wrong, 10))


@pytest.mark.parametrize("stages", [2, 3])
def test_plan_program_prints_every_ranks_transfers(capsys, stages):
    from launch.cli import main

    assert main(["plan", "--program", "--net", "edge3", "--size", "32", "--ranks", str(2 * stages),
                 "--stages", str(stages)]) == 0
    out = capsys.readouterr().out
    assert out.count(" transfers, rank ") == 2 * stages and "Collect" in out and "RecvBand" in out


def test_a_program_whose_rows_differ_from_the_stage_plan_is_refused():
    """The executor lowers every rank's transfers from the deployment and checks its own against the rows its
    stage plan computes (the same share of the same map); a mismatch is a set-up problem, not wrong rows."""
    from models import build_model
    from runtime.graph import trace_model
    from runtime.pipeline import _program_fits_plan, stage_plan
    from runtime.skeleton import empty_weights
    from runtime.stages import split_layers

    with empty_weights():
        model = build_model("edge3", 3, 32, 10).eval()
    layers = split_layers(trace_model(model, (3, 32, 32)))
    n, bounds, shares = len(layers), [0, 12, len(layers)], (2.0, 1.0)
    programs = lower_pipeline(2, 2, bounds, [layers.cut_shape(k) for k in range(n + 1)], shares, False)
    for rank, program in enumerate(programs):
        _, plan = stage_plan(model, layers, bounds, program.stage, shares, False)
        assert _program_fits_plan(program, plan, False) is None, rank
    _, plan = stage_plan(model, layers, bounds, 1, shares, False)
    recv = programs[3].find(RecvBand)
    shifted = dataclasses.replace(programs[3], instructions=tuple(
        dataclasses.replace(i, rows=type(i.rows)(i.rows.start - 1, i.rows.stop)) if i is recv else i
        for i in programs[3].instructions))
    assert "its stream program takes input rows" in _program_fits_plan(shifted, plan, False)
