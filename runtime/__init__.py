"""MPI execution of CNNs split by feature-map height (AFLKD Sec. 5, Alg. 3), for any traced CNN graph.

Three steps, each usable on its own::

    graph = trace_model(model, (3, 224, 224))     # the model as data (torch.fx), on every rank
    plan = plan_split(graph, weights)             # who owns which rows, which rows move
    executor = SplitExecutor(plan, model, comm)   # follows the plan

:func:`distribute_model` does all three with each rank holding only the
weights it runs (the head stays on the root).
"""
from .distribute import distribute_model
from .errors import UsageError
from .graph import ModelGraph, trace_model
from .plan import GraphPlan, plan_split
from .split import SplitExecutor

__all__ = ["UsageError", "ModelGraph", "trace_model", "GraphPlan", "plan_split", "SplitExecutor", "distribute_model"]
