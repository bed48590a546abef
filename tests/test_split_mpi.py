"""Split execution equals the unsplit model, at every MPI size the suite runs (pytest-mpi).

Every test body runs on all ranks.  Results are compared on rank 0 and the
verdict is broadcast, so a failure fails every rank instead of leaving some
waiting in the next collective.
"""
import pytest
import torch

from models import build_net, randomize_batchnorm
from runtime import SplitExecutor, UsageError
from runtime.timing import LayerClock, analytic_min_bytes
from tests.randomnets import random_config

TOL = 1e-5  # float32, max abs error


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _all_agree(comm, problems: list[str]) -> None:
    """Fail on every rank if any rank found a problem."""
    everyone = [p for rank_problems in comm.allgather(problems) for p in rank_problems]
    assert not everyone, "\n".join(everyone[:20])


@torch.no_grad()
def _check(comm, model, shape, batch, weights, seed, label) -> list[str]:
    c, h, w = shape
    image = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))
    executor = SplitExecutor(model, shape, comm, weights)
    clock = LayerClock(len(executor.plan.layers))
    got = executor(image if comm.rank == 0 else None, batch, clock)
    problems = []
    sent = comm.allreduce(clock.bytes)
    for layer, moved in zip(executor.plan.layers, sent):
        if moved != analytic_min_bytes(layer, batch):
            problems.append(f"{label}: layer {layer.name} sent {moved} bytes, minimum {analytic_min_bytes(layer, batch)}")
    if comm.rank == 0:
        want = model(image)
        if got.shape != want.shape:
            problems.append(f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        else:
            # A max-pool window wholly in padding gives -inf (and a Linear after it NaN) in the
            # unsplit model too: identical non-finite values count as exact.
            same = (got == want) | (got.isnan() & want.isnan())
            err = torch.where(same, 0.0, (got - want).abs()).max().item()
            if not err <= TOL:
                problems.append(f"{label}: max abs error {err:.3g} > {TOL}")
    return problems


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("block", range(3))
def test_random_stacks_match_unsplit(block):
    """600 random stacks: kernels 1-7, strides 1/2, paddings 0-3, dilations 1/2, pools, batch 1-3, uneven weights."""
    comm = _comm()
    problems = []
    for seed in range(200 * block, 200 * (block + 1)):
        model, shape, batch, weights = random_config(10_000 + seed, comm.size)
        problems += _check(comm, model, shape, batch, weights, seed, f"seed {seed} {shape} w={weights}")
    _all_agree(comm, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", ["edge1", "edge2", "edge3", "cloud"])
@pytest.mark.parametrize("size", [32, 224])
def test_paper_nets_match_unsplit(net, size):
    comm = _comm()
    torch.manual_seed(size)
    model = randomize_batchnorm(build_net(net, 3, size, 10), torch.Generator().manual_seed(1)).eval()
    model = model.to(memory_format=torch.channels_last)
    problems = []
    for weights, batch in (([1.0] * comm.size, 1), ([1.0 + r for r in range(comm.size)], 2)):
        problems += _check(comm, model, (3, size, size), batch, weights, size, f"{net}@{size} w={weights}")
    _all_agree(comm, problems)


@pytest.mark.mpi(min_size=2)
def test_grayscale_edge_net_matches_unsplit():
    comm = _comm()
    model = randomize_batchnorm(build_net("edge2", 1, 28, 10)).eval()
    _all_agree(comm, _check(comm, model, (1, 28, 28), 3, [2.0] + [1.0] * (comm.size - 1), 7, "edge2 fmnist"))


@pytest.mark.mpi(min_size=2)
def test_non_image_input_fails_on_every_rank():
    comm = _comm()
    model = build_net("edge1", 3, 32, 10).eval()
    executor = SplitExecutor(model, (3, 32, 32), comm)
    bad = torch.zeros(3, 32, 32) if comm.rank == 0 else None
    with pytest.raises(UsageError, match=r"shape \(N, C, H, W\), got shape \(3, 32, 32\)"):
        executor(bad)


@pytest.mark.mpi(min_size=2)
def test_wrong_weight_count_fails_on_every_rank():
    comm = _comm()
    with pytest.raises(UsageError, match=f"got 1 rank weights for {comm.size} ranks"):
        SplitExecutor(build_net("edge1", 3, 32, 10), (3, 32, 32), comm, weights=[1.0])


@pytest.mark.mpi(min_size=3)
def test_rank_with_empty_slice_at_deep_layer():
    """Cloud net at 16x16: after four pools 1 row is left, so all but one rank own nothing."""
    comm = _comm()
    model = randomize_batchnorm(build_net("cloud", 3, 16, 10)).eval()
    _all_agree(comm, _check(comm, model, (3, 16, 16), 2, [1.0] * comm.size, 3, "cloud@16"))
