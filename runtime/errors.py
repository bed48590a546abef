"""The one exception type for bad input: a message that names the problem and the fix."""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input (shape, layer, checkpoint, rank count) detected before any exchange.

    Validation of options is deterministic, so such errors are raised on every
    rank and the CLI prints them once on rank 0.  A problem only one board can
    have (a file missing or unwritable there) is either agreed first
    (:func:`runtime.transport.agree`: every rank raises the same
    ``AgreedError``) or, found alone, printed by that rank, which leaves the job
    without finalizing so the launcher ends the others: one line, status 2, no
    rank left waiting.
    """
