"""Shared fixtures and checks.  MPI tests are marked ``@pytest.mark.mpi`` (pytest-mpi) and run under
``mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi``; plain ``pytest`` skips them."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

#: torchvision classification models the split must reproduce, as they come (eval, random weights).
TV_NETS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "alexnet")


def tv_model(name: str, classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A torchvision classifier with seeded random weights and randomised BatchNorm statistics, in eval mode."""
    import torchvision

    from models import randomize_batchnorm

    kwargs = dict(aux_logits=False, init_weights=True) if name == "googlenet" else {}
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs)
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1)).eval()


def brute_force_min_bytes(graph, weights, batch: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes that must cross ranks per pass, by the first window node reading each value.

    Independent of the planner: for every output row a rank owns, enumerate the
    input rows its window taps touch (row * stride - padding + dilation * tap),
    keep those inside the image, and count the ones the rank does not own.
    """
    from runtime.geometry import split_rows

    out: dict[str, int] = {}
    for value in graph.nodes:
        windows = [c for c in graph.consumers(value.name) if c.role == "window"]
        if value.placement != "rows" or not windows:
            continue
        _, channels, height, width = value.shape
        owned = [set(range(r.start, r.stop)) for r in split_rows(height, weights)]
        missing = 0
        for r in range(len(weights)):
            need = set()
            for c in windows:
                h = c.window.height
                out_rows = split_rows(c.shape[2], weights)[r]
                for o in range(out_rows.start, out_rows.stop):
                    for tap in range(h.kernel):
                        row = o * h.stride - h.padding + h.dilation * tap
                        if 0 <= row < height:
                            need.add(row)
            missing += len(need - owned[r])
        if missing:
            out[windows[0].name] = out.get(windows[0].name, 0) + missing * channels * width * batch * itemsize
    return out


def compare_outputs(got, want, tol: float, label: str, relative: bool = False) -> list[str]:
    """Problems (empty: none) comparing split and unsplit outputs: max abs error, or relative to max |output|.

    A max-pool window wholly in padding gives -inf (and a Linear after it NaN) in
    the unsplit model too: identical non-finite values count as exact.
    """
    if got is None or got.shape != want.shape:
        return [f"{label}: shape {None if got is None else tuple(got.shape)} != {tuple(want.shape)}"]
    same = (got == want) | (got.isnan() & want.isnan())
    finite = want[want.isfinite()]
    scale = float(finite.abs().max()) if relative and finite.numel() else 1.0
    err = float(torch.where(same, 0.0, (got - want).abs()).max()) / max(scale, 1e-30)
    what = "relative to max |output|" if relative else "absolute"
    return [] if err <= tol else [f"{label}: max error {err:.3g} ({what}) > {tol}"]


def run_and_check(comm, model, shape, batch, weights, seed, label, tol=1e-5, relative=False) -> list[str]:
    """Split-run ``model`` on a seeded batch; compare output and bytes per node with independent answers."""
    from runtime import SplitExecutor
    from runtime.timing import NodeClock

    image = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    executor = SplitExecutor.build(model, shape, comm, weights)
    clock = NodeClock(len(executor.graph.nodes))
    got = executor(image if comm.rank == 0 else None, batch, clock)
    problems = []
    sent = comm.allreduce(clock.bytes)
    want_bytes = brute_force_min_bytes(executor.graph, executor.plan.weights, batch)
    for node, moved in zip(executor.graph.nodes, sent):
        if moved != want_bytes.get(node.name, 0):
            problems.append(f"{label}: node {node.name} sent {moved} bytes, minimum {want_bytes.get(node.name, 0)}")
    if comm.rank == 0:
        with torch.no_grad():
            want = model(image)
        problems += compare_outputs(got, want, tol, label, relative)
    return problems


def all_agree(comm, problems: list[str]) -> None:
    """Fail on every rank if any rank found a problem (no rank is left in the next collective)."""
    everyone = [p for rank_problems in comm.allgather(problems) for p in rank_problems]
    assert not everyone, "\n".join(everyone[:20])


@pytest.fixture
def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


@pytest.fixture
def split_check():
    """``split_check(comm, model, (C, H, W), batch, weights, seed, label, tol=, relative=) -> problems``."""
    return run_and_check


@pytest.fixture
def agree():
    return all_agree


@pytest.fixture
def tv():
    return tv_model


@pytest.fixture
def min_bytes():
    return brute_force_min_bytes


@pytest.fixture
def same_output():
    return compare_outputs
