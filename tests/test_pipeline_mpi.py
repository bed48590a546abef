"""Clusters x pipeline stages give the unsplit model's output for every image of a stream (pytest-mpi).

Every factorisation ``clusters x stages`` of the MPI size is tried (a flat
height split, a pure pipeline and everything between), with random cuts,
uneven row shares, batch 1 and 2, several images in flight.  Each output is
compared with plain torch on the same image; the verdict is shared so a
failure fails every rank.
"""
import random

import pytest
import torch

from models import build_net, randomize_batchnorm
from runtime import UsageError
from runtime.graph import trace_model
from runtime.pipeline import Grid, PipelineExecutor
from runtime.stages import split_layers
from tests.randomgraphs import random_graph
from tests.randomnets import random_config

pytestmark = pytest.mark.wide  # also at 8 ranks: 1x8, 2x4, 4x2, 8x1


def grids(size: int):
    return [Grid(c, size // c) for c in range(1, size + 1) if size % c == 0]


def random_bounds(rng: random.Random, layers: int, stages: int) -> tuple[int, ...]:
    inner = sorted(rng.sample(range(1, layers), stages - 1))
    return (0, *inner, layers)


def check_stream(comm, model, shape, grid, bounds, shares, batch, images, seed, label, tol=1e-5, relative=False,
                 layers=None, head="gather"):
    """Problems (empty: none) streaming ``images`` seeded batches through ``grid`` against ``model(x)``."""
    from tests.conftest import compare_outputs

    executor = PipelineExecutor(model, shape, grid, bounds, shares, comm, layers=layers, head=head)
    if head == "split" and not executor.split_head:
        return [f"{label}: the head did not split ({executor.head_note})"]
    gen = torch.Generator().manual_seed(seed)
    stream = [torch.randn(batch, *shape, generator=gen) for _ in range(images)]
    result = executor.stream(stream if comm.rank == 0 else None)
    executor.close()
    problems = []
    if comm.rank == 0:
        if len(result.outputs) != images:
            return [f"{label}: {len(result.outputs)} outputs for {images} images"]
        with torch.no_grad():
            for i, (x, got) in enumerate(zip(stream, result.outputs)):
                problems += compare_outputs(got, model(x), tol, f"{label} image {i}", relative)
    return problems


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", ["edge1", "edge2", "edge3", "cloud"])
def test_paper_nets_every_grid(world, agree, net):
    """Edge nets 1-3 and the cloud net, every grid of this size, random cuts and shares, batch 1 to 3, the head
    gathered to rank 0 or split over the last stage (its columns of the first Linear, one Reduce)."""
    problems = []
    rng = random.Random(7)
    for grid in grids(world.size):
        size = 32 if grid.clusters <= 2 else 64  # the cloud net's last map has 2 rows at 32x32
        torch.manual_seed(size)
        model = randomize_batchnorm(build_net(net, 3, size, 10), torch.Generator().manual_seed(1)).eval()
        layers = split_layers(trace_model(model, (3, size, size)))
        for batch, head in _batches_and_heads(world):
            bounds = random_bounds(rng, len(layers), grid.stages)
            shares = [rng.choice([1.0, 1.5, 2.0, 3.0]) for _ in range(grid.clusters)]
            problems += check_stream(world, model, (3, size, size), grid, bounds, shares, batch, 3, batch,
                                     f"{net}@{size} {grid.clusters}x{grid.stages} bounds={bounds} shares={shares} "
                                     f"head={head}", layers=layers, head=head)
    agree(world, problems)


def _batches_and_heads(world) -> tuple:
    """Four (batch, head) cases per grid, two at 8+ ranks (CI's 2 cores run those four times oversubscribed)."""
    cases = ((1, "gather"), (2, "gather"), (1, "split"), (3, "split"))
    return cases if world.size < 8 else cases[1:3]


def _random_count(world) -> int:
    """Random configurations per test: 60, or 36 at 8+ ranks (CI's 2 cores run those four times oversubscribed)."""
    return 60 if world.size < 8 else 36


@pytest.mark.mpi(min_size=2)
def test_random_stacks_every_grid(world, agree):
    """Random conv/pool stacks (kernels, strides, paddings, dilations) over every grid, random cuts."""
    problems = []
    for seed in range(_random_count(world)):
        grid = grids(world.size)[seed % len(grids(world.size))]
        model, shape, batch, weights = random_config(30_000 + seed, grid.clusters)
        layers = split_layers(trace_model(model, shape))
        if len(layers) < grid.stages:
            continue
        rng = random.Random(seed)
        bounds = random_bounds(rng, len(layers), grid.stages)
        try:
            problems += check_stream(world, model, shape, grid, bounds, weights, batch, 2, seed,
                                     f"stack {seed} {shape} {grid} bounds={bounds} w={weights}", layers=layers)
        except UsageError as err:  # a deep stage's map with fewer rows than clusters: refused, on every rank
            assert "without rows" in str(err), str(err)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_random_graphs_every_grid(world, agree):
    """Random DAGs (residuals, concats, shuffles, squeeze-excitation): cuts fall between blocks."""
    problems, tried = [], 0
    for seed in range(_random_count(world)):
        grid = grids(world.size)[seed % len(grids(world.size))]
        model, shape, batch, weights = random_graph(40_000 + seed, grid.clusters)
        layers = split_layers(trace_model(model, shape))
        if len(layers) < grid.stages:
            continue
        bounds = random_bounds(random.Random(seed), len(layers), grid.stages)
        try:
            problems += check_stream(world, model, shape, grid, bounds, weights, batch, 2, seed,
                                     f"graph {seed} {shape} {grid} bounds={bounds} w={weights}", tol=1e-5,
                                     relative=True, layers=layers)
            tried += 1
        except UsageError as err:
            assert "without rows" in str(err), str(err)
    assert tried >= _random_count(world) // 3, f"only {tried} random graphs could be cut for {world.size} ranks"
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_resnet18_pipeline(world, agree, tv):
    """A torchvision ResNet-18 as shipped, cut between residual blocks."""
    model = tv("resnet18")
    shape = (3, 64, 64)
    layers = split_layers(trace_model(model, shape))
    problems = []
    for grid in grids(world.size)[:2]:
        bounds = random_bounds(random.Random(grid.stages), len(layers), grid.stages)
        problems += check_stream(world, model, shape, grid, bounds, [1.0 + c for c in range(grid.clusters)], 1, 2,
                                 3, f"resnet18 {grid} bounds={bounds}", tol=1e-4, relative=True, layers=layers)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_bad_bounds_and_sizes_fail_on_every_rank(world):
    model = build_net("edge3", 3, 32, 10).eval()
    with pytest.raises(UsageError, match="rise strictly"):
        PipelineExecutor(model, (3, 32, 32), Grid(1, world.size), [0] * (world.size + 1), comm=world)
    with pytest.raises(UsageError, match=f"mpiexec -n {world.size + 1}"):
        PipelineExecutor(model, (3, 32, 32), Grid(1, world.size + 1), list(range(world.size + 2)), comm=world)
    layers = len(split_layers(trace_model(model, (3, 32, 32))))
    executor = PipelineExecutor(model, (3, 32, 32), Grid(world.size, 1), [0, layers], comm=world)
    bad = [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)] if world.rank == 0 else None
    with pytest.raises(UsageError, match="same size"):
        executor.stream(bad)
    executor.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("head", ["gather", "split"])
def test_distributed_pipeline_holds_only_its_stage(world, agree, head):
    """Ranks other than 0 build on meta and get only their stage's weights (the executor refuses meta weights
    on a node it runs, so a missing weight fails); with the split head the last stage's ranks get only their
    columns of the first Linear.  Outputs still match plain torch."""
    from runtime.pipeline import distribute_pipeline

    def build():
        torch.manual_seed(3)
        return randomize_batchnorm(build_net("edge2", 3, 32, 10), torch.Generator().manual_seed(1))

    model = build().eval()
    layers = split_layers(trace_model(model, (3, 32, 32)))
    total = sum(p.numel() for p in model.parameters())
    problems = []
    for grid in grids(world.size)[:2]:  # a pure pipeline, then 2 (or 3) clusters
        bounds = random_bounds(random.Random(world.size), len(layers), grid.stages)
        shares = [1.0 + c for c in range(grid.clusters)]
        executor = distribute_pipeline(build, (3, 32, 32), grid, bounds, shares, comm=world, head=head)
        held = sum(p.numel() for p in executor.model_params if not p.is_meta)
        images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        result = executor.stream(images if world.rank == 0 else None)
        executor.close()
        label = f"{grid} head={head}"
        if world.rank == 0:
            with torch.no_grad():
                for x, got in zip(images, result.outputs):
                    err = float((model(x) - got).abs().max())
                    if err > 1e-5:
                        problems.append(f"{label}: max error {err}")
        elif held >= total // 2:  # the head's first Linear alone is most of the net
            problems.append(f"{label}: rank {world.rank} holds {held} real weights of {total}")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_rank_with_other_cuts_or_shares_is_named_on_every_rank(world):
    """A board that read another topology (other stage cuts, other row shares) is refused, naming it, on every
    rank, before any image (it used to hang, truncate a receive or print a wrong answer)."""
    from runtime.transport import AgreedError

    model = build_net("edge3", 3, 32, 10).eval()
    n = len(split_layers(trace_model(model, (3, 32, 32))))
    bounds = [*range(world.size), n] if world.rank != 1 else [0, *range(2, world.size + 1), n]
    with pytest.raises(AgreedError, match=r"^rank 1\b.*another deployment"):
        PipelineExecutor(model, (3, 32, 32), Grid(1, world.size), bounds, comm=world)
    shares = [1.0] * world.size if world.rank != 1 else [1.0] + [3.0] * (world.size - 1)
    with pytest.raises(AgreedError, match=r"^rank 1\b.*another deployment"):
        PipelineExecutor(model, (3, 32, 32), Grid(world.size, 1), [0, n], shares, comm=world)


@pytest.mark.mpi(min_size=2)
def test_plan_program_prints_the_deployment_the_executors_agree_on(world):
    """`aflkd plan --program --stages S` (built without MPI from a skeleton) names the same deployment digest
    as the executors of a real job, for every grid of this size, and its stage programs pair."""
    from launch.planning import pipeline_programs
    from runtime.stages import equal_stages

    model = build_net("edge3", 3, 32, 10).eval()
    n = len(split_layers(trace_model(model, (3, 32, 32))))
    for grid in grids(world.size):
        deployment, programs, problems = pipeline_programs("edge3", 32, world.size, grid.stages)
        executor = PipelineExecutor(model, (3, 32, 32), grid, list(equal_stages(n, grid.stages)), comm=world)
        assert executor.deployment.digest() == deployment.digest() and not problems, grid
        assert sorted(programs) == list(range(world.size))
        executor.close()
