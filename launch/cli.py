"""``aflkd``: the command line of aflkd-runtime.  This module only wires the command groups.

Each group lives in its own module (``bench``, ``train``, ``experiment``,
``testsuite``) and registers its subcommands with ``set_defaults(func=...)``;
shared defaults and checks live in :mod:`launch.options`.  Run MPI commands
under ``mpiexec -n P aflkd ...``; every rank parses the same arguments, rank 0
prints.  Bad input prints one ``aflkd: error: ...`` line and every rank exits
with status 2; Ctrl-C prints ``aflkd: interrupted`` and exits with 130; an
unexpected exception on any rank of an MPI command aborts the whole job (no
rank waits forever for a dead peer).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from runtime.errors import UsageError

from . import bench, control, experiment, launcher, options, pipeline, planning, rankcheck, schedule, system, testsuite, train, update

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd bench layers --net edge3 --size 224 --repeat 20
  .venv/bin/mpiexec -n 3 .venv/bin/aflkd bench layers --net edge3 --weights 2,1,1 --json out/bench.json --plot out/fig10.png
  .venv/bin/aflkd train edge --dataset cifar10 --net 3 --size 500 --steps 200    # an AFLKD student
  .venv/bin/aflkd bench train-step --threads 2    # teacher training images/s before a long run
  .venv/bin/aflkd test                    # serial tests, then MPI tests at 2, 3 and 4 ranks
"""


def build_parser() -> argparse.ArgumentParser:
    parser = options.Parser(
        prog="aflkd",
        description="aflkd-runtime: split inference over MPI and AFLKD edge distillation.",
        epilog=EXAMPLES,
        formatter_class=options.ExamplesFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=options.Parser)
    for group in (bench, train, experiment, testsuite, pipeline, planning, launcher, rankcheck, update, schedule, system,
                  control):
        group.add_parser(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # recorded beside results as the command that made them
        args.command_line = "aflkd " + shlex.join(sys.argv[1:] if argv is None else argv)
        options.apply_threads(args)
        return args.func(args)
    except UsageError as err:
        if options.rank() == 0:
            print(f"aflkd: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if options.rank() == 0:
            print("aflkd: interrupted", file=sys.stderr, flush=True)
        _leave_mpi_job(130)
        return 130


def _leave_mpi_job(code: int) -> None:
    """Exit now, without MPI_Finalize, if this process is one rank of several.

    A peer may be blocked in an exchange with this rank, where it never sees its
    own Ctrl-C; finalizing would wait for it forever.  Leaving at once lets
    mpiexec end the others.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() == 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
