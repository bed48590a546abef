"""The core-allocation policies an edge rank can run under (``--control``), without importing torch: the CLI
offers them as choices before anything heavy is loaded (scheduling/controller.py implements them)."""

__all__ = ["POLICIES"]

POLICIES = ("planner", "priority", "none")
