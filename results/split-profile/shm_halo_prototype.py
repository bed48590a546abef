"""Prototype (not product code): is a same-host shared-memory halo path worth building?

Edge net 3's convolutions at 224 (1 channel in, BatchNorm left out), 2 ranks on one host, three ways:
  A  each rank's buffer = own rows + 1 halo row per side; halos by MPI persistent requests (as the executor);
  B  one full map per value in an MPI shared window; each rank writes its own rows there and its conv reads
     own + halo rows in place; a written flag (RAW) and a read flag (WAR) per value and rank, with Win.Sync
     as the memory fence;
  C  the bound: each rank's own rows as a whole image, no exchange.
Both A and B copy each conv's output into the buffer (the executor writes fused chains in place instead), so
their efficiency is lower than the executor's; the A -> B difference is what the prototype measures.
Run: mpiexec -n 2 python results/split-profile/shm_halo_prototype.py   (nothing else running)
"""
import time
import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

torch.set_num_threads(1)
comm = MPI.COMM_WORLD
r, P = comm.Get_rank(), comm.Get_size()
assert P == 2
CL = torch.channels_last
H = W = 224
torch.manual_seed(0)
spec = [(1, 32), (32, 32), (32, 32), "pool", (32, 48), (48, 48), "pool", (48, 80), (80, 80), (80, 80), (80, 80), (80, 80)]
weights = [(torch.randn(o, i, 3, 3) * 0.1, torch.randn(o) * 0.1) if s != "pool" else None for s in spec for (i, o) in [s if s != "pool" else (0, 0)]]

# value k = input of layer k (the conv reads value k with a 1-row halo); layer list of (kind, channels_in, height)
layers = []
h, c = H, 1
for s, w in zip(spec, weights):
    if s == "pool":
        layers.append(("pool", c, h)); h //= 2
    else:
        layers.append(("conv", s[0], h)); c = s[1]
nval = len(layers)


def own_rows(h):
    return (0, h // 2) if r == 0 else (h // 2, h)


# ---- A: MPI persistent, own buffer with 1 halo row each side
bufA, reqsA = [], []
for k, (kind, c, h) in enumerate(layers):
    a, b = own_rows(h)
    w_ = W * h // H
    buf = torch.empty((1, c, b - a + 2, w_), memory_format=CL).zero_()
    bufA.append(buf)
    if kind == "conv":
        peer = 1 - r
        if r == 0:
            send, recv = buf[:, :, b - a: b - a + 1], buf[:, :, b - a + 1: b - a + 2]
        else:
            send, recv = buf[:, :, 1:2], buf[:, :, 0:1]
        reqsA.append((send, recv, peer))
    else:
        reqsA.append(None)


def mpibuf(t):
    n = t.numel() * 4
    return [MPI.buffer.fromaddress(t.data_ptr(), n), MPI.BYTE]


persistent = []
for k, q in enumerate(reqsA):
    if q is None:
        persistent.append(None); continue
    send, recv, peer = q
    # one row, channels-last: contiguous in memory from data_ptr of the view
    persistent.append((comm.Send_init(mpibuf(send), dest=peer, tag=k), comm.Recv_init(mpibuf(recv), source=peer, tag=k)))

# ---- B: shared full map per value, pad row top and bottom; flags
sizes = [(1, c, h + 2, W * h // H) for kind, c, h in layers]
total = sum(int(np.prod(s)) for s in sizes) * 4
win = MPI.Win.Allocate_shared(total if r == 0 else 0, 4, comm=comm)
mem, _ = win.Shared_query(0)
base = np.frombuffer(mem, dtype=np.float32)
fullB, off = [], 0
for s in sizes:
    n = int(np.prod(s))
    t = torch.from_numpy(base[off: off + n]).view(s[0], s[2], s[3], s[1]).permute(0, 3, 1, 2)  # NCHW view, CL memory
    off += n
    fullB.append(t)
if r == 0:
    for t in fullB:
        t.zero_()
fwin = MPI.Win.Allocate_shared(8 * 2 * nval * 2 if r == 0 else 0, 8, comm=comm)
fmem, _ = fwin.Shared_query(0)
flags = np.frombuffer(fmem, dtype=np.int64).reshape(2, nval, 2)  # [rank, value, (written, read)]
if r == 0:
    flags[:] = 0
win.Lock_all(MPI.MODE_NOCHECK)
fwin.Lock_all(MPI.MODE_NOCHECK)
comm.Barrier()


def spin(cond, what):
    deadline = time.monotonic() + 10
    n = 0
    while not cond():
        n += 1
        if n & 1023 == 0 and time.monotonic() > deadline:
            raise RuntimeError(what)
        fwin.Sync()


def convB(x, k):
    w, b = weights[k]
    return F.conv2d(x, w, b, padding=(0, 1))


def pass_A(x):
    """x: own rows of value 0, written into bufA[0]."""
    a, b = own_rows(H)
    bufA[0][:, :, 1: 1 + b - a].copy_(x)
    sends = []
    for k, (kind, c, h) in enumerate(layers):
        buf = bufA[k]
        if kind == "conv":
            s, rr = persistent[k]
            rr.Start(); s.Start(); sends.append(s)
            rr.Wait()
            y = torch.relu_(F.conv2d(buf, weights[k][0], weights[k][1], padding=(0, 1)))
        else:
            y = F.max_pool2d(buf[:, :, 1:-1], 2)
        if k + 1 < nval:
            bufA[k + 1][:, :, 1:-1].copy_(y)
    MPI.Request.Waitall(sends)
    return y


def pass_B(x, n):
    """Pass number n (1, 2, ...)."""
    peer = 1 - r
    for k, (kind, c, h) in enumerate(layers):
        a, b = own_rows(h)
        full = fullB[k]
        if k == 0:
            spin(lambda: flags[peer, 0, 1] >= n - 1, "war")
            full[:, :, 1 + a: 1 + b].copy_(x)
        if kind == "conv":
            win.Sync()
            flags[r, k, 0] = n
            spin(lambda: flags[peer, k, 0] >= n, "raw")
            win.Sync()
            y = torch.relu_(F.conv2d(full[:, :, a: b + 2], weights[k][0], weights[k][1], padding=(0, 1)))
            flags[r, k, 1] = n  # read done
        else:
            y = F.max_pool2d(full[:, :, 1 + a: 1 + b], 2)
        if k + 1 < nval:
            a2, b2 = own_rows(layers[k + 1][2])
            if layers[k + 1][0] == "conv":
                spin(lambda: flags[peer, k + 1, 1] >= n - 1, "war")
            fullB[k + 1][:, :, 1 + a2: 1 + b2].copy_(y)
    return y


def pass_C(x):
    for k, (kind, c, h) in enumerate(layers):
        if kind == "conv":
            x = torch.relu_(F.conv2d(x, weights[k][0], weights[k][1], padding=1))
        else:
            x = F.max_pool2d(x, 2)
    return x


full_in = torch.randn(1, 1, H, W).to(memory_format=CL)
a, b = own_rows(H)
x = full_in[:, :, a:b].contiguous(memory_format=CL)
with torch.no_grad():
    ref = pass_C(full_in)
    ya = pass_A(x)
    nB = 1
    yb = pass_B(x, nB)
    h3 = layers[-1][2] // 2
    own_ref = ref[:, :, :h3] if r == 0 else ref[:, :, h3:]
    print(r, "errA", float((ya - own_ref).abs().max()), "errB", float((yb - own_ref).abs().max()), flush=True)
    times = {"A": [], "B": [], "C": []}
    order = ["A", "B", "C"]
    for rep in range(60):
        for m in order[rep % 3:] + order[:rep % 3]:
            for warm in (0, 1):
                comm.Barrier()
                t0 = time.perf_counter()
                if m == "A":
                    pass_A(x)
                elif m == "B":
                    nB += 1
                    pass_B(x, nB)
                else:
                    pass_C(x)
                dt = time.perf_counter() - t0
            t = comm.allreduce(dt, op=MPI.MAX)
            if rep >= 5:
                times[m].append(t)
if r == 0:
    A, B, C = (np.array(times[k]) for k in "ABC")
    print(f"median ms: A(mpi) {1e3*np.median(A):.3f}  B(shared) {1e3*np.median(B):.3f}  C(bound) {1e3*np.median(C):.3f}")
    print(f"paired eff: A {np.median(C/A):.4f}  B {np.median(C/B):.4f}")
for q in persistent:
    if q is not None:
        q[0].Free(); q[1].Free()
win.Unlock_all(); fwin.Unlock_all()
win.Free(); fwin.Free()
