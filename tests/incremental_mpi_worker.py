"""Run under ``mpiexec -n 2``: rank 0 the cloud (stand-in logits), rank 1 the edge (camera + updates).

``python tests/incremental_mpi_worker.py FOLDER [--cloud-dies-at N] [--edge-dies-at STEP] [--cloud-stalls]
[--timeout S] [--pace S]``: each rank writes ``FOLDER/rankR.pid`` once it is ready, so a test can kill either
at a random moment; the flags kill a rank at a chosen point instead (cloud: inside its Nth request,
after the images arrived and before the logits went back; --cloud-stalls: the cloud process
freezes there, SIGSTOP, so its heartbeats stop too).  The edge uses the same buffer and
counting student as the single-process kill test (``tests/incremental_harness.py``).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpi4py import MPI  # noqa: E402

from kd.incremental import CloudLink, serve_cloud  # noqa: E402
from runtime.transport import PeerTimeout  # noqa: E402
from tests import incremental_harness as h  # noqa: E402

ROUNDS = [list(range(r * 7, r * 7 + 7)) for r in range(6)]
INCREMENT = 5


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--cloud-dies-at", type=int, default=0)
    parser.add_argument("--edge-dies-at", default=None)
    parser.add_argument("--cloud-stalls", action="store_true")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds each update sleeps (a kill lands mid-run)")
    args = parser.parse_args()
    comm, folder = MPI.COMM_WORLD, Path(args.folder)
    rank = comm.Get_rank()
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    try:
        if rank == 0:
            calls = [0]

            def logits_of(images):
                calls[0] += 1
                if calls[0] == args.cloud_dies_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if args.cloud_stalls:  # the whole process freezes (heartbeat thread too), as on a hung machine;
                    os.kill(os.getpid(), signal.SIGSTOP)  # a teacher that is merely slow keeps beating instead
                return h.cloud_logits(images)

            serve_cloud(comm, 1, logits_of, args.timeout)
        else:
            link = CloudLink(comm, 0, args.timeout)
            from kd.buffer import Buffer
            from kd.incremental import run_updates

            def paced(*update_args):
                time.sleep(args.pace)
                return h.counting_update(*update_args)

            with Buffer(str(folder / "b.sqlite"), h.SHAPE) as buffer:
                fault = h.KillAt(args.edge_dies_at, 1) if args.edge_dies_at else (lambda s: None)
                for serials in ROUNDS:
                    buffer.append(h.images_for(serials), keys=[f"frame-{s}" for s in serials])
                    with open(folder / "acked", "a") as fh:
                        fh.write("".join(f"{s}\n" for s in serials))
                        fh.flush()
                        os.fsync(fh.fileno())
                    run_updates(buffer, str(folder / "s.pt"), link, paced, INCREMENT, fault=fault)
            link.close()
    except PeerTimeout as err:
        print(f"aflkd: error: {err}; the peer rank is dead or stalled, exiting (the buffer is kept)",
              file=sys.stderr, flush=True)
        os._exit(3)  # no MPI_Finalize: it would wait for the dead peer
    return 0


if __name__ == "__main__":
    sys.exit(main())
