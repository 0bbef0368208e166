#!/usr/bin/env bash
# Issue 16: is tSP's deficit the engine's doing? The issue-19 recipe (ResNet-32, CE, 15 epochs, seed 0,
# configs/lt_issue19_softmax.yaml) with the tSP kernel head at scale 16, trained by the engine (pancls lt) and by
# the independent minimal trainer (bench/reference_lt.py --head tsp, its own tSP head from the formula). The
# softmax halves of the comparison are issue 19's (bench/results/issue19/). One thread each, one after the other;
# a finished half is kept in bench/results/issue16_reference/ and skipped on a rerun.
#   nohup nice -n 10 bash bench/issue16_reference.sh > runs/issue16_reference.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
DATA=${SHARED_DATA:-../shared/data}/cifar10.npz
KEEP=bench/results/issue16_reference
mkdir -p "$KEEP" runs/issue16_reference
if [ ! -e "$KEEP/reference_tsp_s0.json" ]; then
  "$PY" bench/reference_lt.py --data "$DATA" --epochs 15 --seed 0 --head tsp --out runs/issue16_reference/reference_tsp_s0.json
  cp runs/issue16_reference/reference_tsp_s0.json "$KEEP/"
fi
if [ ! -e "$KEEP/engine_tsp_s0.json" ]; then
  "$PY" -m pancls lt --config configs/lt_issue19_softmax.yaml --data "$DATA" --head tsp --seed 0 \
    --set model.head_kwargs.form=kernel --set model.head_kwargs.scale_init=16.0 \
    --out runs/issue16_reference/engine_tsp_s0 --resume
  cp runs/issue16_reference/engine_tsp_s0/results.json "$KEEP/engine_tsp_s0.json"
fi
echo "issue16 reference: done"
