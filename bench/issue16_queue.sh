#!/usr/bin/env bash
# Issue 16, item 1: paired multi-seed comparison on the reduced protocol at 36 epochs (one thread, resumable).
# Seeds are the outer loop so that every finished seed is a complete pair; rerunning skips finished cells
# and resumes a killed one from its last checkpoint (bit-exact).
#   nohup nice -n 10 bash bench/issue16_queue.sh > runs/issue16_queue.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
DATA=../shared/data/cifar10.npz
grid() { "$PY" scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --data "$DATA" --datasets cifar10 --ratios 100 "$@"; }
E36=(--epochs 36 --set 'train.milestones=[30,33]' --out runs/issue16_r20_e36)
for seed in 0 1 2; do
  grid --variants softmax tsp_kernel_s16 softmax_la tsp_kernel_la --seeds "$seed" "${E36[@]}"
done
for seed in 0 1 2; do
  grid --variants tsp_paper tsp_paper_la --seeds "$seed" "${E36[@]}"
done
echo "issue16 queue: done"
