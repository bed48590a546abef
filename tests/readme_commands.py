"""Run the README's shell commands in order, as a new user would, and report each one's exit status.

    .venv/bin/python tests/readme_commands.py --list            # what would run, numbered
    .venv/bin/python tests/readme_commands.py --json out/readme-run.json [--from K] [--timeout S]

Each fenced ``bash`` block of README.md is read in order; continuation lines are joined and comments
dropped.  Skipped, with the reason printed: the install line and ``aflkd test`` (what ``.ci/run`` itself
runs), blocks marked ``# ON EACH BOARD`` / ``# ON RANK 0's BOARD`` / ``# NEEDS ROOT`` (boards, ssh, network
namespaces), and ``apt-get``.  Every other command runs with ``bash -c`` in the current folder (run it from a
fresh clone with ``../shared`` beside it and the README's install done), one after the other, so a command
reading what an earlier one wrote finds it.  Exit status 0 when every command that ran exited 0 (or, where
the README shows it refused, exited non-zero with one ``aflkd: error:`` line).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SKIP_BLOCK_MARKS = ("# ON EACH BOARD", "# ON RANK 0's BOARD", "# NEEDS ROOT")


def commands(text: str) -> list[tuple[str, str | None, bool]]:
    """(command, why it is skipped or None, whether it must fail) for every command of every bash block, in
    order.  A command followed by a ``# aflkd: error: ...`` comment is one the README shows refused: it must
    exit non-zero with an ``aflkd: error:`` line."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
        marked = next((m for m in SKIP_BLOCK_MARKS for line in lines if line.startswith(m)), None)
        for i, command in enumerate(lines):
            if command.startswith("#"):
                continue
            why = None
            inline = next((m for m in SKIP_BLOCK_MARKS if m in command), None)
            if marked or inline:
                why = f"marked '{marked or inline}'"
            elif command.startswith("python3 -m venv"):
                why = "the install (.ci/run does it)"
            elif re.search(r"aflkd test\b", command):
                why = "the test suite (.ci/run runs it)"
            fails = i + 1 < len(lines) and lines[i + 1].startswith("# aflkd: error:")
            out.append((command, why, fails))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the numbered commands and what is skipped, run none")
    p.add_argument("--from", dest="start", type=int, default=1, help="start at command K (1-based)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one command may take")
    p.add_argument("--json", default=None, help="write every command's status and seconds here")
    args = p.parse_args(argv)
    todo = commands(README.read_text())
    results, failed = [], 0
    for k, (command, why, fails) in enumerate(todo, 1):
        if args.list:
            print(f"{k:3d} {'SKIP (' + why + ') ' if why else ''}{'MUST FAIL ' if fails else ''}{command}")
            continue
        if k < args.start or why:
            continue
        started = time.monotonic()
        try:
            proc = subprocess.run(["bash", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, timeout=args.timeout)
            rc, errors = proc.returncode, [x for x in proc.stderr.splitlines() if x.startswith("aflkd: error:")]
            note = errors[0] if errors else proc.stderr.strip()[-300:]
        except subprocess.TimeoutExpired:
            rc, errors, note = 124, [], f"timed out after {args.timeout:g} s"
        seconds = time.monotonic() - started
        ok = (rc != 0 and bool(errors) and rc != 124) if fails else rc == 0
        failed += not ok
        print(f"{k:3d} {'ok  ' if ok else 'FAIL'} exit {rc:3d} {seconds:7.1f} s  {command}"
              + ("" if ok and not fails else f"\n      {note}"), flush=True)
        results.append({"k": k, "command": command, "exit": rc, "must_fail": fails, "ok": ok,
                        "seconds": round(seconds, 1), "note": note})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"results": results, "failed": failed}, indent=1))
    if not args.list:
        print(f"{len(results)} command(s) ran, {failed} did not do what the README says")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
