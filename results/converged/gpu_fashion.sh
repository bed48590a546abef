#!/usr/bin/env bash
# Table 3 on a lent GPU (issue 26): the Fashion-MNIST teacher retrained with the shipped recipe (10 epochs, then
# 4 at max-lr 0.03) on the training split less the validation slice, chosen on it (train select), then the
# SSLF + AFLKD grid on it (nets 2,1 x 4 sizes x seeds 0-2, incremental, 30 epochs), one worker per chain.
#   OUT=... bash results/converged/gpu_fashion.sh     # the four Debian .gz files carried in .dev/fmdata
START=$(date +%s)
R=$(pwd)
OUT=${OUT:?set OUT}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-270}
RESERVE=${RESERVE:-10}
W=${W:-/tmp/aflkd-fashion}
DATA=$W/data
T=$W/teacher
mkdir -p "$OUT" "$DATA/FashionMNIST/raw" "$T"
export AFLKD_CACHE=$W/cache PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$R${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import mpi4py" 2> /dev/null || export PYTHONPATH=$PYTHONPATH:$R/results/converged/mpi4py-standin
LOG=$OUT/log.txt
now() { echo $(( $(date +%s) - START )); }
left() { local l=$(( BUDGET - RESERVE - $(now) )); [ "$l" -lt 1 ] && l=1; echo "$l"; }
say() { echo "[$(now) s] $*" >> "$LOG"; }
aflkd() { timeout -k 5 "$(left)" "$PY" -m launch.cli "$@" >> "$LOG" 2>&1; say "exit status $? of: $*"; }
for f in "${FM:-.dev/fmdata}"/*.gz; do n=$(basename "$f" .gz); [ -f "$DATA/FashionMNIST/raw/$n" ] || gunzip -c "$f" > "$DATA/FashionMNIST/raw/$n"; done
say "data: $(ls "$DATA/FashionMNIST/raw" | tr '\n' ' ')"
C=(--dataset fashion-mnist --data-root "$DATA" --device "$DEVICE" --results "$OUT/teachers.csv")
[ -f "$T/e10.pt" ] || aflkd train cloud "${C[@]}" --val 5000 --epochs 10 --no-progress --save "$T/e10.pt"
[ -f "$T/e14.pt" ] || aflkd train cloud "${C[@]}" --val 5000 --init "$T/e10.pt" --epochs 4 --max-lr 0.03 --no-progress --save "$T/e14.pt"
aflkd train select "${C[@]}" --val 5000 "$T/e10.pt" "$T/e14.pt" --save "$OUT/cloud-fashion-mnist.pt" --force
[ -d "$W/e30" ] || cp -r results/converged/epochs-30 "$W/e30"
aflkd experiment accuracy --dataset fashion-mnist --data-root "$DATA" --teacher "$OUT/cloud-fashion-mnist.pt" --nets 2,1 \
    --sizes 500,1000,2000,3000 --methods aflkd,sslf --seeds 0,1,2 --mode incremental --epochs 30 --min-steps 300 \
    --views 8 --val 5000 --device "$DEVICE" --threads 1 --workers 12 --no-progress --out "$W/e30"
cp "$W"/e30/accuracy-fashion-mnist.csv "$W"/e30/accuracy-fashion-mnist.settings.json "$OUT/" 2> /dev/null
say "rows: $(cat "$W"/e30/accuracy-fashion-mnist.csv 2> /dev/null | wc -l)"
