"""Row shares of the stage partitioner: clamped shares still sum to 1, starts are the same on every
platform (no libm), and the chosen plan is never worse than the even one it could have chosen."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.stages import _starting_shares, clamp_shares, partition_stages, stage_times

positive = st.floats(min_value=1e-4, max_value=1e3, allow_nan=False, allow_infinity=False)


@given(st.lists(positive, min_size=1, max_size=8), st.floats(min_value=0.0, max_value=0.3))
def test_clamped_shares_sum_to_one_none_below_the_floor_and_order_kept(raw, floor):
    got = clamp_shares(raw, floor)
    assert math.isclose(sum(got), 1.0, rel_tol=1e-9)
    if floor * len(raw) < 1.0:
        assert min(got) >= floor * (1 - 1e-9)
        for i in range(len(raw)):
            for j in range(len(raw)):
                if raw[i] < raw[j]:
                    assert got[i] <= got[j] + 1e-12


def test_the_issue_case_keeps_its_floor_and_sums_to_one():
    got = clamp_shares([0.001, 1.0, 1.0], 1 / 7)
    assert math.isclose(got[0], 1 / 7) and math.isclose(sum(got), 1.0) and math.isclose(got[1], got[2])


def test_starts_use_no_transcendental_functions():
    # the 3+ cluster starts are fixed numbers: recomputed here by hand for 3 clusters, first draw
    draw = [0.05 + ((1 * (c + 1) * 0.6180339887498949) % 1.0) for c in range(3)]
    got = _starting_shares([[1.0], [1.0], [1.0]], 0.0)[2]
    assert all(math.isclose(g, d / sum(draw), rel_tol=1e-12) for g, d in zip(got, draw))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_plan_is_never_worse_than_even_shares_with_their_best_cut(data):
    clusters = data.draw(st.integers(1, 4))
    stages = data.draw(st.integers(1, 3))
    layers = data.draw(st.integers(stages, 8))
    costs = data.draw(st.lists(positive, min_size=layers, max_size=layers))
    out_bytes = data.draw(st.lists(st.floats(0, 1e6), min_size=layers, max_size=layers))
    speeds = data.draw(st.lists(st.lists(st.floats(0.05, 1.0), min_size=stages, max_size=stages),
                                min_size=clusters, max_size=clusters))
    bandwidth = data.draw(st.sampled_from([math.inf, 1e5, 1e7]))
    floor = data.draw(st.sampled_from([0.0, 0.05, 1 / 7]))
    plan = partition_stages(costs, out_bytes, speeds, bandwidth, min_share=floor)
    assert math.isclose(sum(plan.shares), 1.0, rel_tol=1e-9) and min(plan.shares) >= floor * (1 - 1e-9)
    even = (1.0 / clusters,) * clusters
    fixed = partition_stages(costs, out_bytes, speeds, bandwidth, shares=even)
    even_worst = max(max(row) for row in stage_times(costs, out_bytes, speeds, fixed.bounds, even, bandwidth))
    assert max(plan.stage_seconds) <= even_worst * (1 + 1e-9)
