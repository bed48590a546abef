"""Graph plans checked against brute force (no MPI), and the executor at one rank on COMM_SELF."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import build_net, randomize_batchnorm
from runtime import SplitExecutor, UsageError, plan_split, trace_model
from runtime.geometry import split_rows
from tests.randomgraphs import random_graph
from tests.randomnets import random_config

TV_NETS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "alexnet")


def _plan(model, shape, weights):
    return plan_split(trace_model(model, shape), weights)


def _rows(ranges) -> set:
    ranges = ranges if isinstance(ranges, (list, tuple)) else [ranges]
    return {x for r in ranges for x in range(r.start, r.stop)}


@pytest.mark.parametrize("seed", range(200))
def test_bytes_equal_brute_force_minimum(seed, min_bytes):
    """Random stacks and random DAGs at 1-4 ranks: planned bytes per node = receptive-field brute force."""
    ranks = 1 + seed % 4
    for model, shape, batch, weights in (random_config(seed, ranks), random_graph(5_000 + seed, ranks)):
        plan = _plan(model, shape, weights)
        assert plan.bytes_sent(batch) == min_bytes(plan.graph, weights, batch)


@pytest.mark.parametrize("seed", range(100))
def test_transfers_come_from_owners_and_fill_every_read(seed):
    ranks = 1 + seed % 4
    model, shape, batch, weights = random_graph(7_000 + seed, ranks)
    plan = _plan(model, shape, weights)
    for value in plan.values.values():
        for r in range(ranks):
            got = set()
            if value.exchange is not None:
                for t in value.exchange.recvs(r):
                    assert _rows(t.rows) <= _rows(value.owned[t.src])
                    got |= _rows(t.rows)
            have = got | _rows(value.owned[r])
            for c in plan.graph.consumers(value.name):
                if c.role != "window" or plan.windows[c.name].reads[r] is None:
                    continue
                h = c.window.height
                out = plan.windows[c.name].out_rows[r]
                taps = {o * h.stride - h.padding + h.dilation * k for o in range(out.start, out.stop)
                        for k in range(h.kernel)}
                assert {t for t in taps if 0 <= t < value.height} <= have


def test_even_3x3_halo_is_one_row_per_boundary():
    plan = _plan(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)), (4, 17, 5), [1, 1, 1])
    (ex,) = plan.exchanges
    assert sorted((t.src, t.dst, len(t.rows)) for t in ex.transfers) == [(0, 1, 1), (1, 0, 1), (1, 2, 1), (2, 1, 1)]
    assert plan.bytes_sent(1) == {ex.node: 2 * 2 * 1 * 5 * 4 * 4}  # boundaries x 2 sides x row x W x C x 4 B


def test_strided_dilated_window_moves_only_rows_it_reads():
    """Stride 2, dilation 2: odd rows are never read, so none is sent (the old plan sent the whole extent)."""
    plan = _plan(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=2, dilation=2)), (1, 35, 5), [1, 1])
    (ex,) = plan.exchanges
    assert all(t.rows.start % 2 == 0 and len(t.rows) == 1 for t in ex.transfers)


def test_fan_out_is_exchanged_once_for_the_union():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 5, padding=2)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    plan = _plan(Branches().eval(), (2, 16, 4), [1, 1])
    (ex,) = plan.exchanges
    assert ex.value == "x" and sorted(len(t.rows) for t in ex.transfers) == [2, 2]


def test_wide_halo_reaches_past_the_neighbour():
    plan = _plan(nn.Sequential(nn.Conv2d(1, 1, 7, padding=3)), (1, 8, 3), [1, 1, 1, 1])
    assert any(abs(t.src - t.dst) == 2 for t in plan.exchanges[0].transfers)


def test_more_ranks_than_input_rows_is_a_clear_error():
    with pytest.raises(UsageError, match=r"leave rank\(s\) \[.*\] without rows of the 3-row input; use at most 3 ranks"):
        _plan(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 3, 3), [1] * 4)


def test_deep_layer_may_leave_a_rank_empty():
    plan = _plan(nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2)), (1, 8, 8), [1, 1, 1, 1])
    assert [len(r) for r in plan.windows["_1"].out_rows].count(0) == 2


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [1, float("nan")], [1, float("inf")]])
def test_bad_weights_are_named(weights):
    with pytest.raises(UsageError, match="rank weights must be finite and > 0"):
        _plan(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 8, 8), weights)


class _Interpolate(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=1.5)


class _HeightIntoChannels(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c * h * w // 3, 3, 1)


class _CatHeight(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], dim=2)


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Upsample(scale_factor=2)), r"node '_0' \(Upsample\) .* mixes rows"),
        (_Interpolate(), r"node 'interpolate' \(interpolate\) .* mixes rows"),
        (_HeightIntoChannels(), r"node 'reshape' .* merges the height into another dimension"),
        (_CatHeight(), r"node 'cat' .* concatenates along the height"),
        (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(1, 1, 4, padding="same")), "padding='same' with an even kernel"),
        (nn.Sequential(nn.AvgPool2d(3, padding=1, count_include_pad=False)), "count_include_pad=False"),
        (nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), "ceil_mode=True average pool with a partial last window"),
        (nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False)), "no running statistics"),
        (nn.Sequential(nn.InstanceNorm2d(1)), r"node '_0' \(InstanceNorm2d\) .* does not know"),
    ],
)
def test_unsupported_ops_are_named(model, message):
    with pytest.raises(UsageError, match=message):
        _plan(model.eval(), (1, 9, 9), [1, 1])


def test_channel_mismatch_is_named():
    with pytest.raises(UsageError, match="does not run on a .* input|expects 3 input channels"):
        _plan(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), (1, 8, 8), [1])


def test_model_in_training_mode_is_refused():
    with pytest.raises(UsageError, match=r"training mode .*call model.eval\(\)"):
        trace_model(nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)), (1, 8, 8))


def test_vision_transformer_is_refused_in_one_line(tv):
    import torchvision

    with torch.device("meta"):
        vit = torchvision.models.vit_b_16().eval()
    with pytest.raises(UsageError) as err:
        trace_model(vit, (3, 224, 224))
    assert "\n" not in str(err.value) and "node '" in str(err.value)


@pytest.mark.parametrize("net", TV_NETS)
def test_torchvision_nets_plan_on_meta(net):
    """Every rank can trace and plan a real CNN on the meta device (no weights, no memory)."""
    import torchvision

    kwargs = dict(aux_logits=False, init_weights=True) if net == "googlenet" else {}
    with torch.device("meta"):
        model = torchvision.models.get_model(net, weights=None, **kwargs).eval()
    plan = plan_split(trace_model(model, (3, 224, 224)), [1, 2, 1])
    assert plan.exchanges and plan.graph.nodes[-1].role == "output"


# ---------------------------------------------------------------- the executor on one rank
@pytest.mark.parametrize("seed", range(60))
def test_one_rank_on_comm_self_equals_unsplit(seed, self_comm, split_check):
    """Serial check of the executor itself (a dropped BatchNorm bias fails here, not only under mpiexec)."""
    model, shape, batch, weights = random_graph(9_000 + seed, 1)
    assert not split_check(self_comm, model, shape, batch, [1.0], seed, f"graph {seed}", relative=True)


@pytest.mark.parametrize("net", ["edge1", "edge3", "cloud"])
def test_paper_nets_on_comm_self(net, self_comm, split_check):
    model = randomize_batchnorm(build_net(net, 3, 32, 10), torch.Generator().manual_seed(2)).eval()
    assert not split_check(self_comm, model, (3, 32, 32), 2, [1.0], 1, net)


def test_resnet18_on_comm_self(self_comm, split_check, tv):
    assert not split_check(self_comm, tv("resnet18"), (3, 64, 64), 1, [1.0], 1, "resnet18", tol=1e-4, relative=True)


def test_call_in_default_grad_mode(self_comm, same_output):
    """Old code: RuntimeError "Can't call numpy() on Tensor that requires grad" outside torch.no_grad()."""
    model = randomize_batchnorm(build_net("edge1", 3, 32, 10)).eval()
    image = torch.randn(1, 3, 32, 32)
    got = SplitExecutor.build(model, (3, 32, 32), self_comm)(image)
    with torch.no_grad():
        assert not same_output(got, model(image), 1e-5, "grad mode")


@pytest.mark.parametrize("shape", [(1, 3, 32, 31), (1, 3, 32, 33), (1, 1, 32, 32), (1, 3, 30, 32)])
def test_image_shape_checked_against_plan(self_comm, shape):
    """Old code checked neither the width (Scatterv read past the end, or a wrong-shaped answer) nor all of (C, H, W)."""
    executor = SplitExecutor.build(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32), self_comm)
    with pytest.raises(UsageError, match=r"the plan is for 3x32x32"):
        executor(torch.zeros(shape))


def test_rank_without_weights_is_named(self_comm):
    with torch.device("meta"):
        model = build_net("edge1", 3, 32, 10).eval()
    plan = plan_split(trace_model(model, (3, 32, 32)), [1.0])
    with pytest.raises(UsageError, match="holds no weights for 'conv1_1'"):
        SplitExecutor(plan, model, self_comm)


def test_input_split_matches_split_rows():
    plan = _plan(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 10, 4), [2, 1, 1])
    assert plan.input_rows == split_rows(10, [2, 1, 1])
