"""Rebalancing, measured: `aflkd serve` with one rank slowed mid-run, with and without re-planning, against the
re-planned ideal (the plan with the true speeds from the first image), plus an unchanged rack.

Run from the checkout (nothing else running; pause background jobs):
    .venv/bin/python results/serving/rebalance_bench.py [--ranks 2] [--images 300] [--at 100] [--out results/serving]

Each case is one `mpiexec -n R aflkd serve` run writing its own JSON; this script reads them back and prints
images/s over the images from `at + 50` on (the issue's "within 50 images"), the ratio to the ideal, the
re-plans, and whether every logged result equals plain torch's (recomputed here, unsplit).
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def serve(ranks: int, out: Path, name: str, images: int, extra: list, threads: int, net: str, size: int,
          mpiexec_extra: list) -> dict:
    log, report = out / f"{name}.db", out / f"{name}.json"
    for path in (log, Path(str(log) + "-wal"), Path(str(log) + "-shm")):
        path.unlink(missing_ok=True)
    cmd = [str(BIN / "mpiexec"), *mpiexec_extra, "-n", str(ranks), str(BIN / "aflkd"), "serve", "--net", net,
           "--size", str(size), "--images", str(images), "--log", str(log), "--json", str(report), "--threads",
           str(threads), "--no-progress", *extra]
    print("$", " ".join(cmd[0:1] + cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    data["log"] = str(log)
    return data


def serve_with_hog(ranks: int, out: Path, name: str, images: int, extra: list, threads: int, net: str, size: int,
                   at: int, core: int) -> dict:
    """A rank that is really slower: ranks bound one per core, and from the ``at``-th logged image a busy
    process (an endless Python loop) shares the last rank's core with it."""
    import time

    log, report = out / f"{name}.db", out / f"{name}.json"
    for path in (log, Path(str(log) + "-wal"), Path(str(log) + "-shm")):
        path.unlink(missing_ok=True)
    cmd = [str(BIN / "mpiexec"), "-bind-to", "core", "-n", str(ranks), str(BIN / "aflkd"), "serve", "--net", net,
           "--size", str(size), "--images", str(images), "--log", str(log), "--json", str(report), "--threads",
           str(threads), "--no-progress", *extra]
    print("$", " ".join(cmd), f"  (+ from image {at}: taskset -c {core} python -c 'while True: pass')", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hog = None
    try:
        while proc.poll() is None:
            try:
                done = sqlite3.connect(str(log), timeout=5).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            if hog is None and done >= at:
                hog = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
            time.sleep(0.02)
        _, err = proc.communicate()
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{err[-2000:]}")
    data = json.loads(report.read_text())
    data["log"] = str(log)
    return data


def after(data: dict, start: int) -> float:
    """Images/s over the run's images from ``start`` on (completion times from the timeline)."""
    rows = data["timeline"][start:]
    return (len(rows) - 1) / (rows[-1][1] - rows[0][1])


def exact(data: dict, net: str, size: int, seed: int = 0) -> float:
    """Largest |logit difference| between the log and plain torch, over every image and its top-5."""
    import torch

    from models import build_model, randomize_batchnorm

    torch.manual_seed(seed)
    model = randomize_batchnorm(build_model(net, 3, size, 10), torch.Generator().manual_seed(seed)).eval()
    worst = 0.0
    rows = sqlite3.connect(data["log"]).execute("SELECT image, topk FROM results ORDER BY image").fetchall()
    with torch.no_grad():
        for image, topk in rows:
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed * 1_000_003 + image))
            logits = model(x)[0]
            for c, v in json.loads(topk):
                worst = max(worst, abs(float(logits[c]) - v))
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--steady", type=int, default=500, help="images of the unchanged-rack run")
    p.add_argument("--at", type=int, default=100, help="the image from which the last rank is slowed")
    p.add_argument("--speed", type=float, default=0.5)
    p.add_argument("--net", default="edge3")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "results" / "serving"))
    p.add_argument("--mpiexec-extra", default="", help="e.g. '-bind-to core' (space-separated)")
    p.add_argument("--hog", action="store_true", help="also: the last rank really slowed, a busy process on its core")
    p.add_argument("--stages", type=int, default=1, help="serve --stages: a pipeline, its stage cuts re-planned "
                   "(the ideal then runs the rebalanced run's last cuts from the first image)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r, slow = args.ranks, f"{args.ranks - 1}:{args.speed}@{args.at}"
    common = (args.threads, args.net, args.size, args.mpiexec_extra.split())
    if args.stages > 1:
        return pipeline(args, out, r, slow, common)
    ideal_weights = ",".join(["1"] * (r - 1) + [str(args.speed)])
    runs = {
        "rebalanced": serve(r, out, "rebalanced", args.images, ["--slow", slow], *common),
        "fixed": serve(r, out, "fixed", args.images, ["--slow", slow, "--no-rebalance"], *common),
        "ideal": serve(r, out, "ideal", args.images, ["--slow", f"{r - 1}:{args.speed}@0", "--weights",
                                                      ideal_weights, "--no-rebalance"], *common),
        "unchanged": serve(r, out, "unchanged", args.steady, [], *common),
    }
    if args.hog:
        hog = (r, out, "hog-rebalanced", args.images)
        runs["hog-rebalanced"] = serve_with_hog(*hog, [], args.threads, args.net, args.size, args.at, r - 1)
        runs["hog-fixed"] = serve_with_hog(r, out, "hog-fixed", args.images, ["--no-rebalance"], args.threads,
                                           args.net, args.size, args.at, r - 1)
        final = runs["hog-rebalanced"]["switches"][-1]["weights"] if runs["hog-rebalanced"]["switches"] else None
        if final:  # the re-planned ideal: the plan it ended on, from the first image, the busy process from the start
            runs["hog-ideal"] = serve_with_hog(r, out, "hog-ideal", args.images, [
                "--no-rebalance", "--weights", ",".join(f"{w:.6f}" for w in final)], args.threads, args.net,
                args.size, 0, r - 1)
    start = args.at + 50
    ideal = after(runs["ideal"], start)
    figures = {}
    for name, data in runs.items():
        rate = after(data, start if name != "unchanged" else 0)
        reference = after(runs["hog-ideal"], start) if name.startswith("hog") and "hog-ideal" in runs else ideal
        figures[name] = _figure(args, data, rate, reference, [(s["at"], [round(w, 3) for w in s["weights"]])
                                                               for s in data["switches"]])
    summary = {"ranks": r, "net": args.net, "size": args.size, "slowdown": slow, "measured_from_image": start,
               "figures": figures}
    _report(out / "rebalance.json", summary, f"{r} ranks", args, start, "re-plans")
    _plot(runs, out / "rebalance.png", args.at)
    print(f"wrote {out / 'rebalance.json'} and {out / 'rebalance.png'}")
    return 0


def _figure(args, data: dict, rate: float, reference: float, switches: list) -> dict:
    return {"images_per_s": round(rate, 2), "vs_ideal": round(rate / reference, 3), "switches": switches,
            "max_abs_logit_error": exact(data, args.net, args.size), "command": data["command"]}


def _report(path: Path, summary: dict, ranks: str, args, start: int, what: str) -> None:
    """Write the summary as JSON and print its figures."""
    path.write_text(json.dumps(summary, indent=1))
    print(f"\n{ranks}, {args.net} at {args.size}, rank {summary['ranks'] - 1} at speed {args.speed} from image "
          f"{args.at}; images/s over images {start}-{args.images - 1}:")
    for name, f in summary["figures"].items():
        print(f"  {name:<11} {f['images_per_s']:8.2f} images/s  {f['vs_ideal']:.3f} of ideal  {what} "
              f"{f['switches'] or 'none'}  max |logit - torch| {f['max_abs_logit_error']:.2e}")


def pipeline(args, out: Path, r: int, slow: str, common: tuple) -> int:
    """The same cases for ``serve --stages``: the last rank (the last stage of the last cluster) slowed."""
    stages = ["--stages", str(args.stages)]
    runs = {"rebalanced": serve(r, out, "pipe-rebalanced", args.images, [*stages, "--slow", slow], *common),
            "fixed": serve(r, out, "pipe-fixed", args.images, [*stages, "--slow", slow, "--no-rebalance"], *common)}
    switches = [s for s in runs["rebalanced"]["switches"] if not s["rule"].get("revert")]
    if switches:  # the cuts the rule moved to last (a revert returns to cuts it had left)
        cuts = ",".join(map(str, switches[-1]["bounds"][1:-1]))
        runs["ideal"] = serve(r, out, "pipe-ideal", args.images, [*stages, "--cuts", cuts, "--slow",
                                                                  f"{r - 1}:{args.speed}@0", "--no-rebalance"], *common)
    runs["unchanged"] = serve(r, out, "pipe-unchanged", args.steady, stages, *common)
    start = args.at + 50
    ideal = after(runs["ideal"], start) if "ideal" in runs else float("nan")
    figures = {}
    for name, data in runs.items():
        rate = after(data, start if name != "unchanged" else 0)
        figures[name] = _figure(args, data, rate, ideal, [(s["at"], s["bounds"]) for s in data["switches"]])
    summary = {"ranks": r, "stages": args.stages, "net": args.net, "size": args.size, "slowdown": slow,
               "measured_from_image": start, "figures": figures}
    _report(out / "rebalance-pipeline.json", summary, f"{r} ranks in stages of {args.stages}", args, start, "re-cuts")
    if "ideal" in runs:
        _plot(runs, out / "rebalance-pipeline.png", args.at)
    print(f"wrote {out / 'rebalance-pipeline.json'}")
    return 0


def _plot(runs: dict, path: Path, at: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4))
    window = 10
    for name in ("rebalanced", "fixed", "ideal"):
        t = np.array([row[1] for row in runs[name]["timeline"]])
        rate = window / np.maximum(t[window:] - t[:-window], 1e-9)
        ax.plot(np.arange(window, len(t)), rate, lw=1, label=name)
        for s in runs[name]["switches"]:
            ax.axvline(s["at"], color="tab:green", ls="--", lw=0.8)
    ax.axvline(at, color="tab:red", ls=":", lw=1, label="slowdown")
    ax.set_xlabel("image")
    ax.set_ylabel(f"images/s (last {window})")
    ax.legend(fontsize=8)
    ax.set_title("serve: one rank slowed mid-run; re-plans dashed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
