"""bench pipeline's re-plan from measured busy times: for ranks whose measured compute is what their (hidden)
speeds give, the re-planned cut is the best cut for those speeds -- checked by brute force over every cut."""
import itertools

from hypothesis import given, settings, strategies as st

from runtime.pipeline import Grid
from runtime.pipeline_bench import measured_replan


def _slowest(costs, bounds, speeds, head):
    """The slowest stage of one cluster for a cut, computed directly: its layers' seconds over its speed (the
    head on stage 0, rank 0, as measured seconds)."""
    times = [sum(costs[a:b]) / speeds[k] for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    times[0] += head
    return max(times)


@settings(max_examples=150, deadline=None)
@given(costs=st.lists(st.floats(0.001, 0.05), min_size=3, max_size=9),
       speeds=st.lists(st.sampled_from([0.25, 0.5, 0.8, 1.0, 1.7]), min_size=2, max_size=3),
       head=st.floats(0.0, 0.05), slowdown=st.floats(1.0, 1.5), data=st.data())
def test_the_replan_is_the_best_cut_for_the_speeds_the_ranks_showed(costs, speeds, head, slowdown, data):
    stages = min(len(speeds), len(costs))
    speeds = speeds[:stages]
    grid = Grid(1, stages)
    inner = sorted(data.draw(st.sets(st.integers(1, len(costs) - 1), min_size=stages - 1, max_size=stages - 1)))
    bounds = [0, *inner, len(costs)]
    # what each rank measured: its layers at its hidden speed, all slowed alike by contention
    shown = [s / slowdown for s in speeds]
    compute = [sum(costs[a:b]) / shown[k] for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    plan = measured_replan(costs, [0.0] * len(costs), grid, bounds, [1.0], compute, head)
    best = min(_slowest(costs, [0, *cut, len(costs)], shown, head)
               for cut in itertools.combinations(range(1, len(costs)), stages - 1))
    assert abs(_slowest(costs, list(plan.bounds), shown, head) - best) <= 1e-9 * max(1.0, best)
