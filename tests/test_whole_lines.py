"""Two processes printing to one pipe (as mpiexec merges ranks) never glue lines, even with PYTHONUNBUFFERED=1."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRITER = ("import sys\n{setup}\n"
          "for i in range(4000):\n    print(f'rank {{sys.argv[1]}} line {{i}} ' + 'x' * 40, file=sys.stderr, flush=True)\n")


def merged_lines(setup: str) -> list[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(setup=setup), str(r)], stderr=write, env=env)
             for r in (0, 1)]
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read().decode()
    for p in procs:
        p.wait(timeout=60)
    return data.splitlines()


def test_every_line_arrives_whole():
    """Without :func:`launch.options.whole_lines` about one line in six came out glued to another here."""
    lines = merged_lines("from launch.options import whole_lines; whole_lines()")
    pattern = re.compile(r"^rank [01] line \d+ x{40}$")
    broken = [line for line in lines if not pattern.match(line)]
    assert len(lines) == 8000 and not broken, broken[:5]
