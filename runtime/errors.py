"""The one exception type for bad input: a message that names the problem and the fix."""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input (shape, layer, checkpoint, rank count) detected before any exchange.

    Raised identically on every rank (validation is deterministic), so the CLI
    prints it once on rank 0 and every rank exits with status 2: no hang, no
    ``MPI_Abort`` noise.  Anything else raised on one rank aborts the whole job.
    """
