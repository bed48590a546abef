"""MPI execution of CNNs split by feature-map height (AFLKD Sec. 5, Alg. 3), for any traced CNN graph.

Three steps, each usable on its own::

    graph = trace_model(model, (3, 224, 224))     # the model as data (torch.fx), on every rank
    plan = plan_split(graph, weights)             # who owns which rows, which rows move
    executor = SplitExecutor(plan, model, comm)   # follows the plan

:func:`distribute_model` does all three with each rank holding only the
weights it runs (the head stays on the root).
"""
from importlib import import_module

from .errors import UsageError

_WHERE = {"ModelGraph": "graph", "trace_model": "graph", "GraphPlan": "plan", "plan_split": "plan",
          "SplitExecutor": "split", "distribute_model": "distribute"}

__all__ = ["UsageError", *_WHERE]


def __getattr__(name: str):
    """The names above, imported on first use: ``runtime.errors`` (which every command imports) must not cost
    torch and MPI (``aflkd --help`` and a refused option answer in a fraction of a second)."""
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
