"""``aflkd schedule``: the edge-KD core-allocation planner (the edge-KD paper) in simulation, checked, and profiled.

* ``simulate``: the paper's Fig. 5 -- total time of N Comm/Forward/Backward cycles
  for each core count and Comp:Comm ratio, with the exact planner, priority
  allocation and random allocation (1000 seeded draws), and the planning time.
* ``verify``: the planner against exhaustive search over every decision sequence
  on random cases for every N <= 6, c_total <= 6; writes each case's gap, ``max_gap``,
  the runtime and the planner's time on N = 100, c_total = 12.
* ``profile``: measures computation and communication times on this machine for
  each split of the cores, fits f and g (scheduling/costmodel.py) and writes the
  constants with their fit errors, for ``simulate --constants``.

The decision model and the fits are in docs/scheduling.md.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from runtime.errors import UsageError

from . import options

__all__ = ["add_parser", "parse_ratio", "simulate_cases", "verify_cases", "profile_machine"]

EPILOG = """\
examples:
  .venv/bin/aflkd schedule simulate --c-totals 6,8,10,12 --ratio 1:1,2:1 --json out/fig5.json --plot out/fig5.png
  .venv/bin/aflkd schedule verify --json out/verify.json
  .venv/bin/aflkd schedule profile --json out/constants.json
  .venv/bin/aflkd schedule simulate --constants out/constants.json --c-totals 2 --ratio 1:1
"""


def parse_ratio(text: str) -> tuple[float, float]:
    """``"2:1"`` -> (2.0, 1.0): Comp (x) : Comm (y), as in the paper's Fig. 5."""
    parts = text.split(":")
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--ratio {text!r}: give Comp:Comm as two positive numbers, e.g. 2:1") from None
    if not (a > 0 and b > 0):
        raise UsageError(f"--ratio {text!r}: both parts must be positive, e.g. 2:1")
    return a, b


def _ratios(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError("--ratio: give at least one Comp:Comm ratio, e.g. 1:1,2:1")
    for item in items:
        parse_ratio(item)
    return items


def _load_cost(path):
    from scheduling.costmodel import PAPER_LIKE, CostModel
    if path is None:
        return PAPER_LIKE
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--constants {path}: cannot read a JSON file ({err})") from None
    return CostModel.from_json(data, source=f"fitted, from {path}")


def simulate_cases(cost, cores: list[int], ratios: list[str], cycles: int, draws: int = 1000,
                   seed: int = 0, progress: bool = False) -> list[dict]:
    """One row per (cores, ratio): planner, priority, random mean/best/worst, plan_ms and the gains."""
    from runtime.progress import progress_bar

    from scheduling.planner import Workload, plan, priority, random_allocation
    for c in cores:
        Workload(cycles, 1.0, 1.0, 1.0, c).check(cost)     # one line before any work
    rows = []
    cases = [(c, r) for r in ratios for c in cores]
    for c, r in progress_bar(cases, desc="cases", disable=not progress):
        a, b = parse_ratio(r)
        work = Workload(cycles, comm=1.0, forward=a / b, backward=a / b, cores=c)
        start = time.perf_counter()
        best = plan(cost, work)
        plan_ms = 1e3 * (time.perf_counter() - start)
        prio = priority(cost, work)
        rnd = random_allocation(cost, work, draws=draws, seed=seed)
        gain = lambda other: (other - best.total) / other
        rows.append({"cores": c, "ratio": r, "cycles": cycles, "planner": best.total, "priority": prio,
                     "random_mean": rnd.mean, "random_best": rnd.best, "random_worst": rnd.worst,
                     "plan_ms": plan_ms, "gain_vs_priority": gain(prio), "gain_vs_random_mean": gain(rnd.mean),
                     "gain_vs_random_best": gain(rnd.best), "gain_vs_random_worst": gain(rnd.worst),
                     "shared_rounds": sum(1 for s in best.steps if s.decision[0] == "pair"),
                     "rounds": len(best.steps)})
    return rows


def _percent(fraction: float) -> str:
    """One decimal, never '-0.0%' (a gain of zero computed as a tiny negative)."""
    return f"{round(100 * fraction, 1) + 0.0:.1f}%"


def format_table(rows: list[dict]) -> str:
    head = ("cores", "ratio", "planner", "priority", "rnd mean", "rnd best", "rnd worst",
            "gain/prio", "gain/mean", "gain/best", "plan ms")
    lines = ["  ".join(f"{h:>9}" for h in head)]
    for r in rows:
        vals = (r["cores"], r["ratio"], f"{r['planner']:.3f}", f"{r['priority']:.3f}", f"{r['random_mean']:.3f}",
                f"{r['random_best']:.3f}", f"{r['random_worst']:.3f}", _percent(r['gain_vs_priority']),
                _percent(r['gain_vs_random_mean']), _percent(r['gain_vs_random_best']),
                f"{r['plan_ms']:.1f}")
        lines.append("  ".join(f"{str(v):>9}" for v in vals))
    return "\n".join(lines)


def figure(rows: list[dict], source: str):
    """Edge-KD Fig. 5 as a Figure: per ratio, the three policies' total times by core count.

    The y axis starts just below the smallest bar (the policies differ by a few percent, invisible from 0);
    the legend sits below the axes, clear of the bars; the number above each planner bar is the time the
    planner took to decide, which the legend says.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratios = list(dict.fromkeys(r["ratio"] for r in rows))
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4.6), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        sub = [r for r in rows if r["ratio"] == ratio]
        xs = list(range(len(sub)))
        w = 0.27
        ax.bar([x - w for x in xs], [r["planner"] for r in sub], w, label="planner (exact); above: ms it took")
        ax.bar(xs, [r["priority"] for r in sub], w, label="priority")
        ax.bar([x + w for x in xs], [r["random_mean"] for r in sub], w, label="random (mean, best..worst)",
               yerr=[[r["random_mean"] - r["random_best"] for r in sub],
                     [r["random_worst"] - r["random_mean"] for r in sub]], capsize=3)
        for x, r in zip(xs, sub):
            ax.annotate(f"{r['plan_ms']:.0f} ms", (x - w, r["planner"]), ha="center", va="bottom", fontsize=7)
        low = min(min(r["planner"], r["priority"], r["random_best"]) for r in sub)
        high = max(max(r["planner"], r["priority"], r["random_worst"]) for r in sub)
        ax.set_ylim(low - 0.15 * (high - low) - 1e-9, high + 0.12 * (high - low) + 1e-9)
        ax.set_xticks(xs, [str(r["cores"]) for r in sub])
        ax.set_xlabel("c_total (cores)")
        ax.set_ylabel(f"total time of {sub[0]['cycles']} cycles (model units; axis not from 0)")
        ax.set_title(f"x (Comp) : y (Comm) = {ratio}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.suptitle(f"Fig. 5: planner vs priority and random allocation; constants: {source}", fontsize=8)
    fig.tight_layout()
    return fig


def _plot(rows: list[dict], path: str, source: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, source)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _simulate(args) -> int:
    options.prepare_output(args.json, "--json")
    options.prepare_output(args.plot, "--plot")
    cost = _load_cost(args.constants)
    rows = simulate_cases(cost, args.c_totals, args.ratio, args.cycles, draws=args.draws, seed=args.seed,
                          progress=True)
    print(f"constants: {cost.source}: a1={cost.comp.a1:.4g} a2={cost.comp.a2:.4g} "
          f"b1={cost.comm.b1:.4g} b2={cost.comm.b2:.4g} b3={cost.comm.b3:.4g}")
    print(f"{args.cycles} cycles per case, y (Comm) = 1 per cycle, x (each of Forward, Backward) = ratio; "
          f"random: {args.draws} draws, seed {args.seed}; gain = (baseline - planner) / baseline")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": args.command_line, "constants": cost.to_json(),
                                               "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        _plot(rows, args.plot, cost.source)
        print(f"wrote {args.plot}")
    return 0


def verify_cases(cost, max_cycles: int = 6, max_cores: int = 6, per_case: int = 4, seed: int = 0,
                 budget=None, progress: bool = False) -> dict:
    """Planner vs exhaustive search on ``per_case`` random workloads for every (N, c_total) in the grid.

    ``budget``: skip (N, c) with (c_total+1)^N above it (default None: skip nothing); skipped pairs are listed.
    """
    from runtime.progress import progress_bar

    from scheduling.planner import Workload, exhaustive_search, plan
    rng = random.Random(seed)
    pairs = [(n, c) for n in range(1, max_cycles + 1) for c in range(1, max_cores + 1)]
    grid = [p for p in pairs if budget is None or (p[1] + 1) ** p[0] <= budget]
    skipped = [p for p in pairs if p not in grid]
    cases = []
    brute_s = 0.0
    for n, c in progress_bar(grid, desc="(N, c) pairs", disable=not progress):
        for _ in range(per_case):
            work = Workload(n, comm=round(rng.uniform(0.2, 3.0), 3), forward=round(rng.uniform(0.2, 3.0), 3),
                            backward=round(rng.uniform(0.2, 3.0), 3), cores=c)
            planned = plan(cost, work).total
            start = time.perf_counter()
            brute, sequences = exhaustive_search(cost, work)
            seconds = time.perf_counter() - start
            brute_s += seconds
            cases.append({"cycles": n, "cores": c, "comm": work.comm, "forward": work.forward,
                          "backward": work.backward, "planner": planned, "exhaustive": brute,
                          "sequences": sequences, "gap": planned - brute,
                          "rel_gap": (planned - brute) / brute, "exhaustive_s": seconds})
    return {"cases": cases, "max_gap": max(abs(r["gap"]) for r in cases),
            "max_rel_gap": max(abs(r["rel_gap"]) for r in cases),
            "pairs_checked": [{"cycles": n, "cores": c} for n, c in grid],
            "skipped_too_many_sequences": [{"cycles": n, "cores": c} for n, c in skipped],
            "exhaustive_s": brute_s}


def _verify(args) -> int:
    options.prepare_output(args.json, "--json")
    cost = _load_cost(args.constants)
    cost.check(args.max_cores)
    start_all = time.perf_counter()
    result = verify_cases(cost, args.max_cycles, args.max_cores, args.per_case, args.seed, args.budget,
                          progress=True)
    result["verify_s"] = time.perf_counter() - start_all
    result.update({"command": args.command_line, "constants": cost.to_json()})
    from scheduling.planner import Workload, plan, priority
    try:    # fitted constants may not extend to 12 cores
        big = Workload(100, 1.0, 1.0, 1.0, 12)
        start = time.perf_counter()
        total = plan(cost, big).total
        result["plan_ms_n100_c12"] = 1e3 * (time.perf_counter() - start)
        result["plan_n100_c12_vs_priority"] = total / priority(cost, big)
    except UsageError as err:
        result["plan_ms_n100_c12"] = None
        print(f"planner time on N = 100, c_total = 12: not timed ({err})")
    seqs = sum(r["sequences"] for r in result["cases"])
    npairs = len(result["pairs_checked"])
    print(f"constants: {cost.source}")
    print(f"{len(result['cases'])} cases over {npairs} (N, c_total) pairs (N <= {args.max_cycles}, "
          f"c_total <= {args.max_cores}, {args.per_case} each), {seqs:,} decision sequences enumerated: "
          f"max_gap {result['max_gap']:.3g} (relative {result['max_rel_gap']:.3g})")
    print(f"time for the {len(result['cases'])} cases: {result['verify_s']:.1f} s, "
          f"{result['exhaustive_s']:.1f} s of it exhaustive search")
    if result["plan_ms_n100_c12"] is not None:
        print(f"planner time on N = 100, c_total = 12: {result['plan_ms_n100_c12']:.0f} ms "
              f"(total {result['plan_n100_c12_vs_priority']:.3f} x priority's)")
    if result["skipped_too_many_sequences"]:
        print("skipped (--budget): "
              + ", ".join(f"N={s['cycles']} c={s['cores']}" for s in result["skipped_too_many_sequences"]))
    else:
        print("skipped: none")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0 if result["max_rel_gap"] <= 1e-9 else 1


def _frame_link(fmt, cores: int):
    """Communication of the frame-upload load: encode a batch of frames on c threads and send the message
    (a self-send over MPI_COMM_SELF).  The images are smooth (8x8 noise upsampled to 32x32), as photos are
    closer to that than to pixel noise, which JPEG barely compresses."""
    import torch
    import torch.nn.functional as F

    from kd.frames import FrameEncoder
    from runtime import transport as comm

    encoder = FrameEncoder(fmt, (0.5,) * 3, (0.25,) * 3, 3, max_threads=cores)
    generator = torch.Generator().manual_seed(0)
    cache = {}

    def make(frames: int, c: int):
        if frames not in cache:
            small = torch.randn(frames, 3, 8, 8, generator=generator)
            images = F.interpolate(small, size=32, mode="bilinear", align_corners=False)
            message = encoder.encode(0, images, 1)
            cache[frames] = (images, torch.empty_like(message))

        images, recv = cache[frames]

        def once():
            message = encoder.encode(0, images, c)
            if message.numel() != recv.numel():
                recv.resize_(message.numel())
            comm.sendrecv(comm.self_comm(), message, 0, recv, 0, tag=7)
        return once
    return encoder, make


def profile_machine(cores: int, batches=(16, 32, 64), megabytes=(0.5, 1.0, 2.0), repeat: int = 3,
                    progress: bool = False, upload=None) -> tuple[dict, dict]:
    """Measure (workload, comm cores, seconds) for computation and communication on this machine.

    Computation: edge net 3 on 32x32 images, forward + backward + SGD step on a
    batch of b (workload x = b/64 batches of 64), with ``torch.set_num_threads(cores - c)``
    for c = 0..cores-1 communication cores.  Communication: a self-send/recv over
    MPI_COMM_SELF of y MiB of float32 teacher logits (10 classes) plus their decode
    (temperature softmax), with ``torch.set_num_threads(c)`` for c = 1..cores.  The
    MPI copy is single-threaded; only the decode can use the c threads.

    With ``upload`` (a :class:`kd.frames.FrameFormat`), communication is the frame
    upload instead: encoding y batches of 64 frames on c encoder threads and
    sending them (y in 0.5, 1, 2), the load of ``--upload`` in ``train distill``
    and ``control``.
    """
    import numpy as np
    import torch
    from runtime.progress import progress_bar

    from models.vgg import edge_net
    from runtime import transport as comm

    old = torch.get_num_threads()
    torch.manual_seed(0)
    net = edge_net(3, size=32)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    comp = {"work": [], "cores": [], "seconds": []}
    link = {"data": [], "cores": [], "seconds": []}
    jobs = [("comp", c, b) for c in range(cores) for b in batches] + \
           [("comm", c, m) for c in range(1, cores + 1) for m in megabytes]
    encoder, frame_job = _frame_link(upload, cores) if upload is not None else (None, None)
    try:
        for kind, c, size in progress_bar(jobs, desc="profile", disable=not progress):
            if kind == "comp":
                torch.set_num_threads(cores - c)
                images, labels = torch.randn(size, 3, 32, 32), torch.randint(0, 10, (size,))

                def once():
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(images), labels).backward()
                    opt.step()
                table, amount = comp, size / 64
            elif frame_job is not None:
                torch.set_num_threads(1)
                once = frame_job(int(size * 64), c)
                table, amount = link, size
            else:
                torch.set_num_threads(c)
                rows = int(size * 2 ** 20 / (4 * 10))
                send, recv = torch.randn(rows, 10), torch.empty(rows, 10)

                def once():
                    comm.sendrecv(comm.self_comm(), send, 0, recv, 0, tag=7)
                    torch.softmax(recv / 4.0, dim=1)
                table, amount = link, size
            once()   # warm-up
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                once()
                times.append(time.perf_counter() - start)
            table["work" if kind == "comp" else "data"].append(amount)
            table["cores"].append(c)
            table["seconds"].append(float(np.median(times)))
    finally:
        torch.set_num_threads(old)
        if encoder is not None:
            encoder.close()
    return comp, link


def _profile(args) -> int:
    from scheduling.costmodel import CostModel, fit_f, fit_g
    options.prepare_output(args.json, "--json")
    machine = os.cpu_count() or 1
    cores = args.cores or max(3, machine)
    if cores < 3:
        raise UsageError(f"--cores {cores}: g has 3 constants and needs >= 3 distinct communication core "
                         f"counts (1..--cores); give --cores 3 or more")
    note = ""
    if cores > machine:
        note = (f"this machine has {machine} cores; splits above {machine} oversubscribe (more threads than "
                f"cores), so the points at c > {machine} measure time-sharing, not extra cores")
        print(f"note: {note}")
    from .distill import frame_format

    upload = frame_format(args)
    comp, link = profile_machine(cores, repeat=args.repeat, progress=True, upload=upload)
    free = fit_f(comp["work"], comp["cores"], comp["seconds"])
    cost = CostModel(fit_f(comp["work"], comp["cores"], comp["seconds"], nonnegative=True),
                     fit_g(link["data"], link["cores"], link["seconds"]),
                     source=f"fitted on this machine ({machine} cores, profiled with c_total={cores})")
    data = cost.to_json()
    data["f_free_fit"] = {"a1": free.a1, "a2": free.a2, "rms_rel_error": free.rms_rel_error}
    data.update({"command": args.command_line, "machine_cores": machine, "c_total": cores, "note": note,
                 "units": {"x": "batches of 64 (edge net 3, 32x32, forward+backward+step)",
                           "y": (f"batches of 64 {upload} frames (encode on c threads + self-send)" if upload else
                                 "MiB of float32 logits (self-send/recv + softmax decode)"), "time": "seconds"},
                 "upload": str(upload) if upload else None,
                 "measurements": {"computation": comp, "communication": link}})
    Path(args.json).write_text(json.dumps(data, indent=1))
    print(f"f: a1={cost.comp.a1:.4g} s/batch, a2={cost.comp.a2:.4g}  RMS relative error "
          f"{100 * cost.comp.rms_rel_error:.1f}% over {cost.comp.points} points")
    unit = "batches of frames/s" if upload else "MiB/s"
    print(f"g: b1={cost.comm.b1:.4g}, b2={cost.comm.b2:.4g}, b3={cost.comm.b3:.4g} ({unit})  RMS relative error "
          f"{100 * cost.comm.rms_rel_error:.1f}% over {cost.comm.points} points")
    if free.a2 < 0:
        print(f"note: the free fit of f gave a2={free.a2:.4g} < 0 (computation faster when communication takes "
              f"cores: noise, {100 * free.rms_rel_error:.1f}% RMS error); f is fitted within a2 >= 0, so a2 = 0: "
              "the measurements show no cost of taking a core from computation")
    print(f"wrote {args.json}")
    for warning in fit_warnings(cost):
        print(f"warning: {warning}")
    return 0


def fit_warnings(cost) -> list[str]:
    """What makes a fit unfit to plan with: a poor fit (over 25% RMS relative error) or a2 < 0."""
    out = []
    for name, model in (("f", cost.comp), ("g", cost.comm)):
        if model.rms_rel_error > 0.25:
            out.append(f"{name} fits its points with {100 * model.rms_rel_error:.0f}% RMS relative error: the "
                       "machine was busy or the model does not describe it; measure again before planning with it")
    if cost.comp.a2 < 0:
        out.append(f"a2 = {cost.comp.a2:.3g} < 0 (computation faster when communication takes cores): "
                   "--constants will refuse this file")
    return out


def add_parser(sub) -> None:
    sched = sub.add_parser("schedule", help="core allocation between logit reception and training (the edge-KD paper)",
                           description=__doc__, epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    what = sched.add_subparsers(dest="what", metavar="WHAT", parser_class=options.Parser)
    sched.set_defaults(func=lambda args: (sched.print_help(), 2)[1])

    sim = what.add_parser("simulate", help="the paper's Fig. 5: planner vs priority and random allocation",
                          description="Total time of --cycles Comm/Forward/Backward cycles per core count and "
                          "Comp:Comm ratio: exact planner, priority, random (mean/best/worst of --draws), "
                          "planning time, gains. Constants: the built-in ones (the paper prints none) or "
                          "--constants from 'aflkd schedule profile'.", epilog=EPILOG,
                          formatter_class=options.ExamplesFormatter)
    sim.add_argument("--c-totals", type=options.positive_int_list, default="6,8,10,12",
                     help="c_total values, comma-separated (default 6,8,10,12)")
    sim.add_argument("--ratio", type=options.as_type("ratio", _ratios), default="1:1,2:1",
                     help="x (Comp, each of Forward and Backward) : y (Comm) per cycle, comma-separated "
                     "(default 1:1,2:1)")
    sim.add_argument("--cycles", type=options.positive_int, default=20, help="N cycles (default 20)")
    sim.add_argument("--draws", type=options.positive_int, default=1000, help="random allocation draws (1000)")
    sim.add_argument("--seed", type=int, default=0, help="seed of the random draws (0)")
    sim.add_argument("--constants", default=None, metavar="FILE", help="JSON from 'aflkd schedule profile' (default: the built-in constants)")
    sim.add_argument("--json", default=None, metavar="FILE", help="write one row per case here (default: none)")
    sim.add_argument("--plot", default=None, metavar="PNG", help="write the Fig. 5 bar chart here, PNG (default: none)")
    sim.set_defaults(func=_simulate, one_process=True)

    ver = what.add_parser("verify", help="the planner against exhaustive search on small random cases",
                          description="For every N <= --max-cycles and c_total <= --max-cores, --per-case "
                          "random workloads: the planner's total vs the minimum over every decision sequence. "
                          "Prints the runtime and the planner's time on N = 100, c_total = 12. "
                          "Exit 1 if any relative gap exceeds 1e-9.",
                          epilog=EPILOG, formatter_class=options.ExamplesFormatter)
    ver.add_argument("--max-cycles", type=options.positive_int, default=6, help="largest N")
    ver.add_argument("--max-cores", type=options.positive_int, default=6, help="largest c_total")
    ver.add_argument("--per-case", type=options.positive_int, default=4, help="random workloads per (N, c) (4)")
    ver.add_argument("--budget", type=options.positive_int, default=None,
                     help="skip (N, c) with (c+1)^N above this, listed as skipped (default: skip none; "
                     "N = 6, c_total = 6 has 14,491,441 sequences, under a second each)")
    ver.add_argument("--seed", type=int, default=0, help="seed of the workloads (0)")
    ver.add_argument("--constants", default=None, metavar="FILE", help="JSON from 'aflkd schedule profile' (default: the built-in constants)")
    ver.add_argument("--json", default=None, metavar="FILE", help="write the cases, their gaps and max_gap here (default: none)")
    ver.set_defaults(func=_verify, one_process=True)

    prof = what.add_parser("profile", help="measure and fit f and g on this machine",
                           description=profile_machine.__doc__, epilog=EPILOG,
                           formatter_class=options.ExamplesFormatter)
    prof.add_argument("--json", required=True, metavar="FILE",
                      help="write the constants, fit errors and measurements here (JSON)")
    prof.add_argument("--cores", type=options.positive_int, default=None,
                      help="c_total to split (default: this machine's cores, at least 3 for g's 3 constants)")
    prof.add_argument("--repeat", type=options.positive_int, default=3, help="timings per point, median (3)")
    from .distill import frame_options

    frame_options(prof)
    prof.set_defaults(func=_profile, sets_own_threads=True, one_process=True)
