"""Where a split pass spends its time beyond the bound: every instruction of both executors timed, per kind.

Run (grid paused, nothing else running):
    mpiexec -n 2 .venv/bin/python results/split-profile/instruction_profile.py [NET] [SIZE] [PASSES] [CHANNELS]

Each rank runs the split executor (halo exchange, over COMM_WORLD) and the bound executor (its own rows
as a whole image, COMM_SELF) alternately, as ``aflkd bench layers`` does, every timed pass after an
untimed one.  Printed per rank: the medians of the two passes and, per kind of instruction, the summed
medians of its instructions in each.  The difference per kind is what the split costs beyond the bound.
"""
import collections
import sys
import time
from statistics import median

import torch

from models.zoo import build_model
from models.vgg import randomize_batchnorm
from runtime import transport as mpi
from runtime.allocator import keep_freed_maps
from runtime.graph import trace_model
from runtime.plan import plan_split
from runtime.split import SplitExecutor


def timed_steps(executor, local, record):
    """Wrap each of the executor's split steps so that its time lands in ``record[(kind, node)]``."""
    executor.forward_local(local.clone(memory_format=torch.channels_last))  # builds the steps
    wrapped = []
    for ins, step in zip(executor.program.split, executor._split_steps):
        key = (type(ins).__name__, getattr(ins, "node", None) or getattr(ins, "value", None) or "")

        def run(env, clock, step=step, key=key):
            start = time.perf_counter()
            step(env, clock)
            record[key].append(time.perf_counter() - start)
        wrapped.append(run)
    executor._split_steps = wrapped


def main() -> None:
    net = sys.argv[1] if len(sys.argv) > 1 else "edge3"
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    passes = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    channels = int(sys.argv[4]) if len(sys.argv) > 4 else 3  # bench layers' --in-channels default
    keep_freed_maps()
    torch.set_num_threads(1)
    comm = mpi.COMM_WORLD
    rank = comm.Get_rank()
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(net, channels, size)).eval()
    split = SplitExecutor.build(model, (channels, size, size), comm)
    rows = len(split.plan.input_rows[rank])
    bound = SplitExecutor(plan_split(trace_model(model, (channels, rows, size), split_part_only=True), [1.0]), model,
                          mpi.COMM_SELF, head=False)
    image = torch.randn(1, channels, size, size) if rank == 0 else None
    local = mpi.scatter_rows(comm, image, split.plan.input_rows, (channels, size, size), 1)
    records = {"split": collections.defaultdict(list), "bound": collections.defaultdict(list)}
    timed_steps(split, local, records["split"])
    timed_steps(bound, local, records["bound"])
    totals = {"split": [], "bound": []}
    with torch.no_grad():
        for i in range(passes):
            for phase in ("split", "bound") if i % 2 == 0 else ("bound", "split"):
                executor = split if phase == "split" else bound
                x = local.clone(memory_format=torch.channels_last)
                executor.forward_local(x)  # untimed
                mpi.barrier(comm)
                start = time.perf_counter()
                executor.forward_local(x)
                totals[phase].append(time.perf_counter() - start)
                mpi.barrier(comm)
    kinds = {}
    for phase, record in records.items():
        per_kind = collections.defaultdict(float)
        for (kind, _), times in record.items():
            per_kind[kind] += 1e3 * median(times) * len(times) / (2 * passes)  # per pass (steps run twice)
        kinds[phase] = per_kind
    mine = (rank, 1e3 * median(totals["split"]), 1e3 * median(totals["bound"]), kinds)
    for rank_, split_ms, bound_ms, per in mpi.gather_objects(comm, mine, root=0) or []:
        print(f"rank {rank_}: split {split_ms:.2f} ms, bound {bound_ms:.2f} ms (medians of {passes} passes)")
        for kind in sorted(set(per["split"]) | set(per["bound"])):
            s, b = per["split"].get(kind, 0.0), per["bound"].get(kind, 0.0)
            print(f"    {kind:10s} split {s:7.3f} ms  bound {b:7.3f} ms  extra {s - b:+.3f}")


if __name__ == "__main__":
    main()
