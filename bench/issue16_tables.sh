#!/usr/bin/env bash
# Issue 16: every table and paired figure of docs/reproduction.md (tables A) rebuilt from the committed results
# (bench/results/issue16_*/<cell>.json), training nothing: `scripts/lt_grid.py --kept`. Cells not finished yet
# are left out of their table (a pair needs both sides of a seed). Writes bench/results/issue16_tables.md and
# bench/results/issue16_pairs_*.png.
#   bash bench/issue16_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=bench/results
OUT=$R/issue16_tables.md
grid() {  # grid <title> <kept folder[:folder...]> <figure name> <label> <lt_grid arguments...>
  local title=$1 kept=$2 figure=$3 label=$4 dirs dir; shift 4
  IFS=: read -ra dirs <<< "$kept"  # several folders: a cell from the first that holds it
  for dir in "${dirs[@]}"; do
    [ -d "$dir" ] || { printf '## %s\n\nnot run yet (%s)\n\n' "$title" "$dir" >> "$OUT.tmp"; return 0; }
  done
  printf '## %s\n\n`%s`\n\n' "$title" "$kept" >> "$OUT.tmp"
  local rc=0  # lt_grid exits 1 when no pair has both sides of a seed yet: the table is written, the figure is not
  "$PY" scripts/lt_grid.py --config configs/lt_cpu_reduced.yaml --kept "${dirs[@]}" --figure "$R/issue16_pairs_$figure.png" \
    --label "$label" --no-published "$@" >> "$OUT.tmp" || rc=$?
  [ "$rc" -le 1 ] || exit "$rc"
  if [ "$rc" -eq 0 ]; then printf '\n![%s](issue16_pairs_%s.png)\n\n' "$title" "$figure" >> "$OUT.tmp"; else echo >> "$OUT.tmp"; fi
}
printf '# Issue 16 tables, rebuilt from the kept results by bench/issue16_tables.sh\n\n%s\n\n' \
  "Top-1 % of the last epoch on the balanced CIFAR-10 test set; CIFAR-10-LT IR 100 (LDAM-DRW's subset); one CPU thread per run. The machine of each cell is in its results.json (provenance.device; seeds 0-1 of the first table ran on an AMD EPYC VM, everything later on an Intel Xeon VM). Published for context, not run here: tSP (Yang et al. 2023, ResNet-32, 200 epochs) 84.5; CE (Cao et al. 2019) 70.4." > "$OUT.tmp"
MAIN=(--variants softmax tsp_kernel_s16 softmax_la tsp_kernel_la --seeds 0 1 2
      --pairs softmax:tsp_kernel_s16 softmax_la:tsp_kernel_la)
grid "Reduced protocol (ResNet-20 x 0.5), 36 epochs, float32" $R/issue16_r20_e36 e36 "36 ep" "${MAIN[@]}"
# without augmentation the LA pair has seeds 3-5 as well (bench/issue16_queue.sh noaug_la_more)
grid "Reduced protocol, 36 epochs, no augmentation (item 2)" $R/issue16_r20_e36_noaug noaug "36 ep, no aug" \
  --variants softmax tsp_kernel_s16 softmax_la tsp_kernel_la --seeds 0 1 2 3 4 5 \
  --pairs softmax:tsp_kernel_s16 softmax_la:tsp_kernel_la
grid "cRT stage 2 on the frozen seed-s softmax backbone, 10 epochs, class-balanced (item 3; seed 2 in the e36 folder)" \
  $R/issue16_r20_e36 crt_s2 "cRT" --variants crt_softmax crt_tsp --seeds 2 --pairs crt_softmax:crt_tsp
grid "cRT stage 2, seeds 0-1 (stage 1 retrained on the Intel VM)" $R/issue16_r20_e36_crt crt "cRT" \
  --variants crt_softmax crt_tsp --seeds 0 1 --pairs crt_softmax:crt_tsp
grid "cRT stage 2, seeds 0-2 together (the paired verdict of docs/reproduction.md)" \
  $R/issue16_r20_e36_crt:$R/issue16_r20_e36 crt3 "cRT" --variants crt_softmax crt_tsp --seeds 0 1 2 \
  --pairs crt_softmax:crt_tsp
grid "Recipes for tSP (item 3), 36 epochs, against tSP + LA and softmax + LA" $R/issue16_r20_e36 recipes "36 ep" \
  --variants softmax softmax_la tsp_kernel_s16 tsp_kernel_la tsp_kernel_learnk_la tsp_kernel_learnk \
  tsp_kernel_fix16_la tsp_paper tsp_paper_la tsp_paper_nu7 tsp_paper_nu7_la --seeds 0 1 2 \
  --pairs tsp_kernel_la:tsp_kernel_learnk_la softmax_la:tsp_kernel_learnk_la tsp_paper_nu7_la:tsp_kernel_learnk_la \
  tsp_paper_nu7:tsp_kernel_learnk tsp_kernel_s16:tsp_kernel_learnk \
  softmax:tsp_kernel_learnk tsp_kernel_la:tsp_kernel_fix16_la softmax_la:tsp_kernel_fix16_la \
  tsp_kernel_la:tsp_paper_la tsp_kernel_la:tsp_paper_nu7_la softmax_la:tsp_paper_nu7_la \
  tsp_kernel_s16:tsp_paper_nu7 softmax:tsp_paper_nu7
grid "bf16 autocast, 36 epochs, seed 0 (against the float32 cells of the first table)" $R/issue16_r20_e36_bf16 \
  bf16 "36 ep, bf16" --variants softmax tsp_kernel_s16 --seeds 0 --pairs softmax:tsp_kernel_s16
# the longer runs: each head's best recipe at 36 epochs first (bench/issue16_queue.sh runs them first)
LONG=(--variants softmax_la tsp_paper_nu7_la softmax tsp_paper_nu7 tsp_kernel_la tsp_kernel_s16 --seeds 0 1 2
      --pairs softmax_la:tsp_paper_nu7_la softmax:tsp_paper_nu7 softmax_la:tsp_kernel_la softmax:tsp_kernel_s16)
grid "Reduced protocol, 72 epochs, bf16" $R/issue16_r20_e72_bf16 e72 "72 ep, bf16" "${LONG[@]}"
grid "ResNet-32, 30 epochs, bf16 + channels-last" $R/issue16_r32_e30_bf16 r32 "ResNet-32, 30 ep, bf16" "${LONG[@]}"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
