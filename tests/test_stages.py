"""Cutting a model into layers and stages: checked against plain torch and against brute force."""
import itertools
import math
import random

import pytest
import torch

from models import build_net, randomize_batchnorm
from runtime import UsageError
from runtime.graph import trace_model
from runtime.pipeline import Grid, head_module, stage_module
from runtime.stages import balance, equal_stages, partition_stages, split_layers, stage_times
from tests.randomgraphs import random_graph


def brute_force_best(costs, out_bytes, speeds, shares, bandwidth):
    """The smallest slowest-(cluster, stage) time over every cut, by enumeration."""
    n, stages = len(costs), len(speeds[0])
    best, least_total = math.inf, math.inf
    for inner in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *inner, n)
        times = stage_times(costs, out_bytes, speeds, bounds, shares, bandwidth)
        slowest = max(max(row) for row in times)
        total = sum(max(row[k] for row in times) for k in range(stages))
        if slowest < best * (1 - 1e-9):
            best, least_total = slowest, total
        elif slowest <= best * (1 + 1e-9):
            least_total = min(least_total, total)
    return best, least_total


@pytest.mark.parametrize("seed", range(300))
def test_partition_is_optimal_for_fixed_shares(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    stages = rng.randint(1, min(4, n))
    clusters = rng.randint(1, 3)
    costs = [rng.choice([0.0, rng.uniform(0.1, 5.0)]) for _ in range(n)]
    out_bytes = [rng.uniform(0, 1e6) for _ in range(n)]
    speeds = [[rng.choice([0.25, 0.5, 1.0, 2.0]) for _ in range(stages)] for _ in range(clusters)]
    shares = [rng.uniform(0.5, 3.0) for _ in range(clusters)]
    bandwidth = rng.choice([math.inf, 1e6, 1e7])
    split = partition_stages(costs, out_bytes, speeds, bandwidth, shares=shares)
    assert split.bounds[0] == 0 and split.bounds[-1] == n and len(split.bounds) == stages + 1
    assert all(a < b for a, b in zip(split.bounds, split.bounds[1:]))
    want, want_total = brute_force_best(costs, out_bytes, speeds, shares, bandwidth)
    assert max(split.stage_seconds) == pytest.approx(want, rel=1e-9, abs=1e-12)
    if clusters == 1:  # with one cluster the tie-break's total is the stages' total
        assert sum(split.stage_seconds) == pytest.approx(want_total, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("seed", range(100))
def test_free_shares_never_worse_than_speed_proportional(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    stages = rng.randint(1, min(3, n))
    speeds = [[rng.choice([0.5, 1.0, 2.0]) for _ in range(stages)] for _ in range(rng.randint(2, 3))]
    costs = [rng.uniform(0.1, 5.0) for _ in range(n)]
    out_bytes = [0.0] * n
    split = partition_stages(costs, out_bytes, speeds)
    start = [sum(row) for row in speeds]
    assert max(split.stage_seconds) <= brute_force_best(costs, out_bytes, speeds, start, math.inf)[0] * (1 + 1e-9)


def test_unequal_devices_beat_identical_device_assumption():
    """A partitioner that assumes identical devices (balance by time alone) loses when one board is slower."""
    costs = [1.0] * 12
    speeds = [[1.0, 0.5]]  # stage 1's board runs at half speed
    ours = partition_stages(costs, [0.0] * 12, speeds)
    identical = partition_stages(costs, [0.0] * 12, [[1.0, 1.0]])
    theirs = stage_times(costs, [0.0] * 12, speeds, identical.bounds, [1.0])
    assert ours.bounds == (0, 8, 12)
    assert max(ours.stage_seconds) == pytest.approx(8.0)
    assert max(max(row) for row in theirs) == pytest.approx(12.0)
    assert ours.balance == pytest.approx(1.0)


def test_slow_cluster_gets_fewer_rows():
    split = partition_stages([1.0] * 6, [0.0] * 6, [[2.0, 2.0], [1.0, 1.0]])
    assert split.shares[0] > 1.9 * split.shares[1]


def test_equal_stages_and_refusals():
    assert equal_stages(10, 3) == (0, 4, 7, 10)
    assert equal_stages(3, 3) == (0, 1, 2, 3)
    with pytest.raises(UsageError, match="only 2 layers"):
        equal_stages(2, 3)
    with pytest.raises(UsageError, match="only 2 layers"):
        partition_stages([1.0, 1.0], [0, 0], [[1.0, 1.0, 1.0]])
    with pytest.raises(UsageError, match="same number of devices"):
        partition_stages([1.0] * 4, [0] * 4, [[1.0, 1.0], [1.0]])
    with pytest.raises(UsageError, match="positive"):
        partition_stages([1.0] * 4, [0] * 4, [[1.0, 0.0]])
    assert balance([1.0, 1.0]) == 1.0 and balance([3.0, 1.0]) == 1.5


def _compose(model, layers, bounds, x):
    """Run the stage modules one after another, then the head: must equal the model."""
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            x = stage_module(model, layers, a, b)(x)
        return head_module(model, layers)(x)


@pytest.mark.parametrize("net", ["edge1", "edge3", "cloud"])
def test_every_cut_of_the_paper_nets_composes_to_the_model(net):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_net(net, 3, 32, 10), torch.Generator().manual_seed(1)).eval()
    layers = split_layers(trace_model(model, (3, 32, 32)))
    assert [layer.nodes[0] for layer in layers.layers][:3] == ["conv1_1", "bn1_1", "relu1_1"]
    assert layers.head[0] == "flatten"
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    for cut in range(1, len(layers)):
        got = _compose(model, layers, (0, cut, len(layers)), x)
        assert torch.allclose(got, want, atol=1e-6), cut


@pytest.mark.parametrize("seed", range(40))
def test_random_graph_cuts_compose_to_the_model(seed):
    model, shape, batch, _ = random_graph(50_000 + seed, 2)
    try:
        layers = split_layers(trace_model(model, shape))
    except UsageError as err:  # e.g. a channel shuffle on a 1-row map: its reshape cannot tell rows apart
        assert "not supported" in str(err)
        pytest.skip(str(err))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x)
    rng = random.Random(seed)
    stages = rng.randint(1, min(4, len(layers)))
    bounds = (0, *sorted(rng.sample(range(1, len(layers)), stages - 1)), len(layers))
    got = _compose(model, layers, bounds, x)
    scale = max(float(want[want.isfinite()].abs().max()), 1e-30) if want.isfinite().any() else 1.0
    same = (got == want) | (got.isnan() & want.isnan())
    assert float(torch.where(same, 0.0, (got - want).abs()).max()) / scale <= 1e-5


def test_resnet_cuts_fall_between_blocks(tv):
    layers = split_layers(trace_model(tv("resnet18"), (3, 64, 64)))
    # inside a residual block two values are live (the branch and the shortcut): never a cut there
    assert not any("conv2" in layer.output for layer in layers.layers)
    assert layers.head == ("avgpool", "flatten", "fc")


def test_grid_rank_map():
    grid = Grid(3, 5)
    assert [grid.position(r) for r in range(15)] == [(c, s) for c in range(3) for s in range(5)]
    assert grid.rank(0, 0) == 0 and grid.rank(2, 4) == 14
    with pytest.raises(UsageError):
        Grid(0, 2)


@pytest.mark.parametrize("seed", range(40))
def test_two_cluster_shares_match_a_grid_search(seed):
    """For two clusters the chosen (cut, shares) is as good as the best of a fine grid of shares, each with its
    exact best cut; a fixed head on cluster 0 never drives its share below the minimum."""
    rng = random.Random(seed)
    n, stages = rng.randint(2, 7), rng.randint(1, 2)
    costs = [rng.uniform(0.1, 3.0) for _ in range(n)]
    speeds = [[rng.choice([0.5, 1.0, 2.0]) for _ in range(stages)] for _ in range(2)]
    extra = [[rng.choice([0.0, 2.0, 20.0])] + [0.0] * (stages - 1), [0.0] * stages]
    got = partition_stages(costs, [0.0] * n, speeds, extra=extra, min_share=0.05)
    assert min(s / sum(got.shares) for s in got.shares) >= 0.05 - 1e-9
    best = math.inf
    for i in range(5, 96):
        shares = [i / 100, 1 - i / 100]
        split = partition_stages(costs, [0.0] * n, speeds, extra=extra, shares=shares)
        best = min(best, max(split.stage_seconds))
    assert max(got.stage_seconds) <= best * 1.02
