"""Run pytest on one MPI rank with its output and JUnit XML in ``<folder>/rank<r>.*``.

Usage (what ``aflkd test`` runs): ``mpiexec -n P python -m mpi4py -m launch.rank_pytest FOLDER PYTEST_ARGS...``
"""
from __future__ import annotations

import os
import sys

from mpi4py import MPI


def main() -> int:
    folder, args = sys.argv[1], sys.argv[2:]
    rank = MPI.COMM_WORLD.Get_rank()
    log = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    import pytest

    return int(pytest.main([*args, f"--junitxml={os.path.join(folder, f'rank{rank}.xml')}"]))


if __name__ == "__main__":
    sys.exit(main())
