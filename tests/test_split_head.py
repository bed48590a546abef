"""The split FC head (plan_split(..., head="split")): columns against brute force, outputs against the unsplit model.

Serial tests check the plan's column blocks against an index tensor flattened
by torch itself, and the fall-backs to a gather.  MPI tests (every rank runs
the body; the verdict is shared) compare the split head's output with the
unsplit model in plain torch: random heads (five flatten spellings, eval
dropout or none, with and without bias, ranks owning no row of the last map),
the paper's nets at 32x32 and at 224x224 (there with a narrow first Linear, so
every rank can hold the reference), and distribute_model from a checkpoint.
"""
import os
import re

import pytest
import torch
import torch.nn as nn

from models import build_net, randomize_batchnorm
from runtime import SplitExecutor, UsageError, distribute_model, plan_split, trace_model
from runtime.geometry import split_rows
from tests.randomheads import random_head

TOL = 1e-5  # max abs error relative to the output's max


def _split_check(comm, model, shape, batch, weights, seed, label, same_output, head="split"):
    """Problems of a split-head run against plain torch (and of a plan that did not split)."""
    image = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    executor = SplitExecutor.build(model, shape, comm, weights, head=head)
    problems = [] if executor.plan.head == "split" else [f"{label}: not split ({executor.plan.head_note})"]
    got = executor(image if comm.rank == 0 else None, batch)
    if comm.rank == 0:
        with torch.no_grad():
            problems += same_output(got, model(image), TOL, label, relative=True)
    return problems


# ---------------------------------------------------------------- serial: plan
@pytest.mark.parametrize("seed", range(60))
def test_column_blocks_are_the_flattened_own_rows(seed):
    """Each rank's columns = torch's flatten of an index map restricted to its rows; together a partition."""
    ranks = 1 + seed % 4
    model, shape, _, weights = random_head(30_000 + seed, ranks)
    plan = plan_split(trace_model(model, shape), weights, head="split")
    hs = plan.head_split
    assert plan.head == "split" and hs.linear == "fc1" and hs.target == "fc1"
    index = torch.arange(hs.in_features).view(1, hs.channels, hs.height, hs.width)
    seen = []
    for r, rows in enumerate(split_rows(hs.height, weights)):
        want = index[:, :, rows.start:rows.stop].reshape(-1).tolist()  # NCHW flatten of the own rows
        got = [c for a, b in hs.column_blocks(r) for c in range(a, b)]
        assert got == want and hs.columns(r) == len(want)
        seen += got
    assert sorted(seen) == list(range(hs.in_features))


def test_default_head_is_gather_and_says_so():
    plan = plan_split(trace_model(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32)), [1.0, 1.0])
    assert plan.head == "gather" and plan.head_split is None
    assert "gathers 'pool1'" in plan.head_note and "fc1" in plan.head_note


def test_unknown_head_placement_is_named():
    with pytest.raises(UsageError, match="head placement must be one of gather, split, got 'rows'"):
        plan_split(trace_model(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32)), [1.0], head="rows")


class _TwoMaps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1), nn.Linear(256, 4)

    def forward(self, x):
        return self.fc(torch.cat([torch.flatten(self.a(x), 1), torch.flatten(self.b(x), 1)], 1))


class _LiteralBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(128, 4)

    def forward(self, x):
        return self.fc(self.conv(x).view(1, -1))


@pytest.mark.parametrize("model, shape, reason", [
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.ReLU(), nn.Linear(128, 4)), (3, 8, 8),
     r"'_2' \(ReLU\) comes between the flatten and the first Linear"),
    (_TwoMaps(), (3, 8, 8), "the head reads 2 split maps"),
    (_LiteralBatch(), (3, 8, 8), "does not start with a flatten"),
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4)),
     (3, 8, 8), "global pool '_1' reduces partial sums before the Linear"),
])
def test_heads_that_cannot_split_fall_back_to_gather_with_the_reason(model, shape, reason):
    plan = plan_split(trace_model(model.eval(), shape), [1.0, 1.0], head="split")
    assert plan.head == "gather" and plan.head_split is None
    assert plan.head_note.startswith("gather: the head cannot split")
    assert re.search(reason, plan.head_note)


def test_torchvision_global_pool_head_is_named(tv):
    plan = plan_split(trace_model(tv("resnet18"), (3, 64, 64)), [1.0, 1.0], head="split")
    assert plan.head == "gather" and "global pool 'avgpool' reduces partial sums before the Linear" in plan.head_note


@pytest.mark.parametrize("seed", range(40))
def test_split_head_on_comm_self_equals_unsplit(seed, self_comm, same_output):
    model, shape, batch, _ = random_head(40_000 + seed, 1)
    assert not _split_check(self_comm, model, shape, batch, [1.0], seed, f"head {seed}", same_output)


# ---------------------------------------------------------------- MPI: outputs
@pytest.mark.mpi(min_size=2)
def test_random_heads_match_unsplit(world, agree, same_output):
    """60 random heads: channels 1-6, heights/widths, out features 1-9, flatten spellings, weights, batch 1-3."""
    problems = []
    for seed in range(60):
        model, shape, batch, weights = random_head(50_000 + seed, world.size)
        problems += _split_check(world, model, shape, batch, weights, seed, same_output=same_output,
                                 label=f"head {seed} {shape} w={weights}")
    agree(world, problems)


def _paper_net(net: str, size: int, hidden=None):
    torch.manual_seed(size)
    model = randomize_batchnorm(build_net(net, 3, size, 10), torch.Generator().manual_seed(1))
    if hidden is not None:  # a narrow first Linear: every rank can hold the 224x224 reference cheaply
        model.fc1 = nn.Linear(model.fc1.in_features, hidden)
        model.fc2 = nn.Linear(hidden, 10)
    return model.eval().to(memory_format=torch.channels_last)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", ["edge1", "edge2", "edge3", "cloud"])
@pytest.mark.parametrize("size", [32, 224])
def test_paper_nets_split_head_match_unsplit(world, agree, same_output, net, size):
    """Even weights at batch 1, uneven at batch 3; channels-last maps, NCHW flatten order."""
    model = _paper_net(net, size, hidden=None if size == 32 else 16)
    problems = []
    cases = (([1.0] * world.size, 1), ([1.0 + r for r in range(world.size)], 3))
    for weights, batch in cases[1:] if world.size >= 4 and size >= 224 else cases:  # as in test_split_mpi
        problems += _split_check(world, model, (3, size, size), batch, weights, size, f"{net}@{size} w={weights}",
                                 same_output)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_auto_head_says_why_and_matches_unsplit(world, agree, same_output):
    model = _paper_net("edge2", 64)
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    executor = SplitExecutor.build(model, (3, 64, 64), world, head="auto")
    note = executor.plan.head_note
    problems = [] if note.startswith(f"auto -> {executor.plan.head}: estimated split") else [f"note: {note}"]
    notes = world.allgather((executor.plan.head, note.split(" (")[0]))
    if len(set(n[0] for n in notes)) != 1:
        problems.append(f"ranks chose differently: {notes}")
    got = executor(image if world.rank == 0 else None)
    if world.rank == 0:
        with torch.no_grad():
            problems += same_output(got, model(image), TOL, "auto", relative=True)
    agree(world, problems)


@pytest.fixture
def shared_checkpoint(world, tmp_path):
    """A path every rank sees (the root's tmp dir) and a writer that runs on the root."""
    path = world.bcast(str(tmp_path / "edge1.pt") if world.rank == 0 else None)
    yield path
    world.Barrier()


def _edge1_64():
    torch.manual_seed(3)
    return randomize_batchnorm(build_net("edge1", 3, 64, 10), torch.Generator().manual_seed(4))


@pytest.mark.mpi(min_size=2)
def test_no_rank_holds_the_whole_linear_from_a_checkpoint(world, agree, same_output, shared_checkpoint):
    """distribute_model(head="split", checkpoint=...): fc1's weight is meta everywhere, each rank holds its columns."""
    if world.rank == 0:
        torch.save(_edge1_64().state_dict(), shared_checkpoint)
    world.Barrier()
    weights = [1.0 + r for r in range(world.size)]
    executor = distribute_model(_edge1_64, (3, 64, 64), world, weights, head="split", checkpoint=shared_checkpoint)
    hs = executor.plan.head_split
    problems = []
    if not executor.model.fc1.weight.is_meta:
        problems.append(f"rank {world.rank} holds the whole fc1 weight")
    if tuple(executor._head_weight.shape) != (1024, hs.columns(world.rank)):
        problems.append(f"rank {world.rank}: columns {tuple(executor._head_weight.shape)}")
    full = _edge1_64().eval().fc1.weight.detach()  # the same seeded weights, built independently
    mine = torch.cat([full[:, a:b] for a, b in hs.column_blocks(world.rank)], 1) if hs.columns(world.rank) else None
    if mine is not None and not torch.equal(mine, executor._head_weight):
        problems.append(f"rank {world.rank}: wrong columns received")
    if world.rank != 0 and not all(p.is_meta for n, p in executor.model.named_parameters() if n.startswith("fc2")):
        problems.append(f"rank {world.rank} holds the rest of the head")
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = executor(image if world.rank == 0 else None)
    if world.rank == 0:
        with torch.no_grad():
            problems += same_output(got, _edge1_64().eval()(image), TOL, "edge1 from checkpoint", relative=True)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_split_head_without_checkpoint_frees_the_root_linear(world, agree, same_output):
    executor = distribute_model(_edge1_64, (3, 64, 64), world, head="split")
    problems = [] if executor.model.fc1.weight.is_meta else [f"rank {world.rank} kept the whole fc1 weight"]
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    got = executor(image if world.rank == 0 else None)
    if world.rank == 0:
        with torch.no_grad():
            problems += same_output(got, _edge1_64().eval()(image), TOL, "edge1 built", relative=True)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_mismatched_checkpoint_fails_on_every_rank(world, shared_checkpoint):
    if world.rank == 0:
        torch.save(build_net("edge2", 3, 64, 10).state_dict(), shared_checkpoint)
    world.Barrier()
    with pytest.raises(UsageError, match="does not match the net"):
        distribute_model(_edge1_64, (3, 64, 64), world, head="split", checkpoint=shared_checkpoint)


@pytest.mark.mpi(min_size=2)
def test_missing_checkpoint_fails_on_every_rank(world):
    with pytest.raises(UsageError, match="does not exist"):
        distribute_model(_edge1_64, (3, 64, 64), world, head="split", checkpoint=os.devnull + ".nope.pt")


@pytest.mark.mpi(min_size=2)
def test_head_false_needs_no_columns(world, agree):
    """The pipeline's use: SplitExecutor(plan, model, comm, head=False) with a split-head plan and no Linear weights."""
    model = _edge1_64().eval()
    plan = plan_split(trace_model(model, (3, 64, 64)), [1.0] * world.size, head="split")
    model.fc1.weight = nn.Parameter(torch.empty(model.fc1.weight.shape, device="meta"), requires_grad=False)
    executor = SplitExecutor(plan, model, world, head=False)
    rows = plan.input_rows[world.rank]
    x = torch.randn(1, 3, len(rows), 64).contiguous(memory_format=torch.channels_last)
    env = executor.forward_local(x)
    own = plan.values["pool1"].owned[world.rank]
    problems = [] if env["pool1"].shape[2] == len(own) and "fc1" not in env else [f"rank {world.rank}: {env.keys()}"]
    with pytest.raises(UsageError, match="holds no weights for it"):
        SplitExecutor(plan, model, world)
    agree(world, problems)
