#!/usr/bin/env python3
"""GPU utilisation in steady state while a pancls command trains (issues 12 and 17: goal >= 80 %).

Runs ``COMMAND`` and samples ``nvidia-smi --query-gpu=utilization.gpu,memory.used`` every ``--interval`` seconds
on every visible GPU. The first ``--skip`` seconds (start-up, preprocessing cache, cuDNN autotuning, the first
epoch) are left out; the report gives the median and the 10th percentile of the remaining samples, the share
of samples at or above the goal, and the peak memory. "Utilisation" is nvidia-smi's: the share of time in
which at least one kernel ran, so it says whether the data path keeps the GPU busy, not how well each kernel
uses it.

    python bench/gpu_utilisation.py --skip 60 --json out.json -- \\
        pancls cv --config pancls/recipes/cv_full.yaml --fold 0 --epochs 3 --out runs/gpu_cv
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

QUERY = ["--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def parse_sample(text: str) -> list:
    """``[(gpu index, utilisation %, memory MiB), ...]`` from one ``nvidia-smi`` answer (lines it cannot read,
    e.g. "[N/A]", are skipped)."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            continue
    return rows


def summarise(samples: list, skip: float, goal: float) -> dict:
    """``samples``: ``[(seconds since start, [(gpu, util, mem), ...]), ...]`` -> per-GPU steady-state figures."""
    per_gpu: dict = {}
    for t, rows in samples:
        for gpu, util, mem in rows:
            entry = per_gpu.setdefault(gpu, {"util": [], "mem": []})
            entry["mem"].append(mem)
            if t >= skip:
                entry["util"].append(util)
    out = {}
    for gpu, entry in sorted(per_gpu.items()):
        util = sorted(entry["util"])
        if not util:
            out[gpu] = {"samples": 0, "note": f"the command ended within the first {skip:g} s"}
            continue
        out[gpu] = {"samples": len(util), "median_util": statistics.median(util),
                    "p10_util": util[int(0.1 * (len(util) - 1))],  # nearest rank from below
                    "share_at_goal": sum(u >= goal for u in util) / len(util), "peak_memory_mib": max(entry["mem"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--skip", type=float, default=60.0, help="seconds of start-up left out of the figures")
    p.add_argument("--goal", type=float, default=80.0)
    p.add_argument("--json", type=Path)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to measure after --")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        print("gpu_utilisation: nvidia-smi not found: this measures a CUDA machine", file=sys.stderr)
        return 2
    samples, stop = [], threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            answer = subprocess.run([smi, *QUERY], capture_output=True, text=True)
            samples.append((time.monotonic() - start, parse_sample(answer.stdout)))
            stop.wait(args.interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = subprocess.run(command).returncode
    stop.set()
    thread.join()
    report = {"command": command, "returncode": rc, "seconds": round(time.monotonic() - start, 1),
              "skip_seconds": args.skip, "goal_percent": args.goal, "gpus": summarise(samples, args.skip, args.goal)}
    for gpu, r in report["gpus"].items():
        if r["samples"]:
            print(f"GPU {gpu}: median {r['median_util']:.0f} %, p10 {r['p10_util']:.0f} %, "
                  f"{100 * r['share_at_goal']:.0f} % of {r['samples']} samples >= {args.goal:g} %, "
                  f"peak memory {r['peak_memory_mib']:.0f} MiB")
        else:
            print(f"GPU {gpu}: {r['note']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
