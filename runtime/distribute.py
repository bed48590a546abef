"""Build a model for split inference so that each rank holds only the weights it runs.

Every rank builds the model on the meta device -- its structure, at no memory
cost -- which is all tracing and planning need, and then receives real weights
for what it runs:

* ``head="gather"``: the whole model exists for real on the root only (it runs
  the head: for edge net 1 at 224x224 a 411 M-weight Linear, 1.6 GB); the
  others receive the split part's weights.
* ``head="split"``: every rank also receives its own columns of the head's
  first Linear (those of the rows it owns), the root the rest of the head.
  With ``checkpoint=PATH`` no rank ever holds the whole Linear: the root
  memory-maps the checkpoint (``torch.load(mmap=True)``, a plain state dict)
  and copies the columns out block of rows by block of rows (16 MB), mapping
  the file anew for each block so that the pages it read leave its memory,
  and sends each rank its part of every block.  Without a checkpoint the
  weights come from ``build()``/``load`` on the root, which then holds the
  whole Linear once, at set-up, and frees it after cutting the columns.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import transport as mpi
from .skeleton import empty_weights
from .transport import share_from_root
from .errors import UsageError
from .graph import trace_model
from .plan import check_weights, plan_split
from .split import SplitExecutor

_BLOCK_BYTES = 16 << 20  # rows of the Linear's weight copied (and mapped) at a time on the root
_COLUMNS_TAG = mpi.TAG_COLUMNS

__all__ = ["distribute_model", "load_checkpoint", "check_checkpoint"]


def _split_state(model: nn.Module, modules: set[str], attrs: set[str]) -> dict[str, torch.Tensor]:
    """The state entries of the split part: parameters and buffers of its modules and attributes."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] in modules or k in attrs}


def _empty_on_cpu(module: nn.Module) -> None:
    """``module.to_empty(device="cpu")`` for its meta tensors, without ``empty_like`` on meta (torch's Python
    reference, whose first call imports sympy: 35 MB on a rank that holds a few convs)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _materialise(model: nn.Module, modules: set[str], attrs: set[str], state: dict[str, torch.Tensor]) -> None:
    for target in modules:
        _empty_on_cpu(model.get_submodule(target))
    for target in attrs:
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(state[target], requires_grad=False)
        else:
            owner._buffers[attr] = state[target]
    # assign: keep the root's tensors as they come (channels-last weights stay channels-last)
    model.load_state_dict({k: v for k, v in state.items() if k not in attrs}, strict=False, assign=True)


def _mapped_state(path: str) -> dict:
    """The checkpoint's state dict memory-mapped: tensors read from the file only where touched."""
    from models.checkpoint import read_state  # here: models.checkpoint imports runtime (a cycle at import time)

    return read_state(path, mmap=True)


def check_checkpoint(model: nn.Module, path: str, hint: str = "") -> None:
    """Raise :class:`UsageError` unless the checkpoint at ``path`` fits ``model`` (real or meta); reads no weights."""
    _check_state(_mapped_state(path), model, path, hint)


def _check_state(state: dict, model: nn.Module, path: str, hint: str = "") -> None:
    from models.checkpoint import check_state

    check_state(model, state, path, hint)


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a plain state dict (or ``{"model": state}``) into ``model`` (real or meta), checked first."""
    state = _mapped_state(path)
    _check_state(state, model, path)
    meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    model.load_state_dict({k: v.clone() for k, v in state.items()} if meta else state, assign=meta)
    return model


def _send_columns(comm: mpi.Comm, plan, columns: torch.Tensor, rows_of: Optional[Callable], root: int) -> None:
    """Every rank's columns of the split Linear into ``columns``: the root reads blocks of rows, sends parts."""
    hs = plan.head_split
    rank, size = comm.Get_rank(), comm.Get_size()
    per_block = max(1, _BLOCK_BYTES // (4 * hs.in_features))
    plane = hs.height * hs.width
    for lo in range(0, hs.out_features, per_block):
        hi = min(hs.out_features, lo + per_block)
        if rank != root:
            if hs.columns(rank):
                mpi.sendrecv(comm, None, None, columns[lo:hi], root, _COLUMNS_TAG)
            continue

        def cut(block: torch.Tensor) -> None:
            maps = block.reshape(hi - lo, hs.channels, plane)
            for r in range(size):
                own = hs.owned[r]
                if not len(own):
                    continue
                part = maps[:, :, own.start * hs.width: own.stop * hs.width]
                if r == root:
                    columns[lo:hi].view(hi - lo, hs.channels, -1).copy_(part)
                else:
                    mpi.sendrecv(comm, part, r, None, None, _COLUMNS_TAG)  # strided: no copy
        rows_of(lo, hi, cut)


def distribute_model(
    build: Callable[[], nn.Module],
    in_shape: tuple[int, int, int],
    comm: mpi.Comm = mpi.COMM_WORLD,
    weights: Optional[Sequence[float]] = None,
    *,
    load: Optional[Callable[[nn.Module], None]] = None,
    root: int = 0,
    head: str = "gather",
    checkpoint: Optional[str] = None,
) -> SplitExecutor:
    """Trace, plan and build a :class:`SplitExecutor` for ``build()``, every rank holding only what it runs.

    ``build`` makes the model (the same structure on every call, weights
    seeded or not): every rank calls it on the meta device.  Weights come
    from ``checkpoint`` (a plain state dict saved by ``torch.save``) if given,
    else the root calls ``build()`` for real and then ``load(model)``.  The
    root broadcasts the weights of the split part (once, at set-up).
    ``head``: ``"gather"`` (the head never leaves the root), ``"split"`` (each
    rank gets its columns of the first Linear; see the module docstring) or
    ``"auto"`` (measured, :func:`runtime.headcost.choose_head`).  A
    :class:`UsageError` from ``build``, ``load`` or the checkpoint on the root
    is raised on every rank.
    """
    if checkpoint is not None and load is not None:
        raise UsageError("give either checkpoint= or load=, not both")
    with empty_weights():
        skeleton = build()
    skeleton.eval()
    graph = trace_model(skeleton, in_shape)
    weights = check_weights(weights, comm.Get_size())
    if head == "auto":
        from .headcost import choose_head

        plan = choose_head(graph, weights, comm, root=root)
    else:
        plan = plan_split(graph, weights, head=head)
    if checkpoint is not None:
        load = lambda model: load_checkpoint(model, checkpoint)  # noqa: E731
    if plan.head == "split":
        return _distribute_split(build, skeleton, plan, comm, load, checkpoint, root)
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


def _distribute_split(build, skeleton: nn.Module, plan, comm: mpi.Comm, load, checkpoint: Optional[str],
                      root: int) -> SplitExecutor:
    """``head="split"``: the split part everywhere, the rest of the head on the root, Linear columns everywhere."""
    graph, hs = plan.graph, plan.head_split
    key = hs.target + ".weight"
    targets = graph.module_targets(("rows", "all"))
    kinds = {f.target: f.op for f in graph.fx.nodes if f.op in ("call_module", "get_attr")}
    modules = {t for t in targets if kinds[t] == "call_module"}
    attrs = {t for t in targets if kinds[t] == "get_attr"}
    held: dict = {}

    def make_on_root():
        if checkpoint is not None:  # nothing of the Linear's weight is read here
            state = _mapped_state(checkpoint)
            _check_state(state, skeleton, checkpoint)
            skeleton.load_state_dict({k: v.clone() for k, v in state.items() if k != key}, strict=False, assign=True)
            del state
            held["model"] = skeleton

            def rows_of(lo, hi, use):
                mapped = _mapped_state(checkpoint)  # mapped anew per block: unmapping drops the pages read
                use(mapped[key][lo:hi])
                del mapped
        else:
            model = build()
            if load is not None:
                load(model)
            model.eval()
            held["model"] = model
            weight = model.get_submodule(hs.target).weight.detach()

            def rows_of(lo, hi, use):
                use(weight[lo:hi])
        held["rows_of"] = rows_of
        return _split_state(held["model"], modules, attrs)

    state = share_from_root(comm, make_on_root, root, UsageError)
    rank = comm.Get_rank()
    if rank == root:
        model = held["model"]
    else:
        model = skeleton
        _materialise(model, modules, attrs, state)
    columns = torch.empty(hs.out_features, hs.columns(rank))
    _send_columns(comm, plan, columns, held.get("rows_of"), root)
    held.clear()
    if rank == root:  # the whole weight (build path) goes; only the columns stay
        linear = model.get_submodule(hs.target)
        linear.weight = nn.Parameter(torch.empty(linear.weight.shape, device="meta"), requires_grad=False)
    return SplitExecutor(plan, model, comm, root, head_columns=columns)
