#!/usr/bin/env bash
# The controller on a 16-core machine (issue 24): `aflkd control` with one edge of 6 cores (2 ranks: the cloud
# and the edge, 8 CPUs each) and with two edges of 4 cores (3 ranks, 5 CPUs each), each rank on its own block,
# frames uploaded as JPEG at 224 -- what a 2-core machine cannot show (pair rounds, static splits, the
# planner choosing c).  One call on a lent device machine, from the
# repository root, with these carried (ignored paths; see the device tool's README):
#   .dev/wheels        cp312 wheels of mpich and mpi4py:
#                      .venv/bin/pip download mpich mpi4py --python-version 3.12 --only-binary=:all: \
#                          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .dev/wheels
#   .dev/control-data  a small CIFAR-10: .venv/bin/python results/control/pack_control_data.py --out .dev/control-data
# Ends within BUDGET seconds whatever fails; the JSON, plots and log land in $OUT.
# Local dry run (this 2-core machine, the venv's MPI, 1 edge core, a few steps):
#   OUT=/tmp/dc PY=.venv/bin/python MPIEXEC=.venv/bin/mpiexec RUNS="2:1 3:1" STEPS=5 REPEATS=1 BUDGET=300 \
#       bash results/control/device_control.sh
START=$(date +%s)
R=$(pwd)
OUT=${OUT:?set OUT}
PY=${PY:-python3}
BUDGET=${BUDGET:-540}
RUNS=${RUNS:-2:6 3:4}    # ranks:cores per edge
STEPS=${STEPS:-200}
REPEATS=${REPEATS:-3}
DEVICE=${DEVICE:-auto}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
now() { echo $(( $(date +%s) - START )); }
left() { local l=$(( BUDGET - 15 - $(now) )); [ "$l" -lt 1 ] && l=1; echo "$l"; }
say() { echo "[$(now) s] $*" | tee -a "$LOG"; }

export PYTHONPATH=$R${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export AFLKD_CACHE=$R/.dev/cache HYDRA_LAUNCHER=fork
if ! "$PY" -c "import mpi4py" 2> /dev/null; then
    say "installing the carried wheels: $(ls .dev/wheels 2> /dev/null | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps .dev/wheels/*.whl >> "$LOG" 2>&1 || say "wheel install failed"
fi
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
MPIEXEC=${MPIEXEC:-$BIN/mpiexec}
{ nproc; command -v nvidia-smi > /dev/null && nvidia-smi -L
  "$PY" -c "import torch, mpi4py; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'mpi4py', mpi4py.__version__)"
} >> "$LOG" 2>&1
UPLOAD=jpeg
"$PY" -c "from torchvision.io import encode_jpeg" 2> /dev/null || { UPLOAD=raw; say "no torchvision JPEG here: raw frames"; }
PLOT=1
"$PY" -c "import matplotlib" 2> /dev/null || { PLOT=0; say "no matplotlib here: no plots"; }
DATA=.dev/control-data
[ -f "$DATA/cifar10.npz.xz" ] || DATA=../shared/data
say "start: budget $BUDGET s, runs '$RUNS', $STEPS steps x $REPEATS, upload $UPLOAD, data $DATA, mpiexec $MPIEXEC"
for RUN in $RUNS; do
    N=${RUN%%:*}; C=${RUN##*:}
    [ "$(left)" -gt 30 ] || { say "no time left for $N ranks, C=$C"; break; }
    J=$OUT/control-upload-$UPLOAD-n$N-c$C.json
    EXTRA=()
    [ "$PLOT" = 1 ] && EXTRA=(--plot "$OUT/control-upload-$UPLOAD-n$N-c$C.png")
    say "$N ranks, C=$C: at most $(left) s"
    timeout -k 10 "$(left)" "$MPIEXEC" -n "$N" -host localhost "$PY" -m launch.cli control --dataset cifar10 \
        --data-root "$DATA" --net 3 --size 500 --steps "$STEPS" --repeats "$REPEATS" --control-cores "$C" \
        --policies none,priority,planner,static --upload "$UPLOAD" --frame-size 224 --device "$DEVICE" \
        --json "$J" "${EXTRA[@]}" > "$OUT/control-n$N-c$C.txt" 2>&1
    say "$N ranks, C=$C: exit status $? ($(grep -c 'ms/step' "$OUT/control-n$N-c$C.txt") runs)"
done
say "done"
