#!/usr/bin/env bash
# `bash .dev/gpu_run.sh smoke`: only the synthetic smoke test (.dev/smoke.py), no dataset needed.
# One run on the lent GPU: `bash .dev/gpu_run.sh` from the repo root, OUT set, the three chunks of
# cifar100.npz.xz already under .dev/a, .dev/b, .dev/c (one call each).  Ends within BUDGET seconds (540),
# whatever fails or times out; rerun on a warm machine, it skips what is done and resumes the rest.
#   a) data reassembled and md5-checked; GPU, torch and CUDA versions
#   b) CUDA check: one student cell on cuda with the shipped teacher (in the background, beside c)
#   c) the CIFAR-100 teacher chain of results/teachers.csv, retrained with --val 5000, then the best of its
#      candidates on the validation slice (train select)
#   d) if time remains: the student grid (nets 3,2,1 x 10 sizes x aflkd,sslf, incremental) on the new teacher
#   e) at most 8 files into $OUT, each < 16 MiB
# Overrides for a local dry run (never needed on the device): PY, DEVICE, BUDGET, E (epochs of the five
# stages), CHECK_EPOCHS, CHECK_MIN_STEPS, GRID_SIZES, GRID_EPOCHS, GRID_MIN_STEPS, VIEWS, VAL, WORKERS, THREADS, SELECT_S,
# STUB=1 (use the mpi4py stand-in even where mpi4py is installed).
# No `set -e`: every step is timed out and checked on its own.

START=$(date +%s)
MODE=${1:-run}                          # run | smoke (first call: .dev/smoke.py only, no dataset needed)
R=$(pwd)
OUT=${OUT:?set OUT}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
RESERVE=${RESERVE:-40}                 # seconds kept for step e
read -r -a E <<< "${E:-30 30 30 10 10}" # the shipped recipe's stages: 30, +30 at 0.05, +30 at 0.04, +10 at 0.02, +10 at 0.02
CHECK_EPOCHS=${CHECK_EPOCHS:-30}
CHECK_MIN_STEPS=${CHECK_MIN_STEPS:-300}
GRID_SIZES=${GRID_SIZES:-500,1000,1500,2000,2500,3000,3500,4000,4500,5000}
GRID_EPOCHS=${GRID_EPOCHS:-30}
GRID_MIN_STEPS=${GRID_MIN_STEPS:-300}
VIEWS=${VIEWS:-8}
VAL=${VAL:-5000}
WORKERS=${WORKERS:-8}
THREADS=${THREADS:-2}
SELECT_S=${SELECT_S:-60}                # train select: six evaluations of 5000 images (seconds on a GPU)
SMOKE_S=${SMOKE_S:-90}                  # `smoke` mode: .dev/smoke.py

DEV=$R/.dev
DATA=$DEV/data                  # --data-root
W=$DEV/work                     # everything the run writes (kept on a warm machine between calls)
T=$W/teacher                    # the chain's checkpoints
mkdir -p "$OUT" "$DATA" "$W" "$T"
export AFLKD_CACHE=$DEV/cache   # the decompressed npz (kept between calls too)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$R${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt
: > "$LOG"

now() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - RESERVE - $(now) )); }   # seconds before step e must start
atleast1() { if [ "$1" -lt 1 ]; then echo 1; else echo "$1"; fi; }
say() { echo "[$(now) s] $*"; }
aflkd() { "$PY" -m launch.cli "$@"; }                # the console script `aflkd` (setup.py), not installed here

steps() {
say "start: budget $BUDGET s, device $DEVICE, python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

# ---------------------------------------------------------------- a) versions, mpi4py stand-in, data
command -v nvidia-smi > /dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; free -g | head -2
"$PY" - <<'EOF'
import sys, torch, torchvision, numpy
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"available {torch.cuda.is_available()}, devices {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}, "
          f"capability {torch.cuda.get_device_capability(0)}")
try:
    import mpi4py  # noqa: F401
    print("mpi4py: installed")
except ImportError:
    print("mpi4py: not installed (a stand-in is put on PYTHONPATH)")
EOF
if [ -n "$STUB" ] || ! "$PY" -c "import mpi4py.MPI" 2> /dev/null; then
    # runtime/__init__ and runtime/transport.py import mpi4py; nothing here calls MPI (the stand-in's files)
    S=$R/results/converged/mpi4py-standin
    [ -n "$STUB" ] && export PYTHONPATH=$S:$PYTHONPATH || export PYTHONPATH=$PYTHONPATH:$S
    say "mpi4py stand-in on PYTHONPATH: $PYTHONPATH"
fi
if [ "$MODE" = smoke ]; then   # first call: synthetic CUDA smoke test and speed of a CIFAR-100-sized epoch
    say "smoke test (synthetic data) for at most $SMOKE_S s"
    timeout -k 5 "$SMOKE_S" "$PY" .dev/smoke.py "$DEVICE"
    say "smoke: exit status $?"
    return 0
fi
X=$DATA/cifar100.npz.xz
MD5=7ca2141a6b0fdb220a6cb91a84ac240b
if [ "$(md5sum < "$X" 2>/dev/null | cut -d' ' -f1)" != "$MD5" ]; then
    ls -l "$DEV"/a "$DEV"/b "$DEV"/c 2>&1
    cat "$DEV/a/c100a.bin" "$DEV/b/c100b.bin" "$DEV/c/c100c.bin" > "$X.tmp" && mv "$X.tmp" "$X"
fi
GOT=$(md5sum < "$X" 2>/dev/null | cut -d' ' -f1)
if [ "$GOT" != "$MD5" ]; then
    say "FATAL: $X md5 ${GOT:-missing} != $MD5 (are the three chunks there?)"
    return 1
fi
say "data: $X md5 ok ($(stat -c %s "$X") bytes)"
timeout -k 5 120 "$PY" -c "
import time; t = time.time()
from kd.datasets import load_dataset
d = load_dataset('cifar100', '$DATA')
print(f'cifar100 loaded: train {d.x_train.shape}, test {d.x_test.shape}, {time.time() - t:.1f} s')" || say "dataset load failed ($?)"
aflkd train select --help > /dev/null && say "cli imports ok" || say "cli import FAILED"

if command -v nvidia-smi > /dev/null; then  # GPU use every 5 s, for planning later runs
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$W/gpu-use.csv" 2>&1 &
    SMI=$!
fi

# ---------------------------------------------------------------- b) CUDA check (background, beside c)
say "b) CUDA check: one student cell (net 3, 500 images, aflkd, static) with the shipped teacher"
( timeout -k 5 150 "$PY" -m launch.cli experiment accuracy --dataset cifar100 --data-root "$DATA" --nets 3 --sizes 500 \
    --methods aflkd --seeds 0 --mode static --epochs "$CHECK_EPOCHS" --min-steps "$CHECK_MIN_STEPS" --views "$VIEWS" \
    --val "$VAL" --device "$DEVICE" --no-progress --out "$W/cudacheck" > "$W/cudacheck.log" 2>&1
  echo "exit status $?" >> "$W/cudacheck.log" ) &
CHECK=$!

# ---------------------------------------------------------------- c) the teacher chain, then the choice on validation
say "c) teacher chain (epochs ${E[*]}), --val $VAL, then train select"
timeout -k 10 "$(atleast1 $(( $(left) - 45 )))" "$PY" - "$DATA" "$T" "$W/teachers.csv" "$DEVICE" "$VAL" "${E[@]}" <<'EOF'
"""The chain in one process (one start-up instead of six); each stage is the command it records, and is
skipped once done (a .done file), so a rerun resumes at the stage a timeout cut off."""
import os, sys, time
from launch.cli import main
data, t, results, device, val = sys.argv[1:6]
e = [int(v) for v in sys.argv[6:11]]
common = ["--dataset", "cifar100", "--data-root", data, "--device", device, "--results", results]
stages = [("e1", ["--epochs", str(e[0])]),
          ("e2", ["--init", f"{t}/e1.pt", "--epochs", str(e[1]), "--max-lr", "0.05"]),
          ("e3", ["--init", f"{t}/e2.pt", "--epochs", str(e[2]), "--max-lr", "0.04"]),
          ("e4", ["--init", f"{t}/e3.pt", "--epochs", str(e[3]), "--max-lr", "0.02"]),
          ("e5", ["--init", f"{t}/e4.pt", "--epochs", str(e[4]), "--max-lr", "0.02"])]
for name, extra in stages:
    out = f"{t}/{name}.pt"
    if os.path.exists(out + ".done"):
        print(f"{name}: done before", flush=True)
        continue
    began = time.time()
    code = main(["train", "cloud", *common, "--val", val, "--no-progress", "--out", out, *extra])
    print(f"{name}: exit {code}, {time.time() - began:.0f} s", flush=True)
    if code != 0:
        sys.exit(code)
    open(out + ".done", "w").close()
if not os.path.exists(f"{t}/avg.pt.done"):
    code = main(["train", "average", *common, "--val", val, f"{t}/e3.pt", f"{t}/e4.pt", f"{t}/e5.pt",
                 "--out", f"{t}/avg.pt", "--force"])
    if code != 0:
        sys.exit(code)
    open(f"{t}/avg.pt.done", "w").close()
EOF
say "chain: exit status $?"
CANDS=()
for n in e1 e2 e3 e4 e5 avg; do [ -f "$T/$n.pt.done" ] && CANDS+=("$T/$n.pt"); done
NEW=$W/cloud-cifar100-val$VAL.pt
if [ ${#CANDS[@]} -gt 0 ] && [ "$(left)" -gt 15 ]; then
    say "select among ${#CANDS[@]} finished candidate(s)"
    timeout -k 5 "$(( $(left) < SELECT_S ? $(left) : SELECT_S ))" "$PY" -m launch.cli train select --dataset cifar100 --data-root "$DATA" \
        --val "$VAL" "${CANDS[@]}" --out "$NEW" --results "$W/teachers.csv" --device "$DEVICE" --force
    say "select: exit status $?"
else
    say "no finished stage to select from (or no time left)"
fi
wait "$CHECK"
say "b) CUDA check log:"
cat "$W/cudacheck.log"

# ---------------------------------------------------------------- d) the student grid on the new teacher
if [ -f "$W/teacher/avg.pt.done" ] && [ -f "$NEW" ] && [ "$(left)" -gt 60 ]; then
    say "d) student grid on $NEW for $(left) s at most (resumable: finished cells and chain students are kept)"
    timeout -k 10 "$(left)" "$PY" -m launch.cli experiment accuracy --dataset cifar100 --data-root "$DATA" --teacher "$NEW" \
        --nets 3,2,1 --sizes "$GRID_SIZES" --methods aflkd,sslf --seeds 0 --mode incremental --epochs "$GRID_EPOCHS" \
        --min-steps "$GRID_MIN_STEPS" --views "$VIEWS" --val "$VAL" --device "$DEVICE" --workers "$WORKERS" \
        --threads "$THREADS" --no-progress --out "$W/grid"
    say "grid: exit status $?"
else
    say "d) grid skipped: the chain is not finished or fewer than 60 s are left ($(left) s)"
fi
[ -n "$SMI" ] && kill "$SMI" 2> /dev/null
return 0
}

# ---------------------------------------------------------------- e) results: at most 8 files, each < 16 MiB
collect() {
if [ "$MODE" = smoke ]; then ls -l "$OUT"; return 0; fi
say "e) collecting into $OUT"
timeout -k 5 20 "$PY" - "$T" "$W/histories.json" <<'EOF'
"""Each stage's options and per-epoch history (the .state files hold them beside weights too big to send)."""
import glob, json, os, sys
import torch
t, out = sys.argv[1:3]
kept = {}
for path in sorted(glob.glob(f"{t}/*.pt.state")):
    s = torch.load(path, map_location="cpu", weights_only=False)
    kept[os.path.basename(path)[:-6]] = {"config": s["config"], "epoch": s["epoch"], "history": s["history"]}
json.dump(kept, open(out, "w"), indent=1)
print(f"histories of {len(kept)} stage(s) -> {out}")
EOF
(cd "$W" && tar czf "$OUT/work.tar.gz" --exclude='*.npz' --exclude='*.pt' --exclude='*.state' --exclude='chains' \
    --exclude='*.done' --exclude='*.tmp' . 2>&1 | head -5)
NEW=$W/cloud-cifar100-val$VAL.pt
[ -f "$NEW" ] && cp "$NEW" "$OUT/"
cp "$W/cudacheck/accuracy-cifar100.csv" "$OUT/cudacheck.csv" 2> /dev/null
i=0
for pair in "e1 e2" "e3 e4" "e5 avg"; do   # every candidate of the chain, two to a file
    i=$((i + 1))
    files=()
    for n in $pair; do [ -f "$T/$n.pt" ] && files+=("$n.pt"); done
    [ ${#files[@]} -gt 0 ] && (cd "$T" && tar cf "$OUT/candidates-$i.tar" "${files[@]}")
done
for f in "$OUT"/*; do
    if [ "$(stat -c %s "$f")" -ge 16000000 ]; then say "$f is too big to come back: removed"; rm -f "$f"; fi
done
ls -l "$OUT"
say "end: $(ls "$OUT" | wc -l) file(s) in OUT"
}

steps 2>&1 | tee -a "$LOG"
collect 2>&1 | tee -a "$LOG"
