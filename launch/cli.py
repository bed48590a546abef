"""``aflkd``: the command line of aflkd-runtime.  This module only wires the command groups.

Each group lives in its own module (``bench``, ``train``, ``experiment``,
``testsuite``) and registers its subcommands with ``set_defaults(func=...)``;
shared defaults and checks live in :mod:`launch.options`.  Run MPI commands
under ``mpiexec -n P aflkd ...``; every rank parses the same arguments, rank 0
prints.  Bad input prints one ``aflkd: error: ...`` line and every rank exits
with status 2, also when only one rank found it (a file missing on one board);
a peer that died or stalled past ``--deadline``, or a message of the wrong
size, is one line and status 3; Ctrl-C prints ``aflkd: interrupted`` and exits
with 130; an unexpected exception on any rank of an MPI command aborts the
whole job with its traceback (no rank waits forever for a dead peer).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from . import bench, chaos, control, experiment, launcher, options, pipeline, planning, rankcheck, schedule, serve, system, testsuite, train, update

__all__ = ["main", "build_parser"]

EXAMPLES = """\
examples:
  .venv/bin/mpiexec -n 2 .venv/bin/aflkd bench layers --net edge3 --size 224 --repeat 20
  .venv/bin/mpiexec -n 3 .venv/bin/aflkd bench layers --net edge3 --weights 2,1,1 --json out/bench.json --plot out/fig10.png
  .venv/bin/aflkd train edge --dataset cifar10 --net 3 --size 500 --steps 200    # an AFLKD student
  .venv/bin/aflkd bench train-step --threads 2    # teacher training images/s before a long run
  .venv/bin/aflkd test                    # serial tests, then MPI tests at 2, 3 and 4 ranks (and 8 for the wide ones)
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
                  serve, chaos, control):
        group.add_parser(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser


def _subcommand(parser: argparse.ArgumentParser, argv: list) -> argparse.ArgumentParser:
    """The innermost subcommand parser the words of ``argv`` select (``train edge`` -> its parser)."""
    for word in argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            if not word.startswith("-") and choices:
                break
            continue
        parser = choices[word]
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime.errors import UsageError

    options.whole_lines()
    from runtime.allocator import keep_freed_maps

    keep_freed_maps()  # every image reuses its maps' memory instead of faulting in fresh pages
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand that was given them, whose --help lists what it takes
            deepest = _subcommand(parser, list(sys.argv[1:] if argv is None else argv))
            deepest.error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "one_process", False) and options.job_size() > 1:
            raise UsageError(f"'{_subcommand(parser, list(sys.argv[1:] if argv is None else argv)).prog}' runs as "
                             f"one process: start it without mpiexec (this job has {options.job_size()} ranks)")
        # recorded beside results as the command that made them
        args.command_line = "aflkd " + shlex.join(sys.argv[1:] if argv is None else argv)
        args.root_parser = parser  # for commands that check a command line of their own (launch, plan)
        options.apply_threads(args)
        options.apply_deadline(args)
        return args.func(args)
    except UsageError as err:
        return _refuse(err, 2)
    except KeyboardInterrupt:
        if options.rank() == 0:
            print("aflkd: interrupted", file=sys.stderr, flush=True)
        _leave_mpi_job(130)
        return 130
    except Exception as err:  # noqa: BLE001 -- only the transport's faults; anything else is re-raised
        transport = sys.modules.get("runtime.transport")
        if transport is not None and isinstance(err, transport.TransportError):
            return _refuse(err, 3)
        raise


#: seconds a rank other than 0 waits before printing a fault that every rank may have hit at once:
#: rank 0 prints first and leaves, and the launcher ends the others before they add a second line
_NON_ROOT_DELAY_S = 1.0


def _refuse(err: Exception, code: int) -> int:
    """One line for the whole job, then a non-zero exit on every rank.

    An error every rank raised together (validation before MPI starts, or an
    :class:`~runtime.transport.AgreedError`) is printed by rank 0 and every rank
    exits normally.  Any other error in a running MPI job may be this rank's
    alone, with its peers waiting for it in an exchange: it prints the line
    (naming itself) and leaves without ``MPI_Finalize``, so the launcher ends
    every other rank at once (MPICH and Open MPI both do on an abnormal exit).
    """
    transport = sys.modules.get("runtime.transport")
    running = transport is not None and transport.is_running_job()
    agreed = transport is not None and isinstance(err, transport.AgreedError)
    if not running or agreed:
        if options.rank() == 0:
            print(f"aflkd: error: {err}", file=sys.stderr, flush=True)
        return code
    text = str(err)
    rank = options.rank()
    everyone = transport.fault_everywhere(text)
    if everyone is not None:  # every rank hit an error at once: one line from rank 0, a clean exit everywhere
        if rank == 0:
            print(f"aflkd: error: {everyone[0]}", file=sys.stderr, flush=True)
        return code
    if rank != 0:
        time.sleep(_NON_ROOT_DELAY_S)
    if isinstance(err, transport.TransportError) or text.startswith("rank "):
        print(f"aflkd: error: {text}", file=sys.stderr, flush=True)
    else:
        print(f"aflkd: error: {transport.me()}: {text}", file=sys.stderr, flush=True)
    _leave_mpi_job(code, grace_s=transport.ABORT_GRACE_S)
    return code


def _leave_mpi_job(code: int, grace_s: float = 0.0) -> None:
    """Exit now, without MPI_Finalize, if this process is one rank of several.

    A peer may be blocked in an exchange with this rank, where it never sees its
    own error or Ctrl-C; finalizing would wait for it forever.  Leaving at once
    lets mpiexec end the others.  ``grace_s`` lets the launcher forward the
    last line first.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() == 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(grace_s)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
