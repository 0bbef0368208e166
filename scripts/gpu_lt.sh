#!/usr/bin/env bash
# The GPU half of the CIFAR-LT benchmark: the full LDAM-DRW recipe (200 epochs, ResNet-32) for several
# head/loss variants, on one CUDA device, with CUDA graphs (torch.compile mode=reduce-overhead) and bf16.
#
# Prepare on the development machine (the device copies only the repo, 64 MiB at most):
#     make carry                      # writes carry/cifar10_lt_ir100.npz (~47 MB: the IR-100 subset + test set)
# Run on the GPU machine, from the repo root (it needs torch, numpy, pyyaml, tqdm, pillow, matplotlib, sklearn):
#     bash scripts/gpu_lt.sh carry/cifar10_lt_ir100.npz "$OUT"
# Environment: EPOCHS (200), VARIANTS ("softmax softmax_la tsp_paper_nu7 tsp_paper_nu7_la tsp_kernel tsp_kernel_la"),
# SEEDS (0), DEVICE (cuda). The paper form with nu = 7 is the tSP recipe level with softmax on the CPU protocols
# (issue 16), first after softmax: a run cut short by the device time still has the pairs that matter most.
set -euo pipefail
DATA=${1:?usage: gpu_lt.sh DATA.npz [OUT]}
OUT=${2:-runs/gpu}
EPOCHS=${EPOCHS:-200}
VARIANTS=${VARIANTS:-"softmax softmax_la tsp_paper_nu7 tsp_paper_nu7_la tsp_kernel tsp_kernel_la"}
SEEDS=${SEEDS:-0}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    COMPILE=reduce-overhead
else
    COMPILE=off
fi
# shellcheck disable=SC2086
"$PY" scripts/lt_grid.py --config configs/lt_ldam_drw.yaml --data "$DATA" --datasets cifar10 --ratios 100 \
    --variants $VARIANTS --seeds $SEEDS --epochs "$EPOCHS" --device "$DEVICE" \
    --set train.compile=$COMPILE --set train.progress=false --out "$OUT" | tee "$OUT/table.md"
# seconds per epoch (median over epochs 2.., the first includes compilation) for the README
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    secs = [json.loads(line)["seconds"] for line in run.read_text().splitlines()]
    if len(secs) > 1:
        print(f"{run.parent.name}: median {statistics.median(secs[1:]):.2f} s/epoch (first epoch {secs[0]:.1f} s), {len(secs)} epochs")
PY
