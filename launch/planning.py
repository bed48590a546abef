"""``aflkd plan``: a topology's rank map as a table, the hostfiles, and the mpiexec lines that realise it.

The table's columns are data (:data:`BASE_COLUMNS` + :func:`layer_columns`):
each is a header and a function of a :class:`~launch.topology.RankSlot`, used
for both the printed table and the JSON, so a new column is one entry.
"""
from __future__ import annotations

import json
import os
import shlex
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from runtime.errors import UsageError
from runtime.geometry import RowRange

from . import options
from .hostfile import FLAVOURS, write_hostfile
from .launcher import check_inner_command, host_cores, hostfile_name, inner_command, local_only, mpiexec_argv
from .topology import RankSlot, Topology, load_topology

__all__ = ["add_parser", "Column", "BASE_COLUMNS", "layer_columns", "columns", "format_table", "rank_table",
           "plan_report"]

Column = tuple[str, Callable[[RankSlot], object]]
"""A table column: its header and the value of one rank (printed with ``str``; ``None`` as ``-``)."""


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


BASE_COLUMNS: list[Column] = [
    ("rank", lambda r: r.rank),
    ("host", lambda r: r.host if r.slot == 0 else f"{r.host}[{r.slot}]"),
    ("address", lambda r: r.address),
    ("role", lambda r: r.role),
    ("cluster", lambda r: r.cluster),
    ("stage", lambda r: r.stage),
    ("speed", lambda r: "measure" if r.speed is None and r.role != "cloud" else r.speed),
]
"""Where each rank runs and what it is, from the topology alone."""

MPIEXEC_NAMES = {"openmpi": "mpirun", "mpich": "mpiexec"}


def layer_columns(topology: Topology, stages: Optional[dict] = None) -> list[Column]:
    """Columns from the stage partitioner: the input rows a rank owns and the layers it runs (with ``stages``)."""
    if stages is None:
        return []

    def rows(r: RankSlot):
        if r.cluster is None:
            return None
        first, stop, height = stages["input_rows"][r.stage][r.cluster]
        return f"{RowRange(first, stop)} of {height}"  # first to last row, both included ("none" when empty)

    def layers(r: RankSlot):
        if r.stage is None:
            return None
        a, b = stages["bounds"][r.stage], stages["bounds"][r.stage + 1]
        labels = stages["labels"]
        text = labels[a] if b - a == 1 else f"{labels[a]}..{labels[b - 1]}"
        return f"{text} ({b - a})" + (" + head" if r.rank == 0 else "")

    def ms(r: RankSlot):
        return None if r.stage is None else round(1e3 * stages["times"][r.cluster][r.stage], 1)

    return [("input rows", rows), ("layers", layers), ("planned ms/image", ms)]


def stage_plan(topology: Topology, net: str, size: int, profile: Optional[str], in_channels: int = 3,
               classes: int = 10, bandwidth: float = float("inf")) -> dict:
    """Cut ``net`` into the topology's stages and share its rows among the clusters (JSON-ready).

    Costs come from ``profile`` (``aflkd profile`` on a board) or, without
    one, are measured here on this host's threads -- relative costs are what
    the cut needs; the topology's speeds scale them per device.
    """
    import torch

    from models import build_model
    from runtime.geometry import split_rows
    from runtime.graph import trace_model
    from runtime.profile import profile_layers, read_profile
    from runtime.stages import min_share, partition_stages, split_layers

    missing = [r.host for r in topology.ranks() if r.speed is None]
    if missing:
        raise UsageError(f"{topology.path}: host '{missing[0]}' has speed = \"measure\"; run 'aflkd profile' on it "
                         "and give its speed relative to the others, or plan without layers (--no-layers)")
    torch.manual_seed(0)
    model = build_model(net, in_channels, size, classes).eval()
    layers = split_layers(trace_model(model, (in_channels, size, size)))
    if topology.stages > len(layers):
        raise UsageError(f"{topology.path} has {topology.stages} devices per cluster but {net} at {size}x{size} has "
                         f"only {len(layers)} layers to share; use fewer stages or another net")
    prof = read_profile(profile, layers) if profile else profile_layers(model, layers, net, repeat=2)
    speeds = [[topology.ranks()[topology.rank_of(c, k)].speed for k in range(topology.stages)]
              for c in range(topology.clusters)]
    extra = [[0.0] * topology.stages for _ in range(topology.clusters)]
    extra[0][0] = prof.head_seconds
    split = partition_stages(prof.seconds, prof.out_bytes, speeds, bandwidth, extra,
                             min_share=min_share(layers, topology.clusters))
    input_rows = []
    for k in range(topology.stages):
        height = layers.cut_shape(split.bounds[k])[1]
        input_rows.append([(r.start, r.stop, height) for r in split_rows(height, split.shares)])
    return {"net": net, "size": size, "profile": profile or f"measured on this host ({prof.threads} threads)",
            "bandwidth_mb_per_s": bandwidth / 1e6,
            "labels": [layer.label for layer in layers.layers], "bounds": list(split.bounds),
            "shares": list(split.shares), "times": [list(row) for row in split.times],
            "balance_planned": split.balance, "input_rows": input_rows}


def columns(topology: Topology, stages: Optional[dict] = None) -> list[Column]:
    return BASE_COLUMNS + layer_columns(topology, stages)


def rank_table(topology: Topology, with_cloud: bool = False,
               stages: Optional[dict] = None) -> tuple[list[str], list[list[str]]]:
    """(headers, one row of printed cells per rank)."""
    cols = columns(topology, stages)
    return [h for h, _ in cols], [[_text(cell(r)) for _, cell in cols] for r in topology.ranks(with_cloud)]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="print a topology's rank map and the mpiexec lines (Open MPI, MPICH) that realise it",
        description=textwrap.fill(
            "Read a topology (docs/topology.md), print its rank map (rank, host, role, cluster, stage, speed), "
            "write a hostfile for Open MPI and one for MPICH whose line order is the rank map, and print the "
            "mpiexec line of each.  The lines run the command after '--' (default: 'aflkd ranks', which "
            "checks where each rank landed); 'aflkd launch' builds and runs the same line for you."
        ),
        epilog=(
            "examples:\n"
            "  aflkd plan --topology hostfiles/testbed.toml\n"
            "  aflkd plan --topology hostfiles/local-2x2.toml --json out/plan.json -- aflkd bench layers\n"
        ),
        formatter_class=options.ExamplesFormatter,
    )
    p.add_argument("--topology", default=None, help="topology file (TOML; shipped ones: hostfiles/*.toml) "
                   "(default: none; required unless --program)")
    p.add_argument("--hostfile-dir", default="out/hostfiles", metavar="DIR",
                   help="where the two hostfiles are written (created)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the rank map, hostfiles and command lines as JSON (default: not written)")
    p.add_argument("--with-cloud", action="store_true",
                   help="include the cloud host as the last rank (inference jobs leave it out)")
    p.add_argument("--net", type=options.net_name, default="edge3",
                   help="the net whose layers the stages share (edge1..3, cloud, tv:NAME)")
    p.add_argument("--size", type=options.positive_int, default=224, help="input height and width")
    p.add_argument("--profile", default=None, metavar="JSON",
                   help="per-layer costs from 'aflkd profile' on a board (default: measured here, quickly)")
    p.add_argument("--bandwidth", type=options.positive_float, default=125.0, metavar="MB_PER_S",
                   help="link bandwidth charged for each stage-to-stage send: 125 MB/s is the boards' 1 Gbit/s "
                   "Ethernet; give a large number for ranks on one host")
    p.add_argument("--no-layers", action="store_true",
                   help="only where ranks run: no stage cut, no rows, no layers")
    program = p.add_argument_group(
        "programs", "--program: the split of --net at --size over --ranks lowered to each rank's instructions "
        "(what the executor runs, in order), then the pairing check of all ranks' programs (every halo rows "
        "sent are received and awaited, the collectives agree, the programs run to the end together)")
    program.add_argument("--program", action="store_true", help="print the programs instead of the rank map")
    program.add_argument("--ranks", type=options.positive_int, default=2, help="ranks the map is split over")
    program.add_argument("--weights", type=options.weights, default=None,
                         help="row shares, one per rank (default: equal)")
    program.add_argument("--head", choices=["gather", "split"], default="gather",
                         help="gather the last map to rank 0, or split the first Linear by columns")
    program.add_argument("--rank", type=options.non_negative_int, default=None,
                         help="print this rank's program only (default: every rank's)")
    program.add_argument("--stages", type=options.positive_int, default=1,
                         help="a pipeline: --ranks form ranks/S clusters of S stages; prints its deployment (what "
                         "every rank agrees on) and each stage's programs (--weights: one per cluster)")
    program.add_argument("--cuts", type=options.int_list, default=None, metavar="L1,L2,...",
                         help="with --stages: the S-1 stage cuts as layer indices (default: equal layers)")
    p.add_argument("command", nargs="...", metavar="-- COMMAND",
                   help="the aflkd command the printed lines run (default: aflkd ranks)")
    p.set_defaults(func=_plan, one_process=True)


def _programs(args) -> int:
    """``aflkd plan --program``: lower the split to programs, print them, check them together."""
    from models import build_model
    from runtime.deployment import plan_digest
    from runtime.graph import trace_model
    from runtime.plan import check_weights, plan_split
    from runtime.program import check_programs, lower_all
    from runtime.skeleton import empty_weights

    if args.rank is not None and args.rank >= args.ranks:
        raise UsageError(f"--rank {args.rank}: there are only --ranks {args.ranks} (0 to {args.ranks - 1})")
    if args.stages > 1:
        return _pipeline_programs(args)
    weights = check_weights(args.weights, args.ranks)
    with empty_weights():
        model = build_model(args.net, 3, args.size, 10).eval()
    plan = plan_split(trace_model(model, (3, args.size, args.size)), weights, head=args.head)
    programs = lower_all(plan, model)
    print(f"split plan {plan_digest(plan)} (every rank agrees on this digest before any image moves)")
    for program in programs if args.rank is None else [programs[args.rank]]:
        print(program.text())
    problems = check_programs(programs)
    print(f"pairing check of the {args.ranks} programs: " + ("they pair and run to the end" if not problems
                                                             else "FAILED\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


def pipeline_programs(net: str, size: int, ranks: int, stages: int, cuts=None, weights=None, head: str = "gather"):
    """A pipeline's :class:`runtime.deployment.Deployment` (with each stage's plan digest, as
    :class:`runtime.pipeline.PipelineExecutor` computes it) and ``{rank: (title, Program, StreamProgram)}`` (the
    stage's split program and the rank's per-image transfers), and the pairing checks' problems, built
    without MPI from a skeleton of ``net``."""
    from models import build_model
    from runtime.deployment import pipeline_deployment, plan_digest
    from runtime.graph import trace_model
    from runtime.pipeline import Grid, split_head_plan, stage_plan
    from runtime.plan import check_weights
    from runtime.program import check_programs, lower_all
    from runtime.skeleton import empty_weights
    from runtime.stages import equal_stages, split_layers

    if ranks % stages:
        raise UsageError(f"--stages {stages} does not divide --ranks {ranks} into clusters")
    grid = Grid(ranks // stages, stages)
    shares = check_weights(weights, grid.clusters)
    with empty_weights():
        model = build_model(net, 3, size, 10).eval()
    layers = split_layers(trace_model(model, (3, size, size)))
    n = len(layers)
    if grid.stages > n:
        raise UsageError(f"--stages {grid.stages}: {net} has only {n} layers to share")
    bounds = [0, *cuts, n] if cuts is not None else list(equal_stages(n, grid.stages))
    if len(bounds) != grid.stages + 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise UsageError(f"--cuts: need {grid.stages - 1} layer indices rising strictly between 0 and {n}")
    split_head = head == "split" and split_head_plan(layers, shares)[0] is not None
    digests, programs, problems = [], {}, []
    for s in range(grid.stages):
        first, stop = bounds[s], bounds[s + 1]
        module, plan = stage_plan(model, layers, bounds, s, shares, split_head)
        digests.append(plan_digest(plan))
        lowered = lower_all(plan, module, head=split_head and s == grid.stages - 1)
        problems += [f"stage {s}: {p}" for p in check_programs(lowered)]
        for c, program in enumerate(lowered):
            programs[grid.rank(c, s)] = (f"cluster {c}, stage {s}, layers {first}:{stop}", program)
    deployment = pipeline_deployment(layers, grid.clusters, grid.stages, bounds, shares,
                                     "split" if split_head else "gather", digests)
    # the transfers between stages and to the root, per image: what PipelineExecutor lowers and runs
    from runtime.stream_program import check_stream, lower_pipeline

    streams = lower_pipeline(grid.clusters, grid.stages, bounds, [layers.cut_shape(k) for k in range(n + 1)], shares,
                             split_head, tuple(layers.graph.nodes[-2].shape[1:]) if split_head else ())
    problems += [f"stream: {p}" for p in check_stream(streams, layers.cut_shape(n)[1])]
    programs = {rank: (title, program, streams[rank]) for rank, (title, program) in programs.items()}
    return deployment, programs, problems


def _pipeline_programs(args) -> int:
    """``aflkd plan --program --stages S``: the pipeline's deployment, then each stage's programs, checked."""
    deployment, programs, problems = pipeline_programs(args.net, args.size, args.ranks, args.stages, args.cuts,
                                                       args.weights, args.head)
    print(deployment.text() + " (every rank agrees on this digest before any image moves)")
    for rank in sorted(programs):
        if args.rank is None or args.rank == rank:
            title, program, stream = programs[rank]
            print(f"job rank {rank} ({title}), {program.text()}")
            print(f"job rank {rank} transfers, {stream.text()}")
    print(f"pairing check of the {deployment.stages} stages' programs: " + (
        "they pair and run to the end" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    return 0 if not problems else 1


def plan_report(topology: Topology, hostfile_dir: str, inner: Sequence[str], with_cloud: bool = False,
                as_root: bool = False, cores: Optional[int] = None, stages: Optional[dict] = None) -> dict:
    """Write both hostfiles into ``hostfile_dir`` and return the plan as JSON-ready data.

    A flavour whose hostfile cannot express the order gets ``None`` and a note.
    """
    local = local_only(topology, with_cloud)
    extra = layer_columns(topology, stages)
    report = {
        "topology": topology.path,
        "description": topology.description,
        "clusters": topology.clusters,
        "stages": topology.stages,
        "size": topology.world_size(with_cloud),
        "with_cloud": with_cloud,
        "cloud": None,
        "ranks": [asdict(r) | {h: cell(r) for h, cell in extra} for r in topology.ranks(with_cloud)],
        "cluster_speeds": None,
        "hostfiles": {},
        "mpiexec": {},
        "command": list(inner[1:]),
        "notes": [],
        "stages_plan": stages,
    }
    if topology.cloud is not None:
        c = topology.cloud
        report["cloud"] = {"host": c.name, "address": c.address, "rank": topology.cloud_rank if with_cloud else None}
    try:
        report["cluster_speeds"] = topology.cluster_speeds()
    except UsageError as err:
        report["notes"].append(str(err))
    for flavour in FLAVOURS:
        path = str(Path(hostfile_dir) / hostfile_name(topology, flavour, with_cloud))
        try:
            write_hostfile(path, topology, flavour, with_cloud)
        except UsageError as err:
            report["hostfiles"][flavour], report["mpiexec"][flavour] = None, None
            report["notes"].append(str(err))
            continue
        report["hostfiles"][flavour] = path
        report["mpiexec"][flavour] = mpiexec_argv(topology, flavour, path, inner, MPIEXEC_NAMES[flavour],
                                                  with_cloud=with_cloud, local=local, as_root=as_root, cores=cores)
    if local:
        report["notes"].append("every address is this host: MPICH gets -launcher fork (no ssh); Open MPI gets "
                               "--allow-run-as-root only as root and --oversubscribe --bind-to none only with "
                               "more ranks than this host's cores")
    else:
        report["notes"].append("boards: the same checkout and venv path on every host, passwordless ssh from "
                               "this one, and one MPI (the system's) everywhere; see docs/topology.md")
    return report


def _plan(args) -> int:
    if args.program:
        return _programs(args)
    if args.topology is None:
        raise UsageError("--topology is required (or --program, which prints the split's programs)")
    topology = load_topology(args.topology)
    inner = inner_command(args.command or ["ranks"])
    check_inner_command(inner[1:], args.root_parser)
    if args.json:
        options.prepare_output(args.json, "--json")
    folder = options.prepare_folder(args.hostfile_dir, "--hostfile-dir")
    stages = None
    if not args.no_layers:
        stages = stage_plan(topology, args.net, args.size, args.profile, bandwidth=args.bandwidth * 1e6)
    report = plan_report(topology, str(folder), inner, args.with_cloud,
                         as_root=hasattr(os, "geteuid") and os.geteuid() == 0, cores=host_cores(), stages=stages)
    print(_summary(topology, report, args.with_cloud, stages))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def _summary(topology: Topology, report: dict, with_cloud: bool, stages: Optional[dict] = None) -> str:
    c, s = topology.clusters, topology.stages
    head = f"{topology.path}: {c} cluster{'s' * (c != 1)} x {s} stage{'s' * (s != 1)} = {topology.size} ranks"
    if topology.description:
        head += f" ({topology.description})"
    lines = [head]
    cloud = report["cloud"]
    if cloud is not None:
        where = (f"rank {cloud['rank']} (last) of this job" if with_cloud else
                 f"not a rank of inference jobs; rank {topology.size} with --with-cloud")
        lines.append(f"cloud: {cloud['host']} ({cloud['address']}): {where}")
    if stages is not None:
        lines.append(f"{stages['net']} at {stages['size']}x{stages['size']}: {len(stages['labels'])} layers cut at "
                     f"{stages['bounds']}, row shares {', '.join(f'{s:.3g}' for s in stages['shares'])}, planned "
                     f"balance {stages['balance_planned']:.3f} (slowest stage over the mean stage; costs: {stages['profile']})")
    lines += ["", format_table(*rank_table(topology, with_cloud, stages)), ""]
    if report["cluster_speeds"] is not None:
        speeds = report["cluster_speeds"]
        total = sum(speeds)
        if stages is not None:  # what the plan does, not what the speeds alone would give
            lines.append("cluster speeds (sum of devices): " + ", ".join(f"{v:g}" for v in speeds)
                         + "; planned shares of the rows: " + ", ".join(f"{v:.1%}" for v in stages["shares"])
                         + " (the slowest stage sets the rate: "
                         + f"{1e3 * max(max(row) for row in stages['times']):.1f} ms/image; cluster 0's master also "
                         "runs the head)")
        else:
            lines.append("cluster speeds (sum of devices; shares of the rows): "
                         + ", ".join(f"{v:g} ({v / total:.1%})" for v in speeds))
    for flavour, label in (("openmpi", "Open MPI"), ("mpich", "MPICH (Hydra)")):
        argv = report["mpiexec"][flavour]
        if argv is None:
            lines.append(f"{label}: no hostfile (see the note below)")
            continue
        lines.append(f"{label}:  {shlex.join(argv)}")
    lines.append(f"or:  aflkd launch --topology {topology.path}{' --with-cloud' if with_cloud else ''} -- "
                 f"aflkd {shlex.join(report['command'])}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
