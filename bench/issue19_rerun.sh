#!/usr/bin/env bash
# Issue 19 follow-up: rerun the README's CIFAR tables after the warm-up fix, one thread, resumable.
# Every cell is a resumable `pancls lt` run folder; rerunning this script skips finished cells.
#   bash bench/issue19_rerun.sh > runs/issue19_rerun.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
DATA=../shared/data/cifar10.npz
grid() { "$PY" scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --data "$DATA" --datasets cifar10 --ratios 100 "$@"; }
# 1. three times longer (36 epochs, lr x0.01 at 30 and 33), the two logit-adjusted recipes
grid --variants softmax_la tsp_kernel_la --seeds 0 --epochs 36 --set 'train.milestones=[30,33]' --out runs/cpu_long_v2
# 2. seed 1 of the heads that only had seed 0
grid --variants cosine tsp_paper --seeds 1 --out runs/cpu_reduced_v2
# 3. the remaining rows of the reduced table, seed 0
grid --variants tsp_kernel_s16 tsp_paper_la tsp_kernel_k4_la softmax_drw tsp_kernel_drw --seeds 0 --out runs/cpu_reduced_v2
# 4. seed 0 of the first rows again (their checkpoints feed the diagnostics; the numbers must repeat)
grid --variants softmax cosine tsp_kernel tsp_paper softmax_la tsp_kernel_la --seeds 0 --out runs/cpu_reduced_v2
# 5. diagnostics of every seed-0 run
"$PY" scripts/tsp_diagnostics.py runs/cpu_reduced_v2/*_s0/ --json runs/cpu_reduced_v2/diagnostics.json \
    > runs/cpu_reduced_v2/diagnostics.md
echo "issue19 rerun: done"
