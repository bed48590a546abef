"""The ``aflkd`` console script: Ctrl-C at any moment of start-up is one line, never a traceback.

The script imports this module first (a few standard modules), then the CLI inside a guard; torch and
MPI load later still, inside :func:`launch.cli.main`, which answers Ctrl-C with ``aflkd: interrupted``.
"""
import sys


def run() -> int:
    try:
        from launch.cli import main
    except KeyboardInterrupt:
        print("aflkd: interrupted", file=sys.stderr, flush=True)
        return 130
    return main()
