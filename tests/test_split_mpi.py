"""Split execution equals the unsplit model, at every MPI size the suite runs (pytest-mpi).

Every test body runs on all ranks.  Results are compared on rank 0 and the
verdict is shared, so a failure fails every rank instead of leaving some
waiting in the next collective.  Bytes sent per node are compared with an
independent brute-force minimum (see conftest).
"""
import pytest
import torch

from models import build_net, randomize_batchnorm
from runtime import SplitExecutor, UsageError, distribute_model
from tests.randomgraphs import random_graph
from tests.randomnets import random_config

TV_NETS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "alexnet")


def only_at_two_ranks(world, block: int, blocks: int) -> None:  # noqa: ARG001 (block: kept for the call sites)
    """Every block under mpiexec at 2 ranks.  At 3, 4 and 8 ranks random stacks and DAGs run in process
    (tests/test_program.py: the same executor over runtime/inprocess.py), since CI's 2 cores run those sizes
    oversubscribed; the paper's, torchvision's and timm's nets, the split head and the pipeline's random
    grids still run under mpiexec at every size."""
    if world.size > 2:
        pytest.skip("random configurations above 2 ranks: in process (tests/test_program.py)")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("block", range(3))
def test_random_stacks_match_unsplit(world, split_check, agree, block):
    """600 random stacks: kernels 1-7, strides 1/2, paddings 0-3, dilations 1/2, pools, batch 1-3, uneven weights."""
    only_at_two_ranks(world, block, 3)
    problems = []
    for seed in range(200 * block, 200 * (block + 1)):
        model, shape, batch, weights = random_config(10_000 + seed, world.size)
        problems += split_check(world, model, shape, batch, weights, seed, f"seed {seed} {shape} w={weights}")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("block", range(2))
def test_random_graphs_match_unsplit(world, split_check, agree, block):
    """300 random DAGs: residual add/mul, channel cat/chunk/shuffle, squeeze-excitation, ceil-mode and depthwise
    convs, global-pool or flatten heads, batch 1-3, uneven weights."""
    only_at_two_ranks(world, block, 2)
    problems = []
    for seed in range(150 * block, 150 * (block + 1)):
        model, shape, batch, weights = random_graph(20_000 + seed, world.size)
        problems += split_check(world, model, shape, batch, weights, seed, f"graph {seed} {shape} w={weights}",
                                tol=1e-5, relative=True)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", ["edge1", "edge2", "edge3", "cloud"])
@pytest.mark.parametrize("size", [32, 224])
def test_paper_nets_match_unsplit(world, split_check, agree, net, size):
    torch.manual_seed(size)
    model = randomize_batchnorm(build_net(net, 3, size, 10), torch.Generator().manual_seed(1)).eval()
    model = model.to(memory_format=torch.channels_last)
    problems = []
    cases = (([1.0] * world.size, 1), ([1.0 + r for r in range(world.size)], 2))
    for weights, batch in cases[1:] if world.size >= 4 and size >= 224 else cases:  # CI's 2 cores: 4+ ranks at
        problems += split_check(world, model, (3, size, size), batch, weights, size, f"{net}@{size} w={weights}")
    agree(world, problems)  # 224 run the uneven case only (the even one runs at 2 and 3 ranks)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", TV_NETS)
def test_torchvision_nets_match_unsplit(world, split_check, agree, tv, net):
    """Real CNNs as torchvision ships them (no rewriting), 224x224, batch 1 even and batch 2 uneven."""
    model = tv(net)
    problems = []
    for weights, batch in (([1.0] * world.size, 1), ([1.0 + r for r in range(world.size)], 2)):
        problems += split_check(world, model, (3, 224, 224), batch, weights, 5, f"{net} w={weights}",
                                tol=1e-4, relative=True)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_grayscale_edge_net_matches_unsplit(world, split_check, agree):
    model = randomize_batchnorm(build_net("edge2", 1, 28, 10)).eval()
    agree(world, split_check(world, model, (1, 28, 28), 3, [2.0] + [1.0] * (world.size - 1), 7, "edge2 fmnist"))


@pytest.mark.mpi(min_size=3)
def test_rank_with_empty_slice_at_deep_layer(world, split_check, agree):
    """Cloud net at 16x16: after four pools 1 row is left, so all but one rank own nothing."""
    model = randomize_batchnorm(build_net("cloud", 3, 16, 10)).eval()
    agree(world, split_check(world, model, (3, 16, 16), 2, [1.0] * world.size, 3, "cloud@16"))


@pytest.mark.mpi(min_size=2)
def test_non_root_ranks_hold_no_head(world, agree, same_output):
    """distribute_model: the root holds the whole net, the others only the split part (head on meta)."""
    def build():
        torch.manual_seed(3)
        return randomize_batchnorm(build_net("edge1", 3, 64, 10), torch.Generator().manual_seed(4))

    executor = distribute_model(build, (3, 64, 64), world)
    held = list(executor.model.named_parameters()) + list(executor.model.named_buffers())
    head = [p for name, p in held if name.startswith("fc")]
    conv = [p for name, p in held if name.startswith("conv")]
    problems = []
    if world.rank == 0 and any(p.is_meta for p in head + conv):
        problems.append("root is missing weights")
    if world.rank != 0 and (not all(p.is_meta for p in head) or any(p.is_meta for p in conv)):
        problems.append(f"rank {world.rank}: head materialised or split part missing")
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    got = executor(image if world.rank == 0 else None)
    if world.rank == 0:
        with torch.no_grad():
            problems += same_output(got, build().eval()(image), 1e-5, "distributed edge1")
    agree(world, problems)


class _LaggingClock:
    """Sleeps after some instructions (random, seeded), so its rank falls behind inside a pass."""

    def __init__(self, seed: int) -> None:
        import random

        self.random = random.Random(seed)

    def now(self) -> float:
        return 0.0

    def __getattr__(self, name):  # spent, waited, sent, split_done: nothing
        return lambda *args: None

    def step(self, index: int, since: float) -> None:
        import time

        if self.random.random() < 0.3:
            time.sleep(self.random.uniform(0.0, 0.003))


def _strided_gap_net() -> torch.nn.Module:
    """A 3x3 conv, then a stride-2 dilation-2 conv: at height 16 with weights [1, 2] rank 0 sends rank 1 two
    same-sized bands of one value (rows 2-3 and 4-5; the read skips a gap), under one tag."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=2)).eval()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("net", ["edge1", "strided-gap"])
def test_passes_run_back_to_back_with_one_rank_lagging_match_unsplit(world, agree, net):
    """The split part run pass after pass with no fence between passes (as a pipeline stage runs it), the last
    rank lagging inside every pass: the others finish a pass and post the next one's halos -- the same tags, the
    same prepared requests -- while it still receives the last one's.  Batch sizes change (new buffers, new
    requests).  Every pass's own rows on every rank equal plain torch's."""
    if net == "edge1":
        torch.manual_seed(2)  # every rank the same weights
        model, shape = randomize_batchnorm(build_net("edge1", 3, 32, 10), torch.Generator().manual_seed(2)), (3, 32, 32)
        model = model.eval()
        weights = [1.0 + r for r in range(world.size)]
    else:
        model, shape, weights = _strided_gap_net(), (3, 16, 16), [1.0, 2.0] + [1.0] * (world.size - 2)
    executor = SplitExecutor.build(model, shape, world, weights=weights)
    (value,) = [ins.value for ins in executor.program.head if type(ins).__name__ == "Gather"]
    own = executor.plan.values[value].owned[world.rank]
    rows = executor.plan.input_rows[world.rank]
    fx = torch.fx.symbolic_trace(model)
    lag = _LaggingClock(world.rank) if world.rank == world.size - 1 else None
    kept = []
    for k, batch in enumerate((1, 1, 2, 2, 2, 3, 1, 1, 3, 2, 1, 1)):
        image = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(k))
        env = executor.forward_local(image[:, :, rows.start: rows.stop].contiguous(), **({"clock": lag} if lag else {}))
        kept.append((k, image, env[value].clone()))  # before the next pass reuses the buffers
    problems = []
    with torch.no_grad():
        for k, image, got in kept:
            want = _value_of(fx, value, image)[:, :, own.start: own.stop]
            err = float((got - want).abs().max()) if got.numel() else 0.0
            if got.shape != want.shape or err > 1e-5:
                problems.append(f"rank {world.rank} pass {k}: shape {tuple(got.shape)} vs {tuple(want.shape)}, "
                                f"max error {err:.3g}")
    agree(world, problems)


def _value_of(fx, name: str, image: torch.Tensor) -> torch.Tensor:
    """Plain torch's value of graph node ``name`` (fx's interpreter, no executor code)."""
    found = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == name:
                found["value"] = out
            return out

    Record(fx).run(image)
    return found["value"]


@pytest.mark.mpi(min_size=2)
def test_non_image_input_fails_on_every_rank(world):
    executor = SplitExecutor.build(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32), world)
    bad = torch.zeros(3, 32, 32) if world.rank == 0 else None
    with pytest.raises(UsageError, match=r"shape \(N, C, H, W\), got shape \(3, 32, 32\)"):
        executor(bad)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("width", [31, 33])
def test_wrong_width_fails_on_every_rank(world, width):
    """Old code: a narrower image made Scatterv read past the buffer, a wider one a wrong-shaped answer."""
    executor = SplitExecutor.build(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32), world)
    bad = torch.zeros(1, 3, 32, width) if world.rank == 0 else None
    with pytest.raises(UsageError, match=f"input images are 3x32x{width} .* the plan is for 3x32x32"):
        executor(bad)


@pytest.mark.mpi(min_size=2)
def test_wrong_weight_count_fails_on_every_rank(world):
    with pytest.raises(UsageError, match=f"got 1 rank weights for {world.size} ranks"):
        SplitExecutor.build(build_net("edge1", 3, 32, 10).eval(), (3, 32, 32), world, weights=[1.0])


@pytest.mark.mpi(min_size=2)
def test_unsupported_model_fails_on_every_rank(world):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.Upsample(scale_factor=2)).eval()
    with pytest.raises(UsageError, match=r"node '_1' \(Upsample\) .* mixes rows"):
        SplitExecutor.build(model, (3, 16, 16), world)


@pytest.mark.mpi(min_size=2)
def test_inference_outside_no_grad(world, agree, same_output):
    """Old code: RuntimeError 'Can't call numpy() on Tensor that requires grad' in default grad mode."""
    torch.manual_seed(0)  # the same weights on every rank
    model = randomize_batchnorm(build_net("edge2", 3, 32, 10), torch.Generator().manual_seed(1)).eval()
    executor = SplitExecutor.build(model, (3, 32, 32), world)
    image = torch.randn(1, 3, 32, 32)
    got = executor(image if world.rank == 0 else None)
    problems = []
    if world.rank == 0:
        with torch.no_grad():
            problems = same_output(got, model(image), 1e-5, "grad mode")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_rank_with_another_plan_is_named_on_every_rank(world):
    """Rank 1 planned other rows (a topology that differs on one board): every rank refuses, naming it,
    before any image (the digest of runtime/deployment.py), instead of a hang or wrong rows."""
    from runtime.graph import trace_model
    from runtime.plan import plan_split
    from runtime.transport import AgreedError

    model = build_net("edge3", 3, 32, 10).eval()
    weights = [1.0] * world.size if world.rank != 1 else [1.0] + [2.0] * (world.size - 1)
    plan = plan_split(trace_model(model, (3, 32, 32)), weights)
    with pytest.raises(AgreedError, match=r"^rank 1\b.*another split plan than rank 0"):
        SplitExecutor(plan, model, world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("width", [8, 4096])
def test_inplace_writes_on_read_or_sent_maps_equal_eager(world, agree, width):
    """An in-place op on a map whose halo rows are sent (wrong rows before: max error 0.41 at width 8), also
    with rows large enough for a rendezvous send still in flight when the write comes (width 4096)."""
    from tests.test_inplace import InplaceAfterConv, InplaceBeforeConv, MethodAndOperator

    problems = []
    for model_type in (InplaceBeforeConv, InplaceAfterConv, MethodAndOperator):
        torch.manual_seed(1)
        model = model_type().eval()
        x = torch.randn(2, 3, 16, width, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = model(x.clone())
        out = SplitExecutor.build(model, (3, 16, width), world)(x if world.rank == 0 else None, batch=2)
        if world.rank == 0 and (out - want).abs().max().item() > 1e-5:
            problems.append(f"{model_type.__name__} width {width}: {(out - want).abs().max().item():.3g}")
    agree(world, problems)
