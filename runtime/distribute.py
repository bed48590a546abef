"""Build a model for split inference so that each rank holds only the weights it runs.

The whole model exists for real on the root only (it runs the head: for edge
net 1 at 224x224 a 411 M-weight Linear, 1.6 GB).  Every other rank builds the
model on the meta device -- its structure, at no memory cost -- which is all
tracing and planning need, and then receives real weights for the split part
alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from mpi4py import MPI

from .comm import share_from_root
from .errors import UsageError
from .graph import trace_model
from .plan import check_weights, plan_split
from .split import SplitExecutor

__all__ = ["distribute_model"]


def _split_state(model: nn.Module, modules: set[str], attrs: set[str]) -> dict[str, torch.Tensor]:
    """The state entries of the split part: parameters and buffers of its modules and attributes."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] in modules or k in attrs}


def _materialise(model: nn.Module, modules: set[str], attrs: set[str], state: dict[str, torch.Tensor]) -> None:
    for target in modules:
        model.get_submodule(target).to_empty(device="cpu")
    for target in attrs:
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(state[target], requires_grad=False)
        else:
            owner._buffers[attr] = state[target]
    # assign: keep the root's tensors as they come (channels-last weights stay channels-last)
    model.load_state_dict({k: v for k, v in state.items() if k not in attrs}, strict=False, assign=True)


def distribute_model(
    build: Callable[[], nn.Module],
    in_shape: tuple[int, int, int],
    comm: MPI.Comm = MPI.COMM_WORLD,
    weights: Optional[Sequence[float]] = None,
    *,
    load: Optional[Callable[[nn.Module], None]] = None,
    root: int = 0,
) -> SplitExecutor:
    """Trace, plan and build a :class:`SplitExecutor` for ``build()``, every rank holding only what it runs.

    ``build`` makes the model (the same structure on every call, weights
    seeded or not): every rank calls it on the meta device, the root once
    more for real and then ``load(model)`` (e.g. a checkpoint).  The root
    broadcasts the weights of the split part (once, at set-up); the head's
    never leave it.  A :class:`UsageError` from ``build`` or ``load`` on the
    root is raised on every rank.
    """
    with torch.device("meta"):
        skeleton = build()
    skeleton.eval()
    graph = trace_model(skeleton, in_shape)
    plan = plan_split(graph, check_weights(weights, comm.Get_size()))
    targets = graph.module_targets(("rows", "all"))
    kinds = {f.target: f.op for f in graph.fx.nodes if f.op in ("call_module", "get_attr")}
    modules = {t for t in targets if kinds[t] == "call_module"}
    attrs = {t for t in targets if kinds[t] == "get_attr"}
    real: list[nn.Module] = []

    def make_on_root():
        model = build()
        if load is not None:
            load(model)
        real.append(model.eval())
        return _split_state(model, modules, attrs)

    state = share_from_root(comm, make_on_root, root, UsageError)
    if comm.Get_rank() == root:
        model = real[0]
    else:
        model = skeleton
        _materialise(model, modules, attrs, state)
    return SplitExecutor(plan, model, comm, root)
