"""The core-allocation policies an edge rank can run under (``--control``), without importing torch: the CLI
offers them as choices before anything heavy is loaded (scheduling/controller.py implements them)."""
from __future__ import annotations

from typing import Optional

from runtime.errors import UsageError

__all__ = ["POLICIES", "parse_policy"]

POLICIES = ("planner", "priority", "none")


def parse_policy(policy: str) -> Optional[int]:
    """Check a ``--control`` policy: one of :data:`POLICIES` (None) or ``static:C`` (C, its communication cores)."""
    if policy in POLICIES:
        return None
    kind, _, value = policy.partition(":")
    if kind == "static" and value.isdigit() and int(value) >= 1:
        return int(value)
    raise UsageError(f"--control {policy!r}: choose from {', '.join(POLICIES)}, or static:C (C cores for "
                     "communication in every phase)")
