"""MPI execution of CNNs split by feature-map height (AFLKD Sec. 5, Alg. 3)."""
from .errors import UsageError
from .plan import SplitPlan, build_plan
from .split import SplitExecutor

__all__ = ["UsageError", "SplitPlan", "build_plan", "SplitExecutor"]
