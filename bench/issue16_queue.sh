#!/usr/bin/env bash
# Issue 16, item 1: paired multi-seed comparison on the reduced protocol at 36 epochs (one thread, resumable).
# Seeds are the outer loop so that every finished seed is a complete pair; rerunning skips finished cells
# and resumes a killed one from its last checkpoint (bit-exact).
#   nohup nice -n 10 bash bench/issue16_queue.sh > runs/issue16_queue.log 2>&1 &
# A development session's checkout starts without runs/: finished cells are kept in bench/results/issue16_r20_e36
# (their results.json, committed) and put back before the grid runs, so only an unfinished cell starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
DATA=${SHARED_DATA:-../shared/data}/cifar10.npz
RUNS=runs/issue16_r20_e36
KEEP=bench/results/issue16_r20_e36
mkdir -p "$RUNS" "$KEEP"
for kept in "$KEEP"/*.json; do
  [ -e "$kept" ] || continue
  cell="$RUNS/$(basename "$kept" .json)"
  [ -e "$cell/results.json" ] || { mkdir -p "$cell"; cp "$kept" "$cell/results.json"; }
done
keep() { for r in "$RUNS"/*/results.json; do [ -e "$r" ] && cp -n "$r" "$KEEP/$(basename "$(dirname "$r")").json"; done; }
grid() {
  "$PY" scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --data "$DATA" --datasets cifar10 --ratios 100 "$@"
  keep
}
E36=(--epochs 36 --set 'train.milestones=[30,33]' --out "$RUNS")
for seed in 0 1 2; do
  for v in softmax tsp_kernel_s16 softmax_la tsp_kernel_la; do grid --variants "$v" --seeds "$seed" "${E36[@]}"; done
done
for seed in 0 1 2; do
  for v in tsp_paper tsp_paper_la; do grid --variants "$v" --seeds "$seed" "${E36[@]}"; done
done
echo "issue16 queue: done"
