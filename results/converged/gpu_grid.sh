#!/usr/bin/env bash
# Grid cells on a lent GPU (issue 26): CIFAR-100 (Table 4) seeds 0-2, SSLF + AFLKD at 30 epochs and the
# baseline at 60, on the shipped teacher (checkpoints/cloud-cifar100.pt, chosen on validation), resuming the
# committed CSVs (cells already there are skipped).  Both grids run at once, one worker process per chain
# (21 chains on 16 cores and one GPU), so the slowest chain sets the time.
#
#   OUT=... bash results/converged/gpu_grid.sh      # from the repo root; the three chunks of
#                                                   # cifar100.npz.xz (.dev/pack.py) already in $CHUNKS
# It ends within BUDGET seconds whatever fails; what finished comes back as the two CSVs (and logs) in $OUT.
# Local dry run: PY=.venv/bin/python DEVICE=cpu CHUNKS=... BUDGET=60 OUT=/tmp/o bash results/converged/gpu_grid.sh
START=$(date +%s)
R=$(pwd)
OUT=${OUT:?set OUT}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
RESERVE=${RESERVE:-25}
CHUNKS=${CHUNKS:-/tmp/aflkd-chunks}
W=${W:-/tmp/aflkd-grid}
SIZES=${SIZES:-500,1000,1500,2000,2500,3000,3500,4000,4500,5000}
DATA=$W/data
mkdir -p "$OUT" "$DATA"
export AFLKD_CACHE=$W/cache PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$R${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import mpi4py" 2> /dev/null || export PYTHONPATH=$PYTHONPATH:$R/results/converged/mpi4py-standin
LOG=$OUT/log.txt
: > "$LOG"
now() { echo $(( $(date +%s) - START )); }
left() { local l=$(( BUDGET - RESERVE - $(now) )); [ "$l" -lt 1 ] && l=1; echo "$l"; }
say() { echo "[$(now) s] $*" | tee -a "$LOG"; }

say "start: budget $BUDGET s, device $DEVICE, PYTHONPATH $PYTHONPATH"
{ command -v nvidia-smi > /dev/null && nvidia-smi -L; nproc; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } >> "$LOG" 2>&1
X=$DATA/cifar100.npz.xz
MD5=7ca2141a6b0fdb220a6cb91a84ac240b
[ "$(md5sum < "$X" 2> /dev/null | cut -d' ' -f1)" = "$MD5" ] || cat "$CHUNKS"/c100a.bin "$CHUNKS"/c100b.bin "$CHUNKS"/c100c.bin > "$X"
GOT=$(md5sum < "$X" | cut -d' ' -f1)
[ "$GOT" = "$MD5" ] || { say "FATAL: $X md5 $GOT != $MD5 (are the three chunks in $CHUNKS?)"; exit 1; }
say "data ok"
[ -d "$W/e30" ] || cp -r results/converged/epochs-30 "$W/e30"
[ -d "$W/e60" ] || cp -r results/converged/epochs-60 "$W/e60"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu-use.csv" 2>&1 &
    SMI=$!
fi
COMMON=(--dataset cifar100 --data-root "$DATA" --nets 3,2,1 --sizes "$SIZES" --seeds 0,1,2 --mode incremental
        --views 8 --val 5000 --device "$DEVICE" --threads 1 --no-progress)
say "grids for at most $(left) s"
timeout -k 10 "$(left)" "$PY" -m launch.cli experiment accuracy "${COMMON[@]}" --methods aflkd,sslf --epochs 30 \
    --min-steps 300 --workers 12 --out "$W/e30" > "$OUT/e30.log" 2>&1 &
A=$!
timeout -k 10 "$(left)" "$PY" -m launch.cli experiment accuracy "${COMMON[@]}" --methods baseline --epochs 60 \
    --min-steps 600 --workers 9 --out "$W/e60" > "$OUT/e60.log" 2>&1 &
B=$!
wait "$A"; say "aflkd,sslf grid: exit status $?"
wait "$B"; say "baseline grid: exit status $?"
[ -n "$SMI" ] && kill "$SMI" 2> /dev/null
for e in e30 e60; do
    for f in "$W/$e"/accuracy-cifar100.*; do [ -f "$f" ] && cp "$f" "$OUT/$e-$(basename "$f")"; done
done
say "rows: $(cat "$W"/e30/accuracy-cifar100.csv 2> /dev/null | wc -l) (30 epochs), $(cat "$W"/e60/accuracy-cifar100.csv 2> /dev/null | wc -l) (60 epochs)"
ls -l "$OUT" >> "$LOG"
