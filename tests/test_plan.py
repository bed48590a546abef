"""Split plans and per-rank steps, checked against brute-force row sets (no MPI)."""
import pytest
import torch.nn as nn

from runtime.errors import UsageError
from runtime.geometry import RowRange, input_rows_for
from runtime.layers import describe_layer, split_features
from runtime.plan import build_plan
from runtime.timing import analytic_min_bytes
from tests.randomnets import random_config


def _plan(model, shape, weights):
    features, _ = split_features(model)
    return build_plan([describe_layer(n, m) for n, m in features], shape, weights)


def _rows(r: RowRange) -> set:
    return set(range(r.start, r.stop))


@pytest.mark.parametrize("seed", range(300))
def test_transfers_deliver_exactly_the_missing_rows(seed):
    ranks = 1 + seed % 4
    model, shape, batch, weights = random_config(seed, ranks)
    plan = _plan(model, shape, weights)
    for layer in plan.layers:
        height = layer.in_shape[1]
        for r in range(ranks):
            want = _rows(layer.needed[r])
            got = set().union(*[_rows(t.rows) for t in layer.recvs(r)]) if layer.recvs(r) else set()
            assert got == want - _rows(layer.owned_in[r])
            for t in layer.recvs(r):
                assert _rows(t.rows) <= _rows(layer.owned_in[t.src])
            if layer.spec.spatial and len(layer.owned_out[r]):
                full = input_rows_for(layer.owned_out[r], layer.spec.height)
                assert layer.pad_top[r] == len([x for x in _rows(full) if x < 0])
                assert layer.pad_bottom[r] == len([x for x in _rows(full) if x >= height])
                assert _rows(layer.needed[r]) == _rows(full) & set(range(height))
        # bytes moved = rows missing x row bytes, computed from sets
        moved = sum(len(t.rows) for t in layer.transfers) * layer.row_bytes(batch)
        assert moved == analytic_min_bytes(layer, batch)


def test_even_3x3_halo_is_one_row_per_boundary():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    plan = _plan(model, (4, 17, 5), [1, 1, 1])
    (layer,) = plan.layers
    assert sorted((t.src, t.dst, len(t.rows)) for t in layer.transfers) == [(0, 1, 1), (1, 0, 1), (1, 2, 1), (2, 1, 1)]
    assert analytic_min_bytes(layer, 1) == 2 * 2 * 1 * 5 * 4 * 4  # boundaries x 2 sides x row x W x C x 4 B


def test_wide_halo_reaches_past_the_neighbour():
    model = nn.Sequential(nn.Conv2d(1, 1, 7, padding=3))
    plan = _plan(model, (1, 8, 3), [1, 1, 1, 1])  # 2 rows per rank, halo of 3
    assert any(abs(t.src - t.dst) == 2 for t in plan.layers[0].transfers)


def test_more_ranks_than_input_rows_is_a_clear_error():
    with pytest.raises(UsageError, match=r"leave rank\(s\) \[.*\] without rows of the 3-row input; use at most 3 ranks"):
        _plan(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 3, 3), [1] * 4)


def test_deep_layer_may_leave_a_rank_empty():
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2))
    plan = _plan(model, (1, 8, 8), [1, 1, 1, 1])
    assert [len(r) for r in plan.layers[-1].owned_out].count(0) == 2


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.Upsample(scale_factor=2), r"layer '0' \(Upsample\) is not supported"),
        (nn.Conv2d(1, 1, 3, padding="same"), "padding='same'; give integer padding"),
        (nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True; use ceil_mode=False"),
        (nn.AvgPool2d(3, padding=1, count_include_pad=False), "count_include_pad=False"),
        (nn.BatchNorm2d(1, track_running_stats=False), "no running statistics"),
    ],
)
def test_unsupported_layers_are_named(layer, message):
    with pytest.raises(UsageError, match=message):
        _plan(nn.Sequential(layer), (1, 8, 8), [1, 1])


def test_channel_mismatch_is_named():
    with pytest.raises(UsageError, match="expects 3 input channels but receives 1"):
        _plan(nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 8, 8), [1])


def test_input_too_small_for_the_stack_is_named():
    with pytest.raises(UsageError, match="layer '1' with input 2x2"):
        _plan(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 1, 3)), (1, 4, 4), [1])


def test_model_in_training_mode_is_refused():
    from mpi4py import MPI

    from runtime import SplitExecutor

    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1))
    with pytest.raises(UsageError, match=r"training mode; call model.eval\(\)"):
        SplitExecutor(model, (1, 8, 8), MPI.COMM_SELF)
