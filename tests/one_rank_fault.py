"""Run ``aflkd ARGS`` with a fault on rank 1 only (the tests of 'a fault on one rank is every rank's fault').

Usage: ``mpiexec -n P python tests/one_rank_fault.py MODE [VALUE] -- ARGS...``.  On rank 1 only, MODE:
``swap OLD NEW`` replaces the argument OLD by NEW (an unwritable --json, another topology, a missing
checkpoint); ``torch VERSION`` makes torch report another version; ``stop N`` / ``kill N`` sends this
rank SIGSTOP / SIGKILL when its pipeline stage starts its N-th image (mid-stream, whatever the machine's
speed); ``hide PATH`` makes PATH unreadable there (a file missing on one board).  The faulty rank is
1, or ``$FAULT_RANK``.  Every other rank runs ARGS as given.
"""
from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    split = sys.argv.index("--")
    mode, values, args = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if rank == int(os.environ.get("FAULT_RANK", "1")):
        if mode == "swap":
            old, new = values
            args = [new if a == old else a for a in args]
        elif mode == "torch":
            import torch

            torch.__version__ = values[0]
        elif mode in ("stop", "kill"):
            from runtime.pipeline import PipelineExecutor

            sig = signal.SIGSTOP if mode == "stop" else signal.SIGKILL
            at, run_stage, seen = int(values[0]), PipelineExecutor._run_stage, []

            def run_then_fault(self, x):
                seen.append(1)
                if len(seen) == at:
                    os.kill(os.getpid(), sig)
                return run_stage(self, x)

            PipelineExecutor._run_stage = run_then_fault
        elif mode == "hide":
            import builtins

            hidden, real_open = os.path.abspath(values[0]), builtins.open

            def open_unless_hidden(file, *a, **k):
                if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == hidden:
                    raise FileNotFoundError(2, "No such file or directory", str(file))
                return real_open(file, *a, **k)

            builtins.open = open_unless_hidden
            real_exists = os.path.exists
            os.path.exists = lambda p: False if os.path.abspath(p) == hidden else real_exists(p)
    sys.argv = ["aflkd", *args]
    from launch.cli import main as aflkd

    return aflkd(args)


if __name__ == "__main__":
    sys.exit(main())
