"""``aflkd chaos serve``: rehearse losing boards -- kill -9 ranks of a supervised ``aflkd serve`` at random moments.

Starts ``aflkd launch --topology T --restart N -- serve ...``, waits a random
number of newly logged images, kills one rank's process with SIGKILL (the
victims in turn, by MPI rank), measures the time from the kill to the first
image the relaunched job logs, and at the end checks the results log against
the source: every image id exactly once.  Prints the figures and writes them
as JSON.  One host only (it finds the rank processes in /proc).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser", "rank_pids_of", "logged_rows"]


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="rehearse faults on this host: kill -9 ranks of a supervised 'serve' and "
                       "check that no image is lost or served twice",
                       description=__doc__.split("\n\n")[1].replace("\n", " "),
                       epilog="example:\n  .venv/bin/aflkd chaos serve --kills 1,2,0 --images 300 --json "
                       "out/chaos.json\n", formatter_class=options.ExamplesFormatter)
    group = p.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser, required=True)
    s = group.add_parser("serve", help="kill ranks of 'aflkd launch --restart -- serve'",
                         formatter_class=options.ExamplesFormatter)
    s.add_argument("--topology", default=str(options.REPO / "hostfiles" / "local-3x1.toml"),
                   help="a topology whose hosts are all this host")
    s.add_argument("--kills", type=options.int_list, default="1,2,0", help="MPI ranks to kill, one after the other (0 is the root)")
    s.add_argument("--images", type=options.positive_int, default=300, help="images the stream serves")
    s.add_argument("--signal", choices=("KILL", "STOP"), default="KILL",
                   help="KILL: the rank dies (kill -9); STOP: it stalls (kill -STOP), and the others' --deadline "
                   "must end the job before the restart")
    s.add_argument("--gap", type=options.positive_int_list, default="5,20", help="between kills, wait a random number of new images in A,B")
    s.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    s.add_argument("--log", default=None, metavar="FILE", help="the serve results log (default: a fresh file in --workdir)")
    s.add_argument("--workdir", default="out/chaos", help="folder for the log and the JSON")
    s.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON (default: none)")
    s.add_argument("--timeout", type=options.positive_float, default=300.0, help="give up after this many s")
    s.add_argument("serve_args", nargs="*", metavar="-- SERVE OPTIONS",
                   help="options for serve after '--' (default: --net edge3 --size 64 --threads 1)")
    s.set_defaults(func=_chaos_serve, one_process=True)


def logged_rows(log: Path) -> list:
    """(image, top1, topk, run, served_at) of every logged result, by image id ([] while the log is new)."""
    try:
        with sqlite3.connect(str(log), timeout=5) as db:
            return db.execute("SELECT image, top1, topk, run, served_at FROM results ORDER BY image").fetchall()
    except sqlite3.OperationalError:
        return []


def rank_pids_of(launcher_pid: int) -> dict:
    """MPI rank -> pid of the rank processes under ``launcher_pid`` (their PMI_RANK, via /proc's parent links)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass

    def under(pid):
        while pid in parents and pid not in (0, 1):
            pid = parents[pid]
            if pid == launcher_pid:
                return True
        return False
    found = {}
    for pid in parents:
        if not under(pid):
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"PMI_RANK=")), None)
        if rank is not None and Path(f"/proc/{pid}/exe").exists():
            found[int(rank)] = pid
    return found


def check_chaos_topology(path: str, kills: list[int]) -> None:
    """Refuse, before the job starts, what the kills cannot do: a rank the job will not have, or a host other
    than this one (ranks are found and killed by their process ids here)."""
    from .healing import is_this_host
    from .topology import load_topology

    topology = load_topology(path)
    away = [h.name for h in topology.hosts if h.role != "cloud" and is_this_host(h.address) is not True]
    if away:
        raise UsageError(f"--topology {path}: chaos serve kills ranks by process id on this host, but "
                         f"{', '.join(away)} {'is' if len(away) == 1 else 'are'} not this host")
    beyond = [k for k in kills if not 0 <= k < topology.size]
    if beyond:
        raise UsageError(f"--kills: rank {beyond[0]} is not a rank of the {topology.size}-rank serve job of {path} "
                         f"(ranks 0-{topology.size - 1})")


def _chaos_serve(args) -> int:
    kills = args.kills
    if len(args.gap) != 2 or args.gap[0] > args.gap[1]:
        raise UsageError(f"--gap must be two numbers A,B with A <= B, got {','.join(map(str, args.gap))}")
    low, high = args.gap
    check_chaos_topology(args.topology, kills)
    workdir = options.prepare_folder(args.workdir, "--workdir")
    log = Path(args.log) if args.log else workdir / "chaos.db"
    if not args.log:
        for path in (log, Path(f"{log}-wal"), Path(f"{log}-shm")):
            path.unlink(missing_ok=True)
    options.prepare_output(args.json, "--json")
    serve = args.serve_args or ["--net", "edge3", "--size", "64", "--threads", "1"]
    cmd = [str(Path(sys.executable).parent / "aflkd"), "launch", "--topology", args.topology, "--restart",
           str(len(kills) + 1), "--", "serve", "--images", str(args.images), "--log", str(log), "--no-progress",
           *serve]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    rng = random.Random(args.seed)
    end = time.monotonic() + args.timeout
    events = []
    try:
        for victim in kills:
            target = len(logged_rows(log)) + rng.randint(low, high)
            while len(logged_rows(log)) < target and proc.poll() is None and time.monotonic() < end:
                time.sleep(0.05)
            pids = rank_pids_of(proc.pid)
            if victim not in pids:
                raise UsageError(f"rank {victim} is not running (ranks found: {sorted(pids)}; the job "
                                 f"{'ended' if proc.poll() is not None else 'runs'}): is the stream too short?")
            before = logged_rows(log)
            os.kill(pids[victim], signal.SIGKILL if args.signal == "KILL" else signal.SIGSTOP)
            killed_at, run = time.time(), max((r[3] for r in before), default=0)
            while proc.poll() is None and time.monotonic() < end and not any(r[3] > run for r in logged_rows(log)):
                time.sleep(0.05)
            later = [r[4] for r in logged_rows(log) if r[3] > run]
            events.append({"rank": victim, "after_images": len(before),
                           "seconds_to_next_image": round(min(later) - killed_at, 2) if later else None})
            print(f"  {'killed' if args.signal == 'KILL' else 'stopped'} rank {victim} (pid {pids[victim]}) after "
                  f"{len(before)} images; served again after "
                  f"{events[-1]['seconds_to_next_image']} s", flush=True)
        out, err = proc.communicate(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise UsageError(f"the supervised stream did not finish within --timeout {args.timeout:g} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ids = [r[0] for r in logged_rows(log)]
    result = {"command": args.command_line, "serve": cmd, "signal": args.signal, "exit": proc.returncode,
              "images": args.images,
              "logged": len(ids), "lost": len(set(range(args.images)) - set(ids)),
              "served_twice": len(ids) - len(set(ids)), "runs": len({r[3] for r in logged_rows(log)}),
              "kills": events, "restarts_said": err.count("; restart ")}
    print(f"{result['logged']} of {args.images} images logged, {result['lost']} lost, {result['served_twice']} "
          f"served twice, over {result['runs']} runs; supervisor exit {proc.returncode}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return 0 if proc.returncode == 0 and result["lost"] == 0 and result["served_twice"] == 0 else 1
