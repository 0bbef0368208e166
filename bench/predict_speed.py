"""Speed of ``pancls predict`` on one 512 x 512 x 100 CT study, end to end: read DICOM, preprocess, 4-fold ensemble.

* **cold start** -- ``python -m pancls predict SERIES --model RUN --out X.json`` in a fresh process, timed around
  the subprocess: interpreter start-up, imports, model load (4 checkpoints, ``weights_only``), one study, the
  output file. Median of ``--cold`` runs (the OS page cache is warm after the first).
* **steady state** -- in one process with the model loaded once, the same study predicted ``--runs`` times:
  :func:`pancls.predict.collect_studies` (scan + series choice) and the study's whole
  :func:`pancls.predict.predict` (DICOM decode, the run's MONAI preprocessing, the ensemble). Median, with the
  share of each stage measured separately on the same study.

The study is a synthetic 512 x 512 x 100 series (0.7 x 0.7 x 2.5 mm, 12-bit stored, one file per slice, plus a
localizer in the same folder, as scanners export) written by :mod:`pancls.data.synth_dicom`. The model is the
packaged demo recipe's network (3D ResNet-10 at 1/4 width, tSP head, 2 x 2 x 3 mm, 32 x 32 x 16 ROI) trained for
two epochs per fold on a tiny synthetic cohort: its weights do not matter for speed, its shape does. ROI
``centre`` so that no mask is needed (a ``mask`` ROI adds reading one NIfTI). Goal (issue 15): <= 5 s steady
state on 2 CPU cores.

    python bench/predict_speed.py [--runs 5] [--cold 3] [--work DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_study(folder: Path) -> Path:
    from pancls.data.synth_dicom import write_ct_series

    if folder.exists():
        return folder
    rng = np.random.default_rng(0)
    nx, ny, nz = 512, 512, 100
    image = np.full((nx, ny, nz), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:nx, :ny]
    body = ((xx - 256) / 200.0) ** 2 + ((yy - 256) / 150.0) ** 2 < 1
    image[body] = 40
    image = np.clip(image + rng.integers(-30, 30, size=image.shape, dtype=np.int16), -1024, 3071).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    return write_ct_series(folder, image, affine, "BENCH", seed=0)


def make_run(work: Path) -> Path:
    from pancls import cv
    from pancls.config import load_yaml
    from pancls.data.synth import generate_dataset, load_synth_config

    run = work / "run"
    if (run / "summary.json").exists():
        return run
    cohort = work / "cohort"
    generate_dataset(cohort, load_synth_config(size=[48, 48, 32], spacing=[4.0, 4.0, 4.5], dicom_subset=0),
                     scale=0.01, progress=False, workers=1)
    data = load_yaml(cv.DEMO_CONFIG)
    data["data"] = {"manifest": str(cohort / "manifest.csv"), "cache_dir": str(work / "cache")}
    data["preprocess"]["roi"] = "centre"
    data["train"]["epochs"] = 2
    data["cv"]["inner_folds"] = 3
    data["cv"]["bootstrap"] = 10
    cv.run(cv.load_config(data), run, log=lambda _: None)
    return run


def cold_start(study: Path, run: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pancls", "predict", str(study), "--model", str(run), "--out", str(out)],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def steady_state(study: Path, run: Path, runs: int):
    import torch

    from pancls import predict

    loaded = predict.load_run(run, device="cpu")
    totals, stages = [], {"scan_and_choose": [], "read_volume": [], "preprocess": [], "ensemble": []}
    for i in range(runs + 1):  # the first pass warms up allocator and kernels
        t0 = time.perf_counter()
        studies = predict.collect_studies([study])
        t1 = time.perf_counter()
        results = predict.predict(loaded, studies, progress=False)
        t2 = time.perf_counter()
        assert results[0]["status"] == "ok", results[0]
        if i == 0:
            continue
        totals.append(t2 - t0)
        # the same stages one by one (outside the timed total)
        s = predict.collect_studies([study])[0]
        a = time.perf_counter()
        volume = s.load()
        b = time.perf_counter()
        x, _ = predict.Preprocessor(loaded.cfg.preprocess)(volume, None)
        c = time.perf_counter()
        predict.ensemble(loaded, x[None])
        d = time.perf_counter()
        stages["scan_and_choose"].append(t1 - t0)
        stages["read_volume"].append(b - a)
        stages["preprocess"].append(c - b)
        stages["ensemble"].append(d - c)
    return totals, {k: statistics.median(v) for k, v in stages.items()}, torch.get_num_threads()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cold", type=int, default=3)
    p.add_argument("--work", type=Path, help="folder for the study and the model (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pancls-predict-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    study = make_study(work / "study")
    run = make_run(work)
    cold = [cold_start(study, run, work / f"cold_{i}.json") for i in range(args.cold)]
    totals, stages, threads = steady_state(study, run, args.runs)
    machine = f"{platform.processor() or platform.machine()}, {threads} torch threads, Python {platform.python_version()}"
    result = {"study": "512x512x100 DICOM (+ localizer)", "model": "demo recipe network, 4 folds, ROI centre",
              "cold_start_s": round(statistics.median(cold), 2), "cold_start_runs_s": [round(c, 2) for c in cold],
              "steady_state_s": round(statistics.median(totals), 2), "steady_runs_s": [round(t, 2) for t in totals],
              "stages_s": {k: round(v, 3) for k, v in stages.items()}, "machine": machine}
    print("| stage | seconds |\n|---|---|")
    for k, v in result["stages_s"].items():
        print(f"| {k} | {v:.3f} |")
    print(f"| **steady state, end to end** (median of {args.runs}) | **{result['steady_state_s']:.2f}** |")
    print(f"| cold start (new process, imports, model load, one study; median of {args.cold}) | "
          f"{result['cold_start_s']:.2f} |")
    print(f"\nmachine: {machine}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
