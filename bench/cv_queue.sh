#!/usr/bin/env bash
# Issue 12 (the longer CPU recipe against the intensity baseline) and issue 16 item 5 (a second seed of the demo
# recipe's head comparison), one thread, resumable: rerunning skips finished variants and resumes a killed fold.
#   nohup nice -n 10 bash bench/cv_queue.sh > runs/cv_queue.log 2>&1 &
# Each finished variant's summary.json and the comparison table are copied into bench/results/ (runs/ does not
# survive a development session); a fresh checkout reprints the table from them without retraining.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=.venv/bin/python
keep() {  # keep <runs folder> <bench/results folder>
  mkdir -p "$2"
  for s in "$1"/*/summary.json; do [ -e "$s" ] && cp "$s" "$2/$(basename "$(dirname "$s")").summary.json"; done
  [ -e "$1/compare.md" ] && cp "$1/compare.md" "$2/compare.md"
  return 0
}
compare() {  # compare <runs folder> <bench/results folder> <variants...> -- <cv_compare arguments...>
  local runs=$1 kept=$2; shift 2
  local variants=(); while [ "$1" != "--" ]; do variants+=("$1"); shift; done; shift
  for v in "${variants[@]}"; do  # one variant per call: each finished one is kept at once
    "$PY" scripts/cv_compare.py --out "$runs" --variants "$v" "$@" > /dev/null
    keep "$runs" "$kept"
  done
  "$PY" scripts/cv_compare.py --out "$runs" --variants "${variants[@]}" "$@"  # the whole table, re-read
  keep "$runs" "$kept"
}
compare runs/cv_compare_long bench/results/cv_compare_long_cpu tsp cosine_la -- --config configs/cv_synth_long_cpu.yaml
compare runs/cv_compare_s1 bench/results/cv_compare_demo_s1 softmax tsp softmax_la tsp_la -- --seed 1
compare runs/cv_compare_long bench/results/cv_compare_long_cpu tsp cosine_la softmax_la -- \
  --config configs/cv_synth_long_cpu.yaml
echo "cv queue: done"
