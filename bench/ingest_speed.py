"""Speed of reading one DICOM series into a volume: pancls vs SimpleITK vs dcm2niix.

Each measurement runs in a fresh process (no warm imports or caches inside the interpreter; the OS
page cache is warm after the first run, the same for all three). Timed work:

* ``pancls``   -- :func:`pancls.ct.scan.scan` (headers of every file in the folder) +
  :func:`pancls.ct.select.select_series` + :func:`pancls.ct.volume.build_volume` of the chosen
  series, in memory (no NIfTI written). Timed inside the child, after imports.
* ``SimpleITK`` -- ``ImageSeriesReader.GetGDCMSeriesFileNames`` + ``Execute``, in memory; timed
  inside the child, after imports.
* ``dcm2niix`` -- ``dcm2niix -z n`` on the folder, writing uncompressed NIfTI to a temp folder (it
  cannot skip writing); timed around the subprocess, so its (small, native) start-up is included.

The table gives the median of ``--runs`` runs and the ratios pancls/SimpleITK and pancls/dcm2niix
(< 1: pancls is faster). Goal: pancls no slower than SimpleITK, aiming for half its time.

    python bench/ingest_speed.py [--series FOLDER ...] [--runs 5] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PANCLS_DATA", REPO.parent / "shared" / "data")) / "ct"
DEFAULT_SERIES = [DATA / "series_ct" / "S21570" / "S2010", DATA / "abdomen" / "dicom_series"]

PANCLS = """
import sys, time
from pathlib import Path
from pancls.ct.scan import scan
from pancls.ct.select import select_series
from pancls.ct.volume import build_volume
workers = int(sys.argv[2]) or None
t0 = time.perf_counter()
kept = [d.series for d in select_series(scan([Path(sys.argv[1])], workers=workers, progress=False).series) if d.kept]
assert len(kept) == 1, kept
volume = build_volume(kept[0].paths, workers=workers)
print(time.perf_counter() - t0, volume.array.shape)
"""

SITK = """
import sys, time
import SimpleITK as sitk
t0 = time.perf_counter()
reader = sitk.ImageSeriesReader()
reader.SetFileNames(reader.GetGDCMSeriesFileNames(sys.argv[1]))
image = reader.Execute()
print(time.perf_counter() - t0, image.GetSize())
"""


def _child(code: str, *args: str) -> float:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return float(proc.stdout.split()[0])


def _dcm2niix(folder: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run(["dcm2niix", "-z", "n", "-f", "%s", "-o", out, str(folder)], capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dcm2niix failed:\n{proc.stdout}{proc.stderr}")
    return elapsed


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, action="append", help="a folder holding one series (repeatable)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="pancls threads (0: its default)")
    args = parser.parse_args(argv)
    folders = args.series or DEFAULT_SERIES
    has_dcm2niix = shutil.which("dcm2niix") is not None
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_model()}, Python {platform.python_version()}; "
          f"median of {args.runs} runs, each in a fresh process; pancls = scan+select+build, no write")
    header = f"{'series':<40} {'files':>5} {'pancls s':>9} {'SimpleITK s':>11} {'dcm2niix s':>10} {'p/SITK':>7} {'p/d2n':>6}"
    print(header)
    print("-" * len(header))
    for folder in folders:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        pancls = statistics.median(_child(PANCLS, str(folder), str(args.workers)) for _ in range(args.runs))
        sitk = statistics.median(_child(SITK, str(folder)) for _ in range(args.runs))
        d2n = statistics.median(_dcm2niix(folder) for _ in range(args.runs)) if has_dcm2niix else float("nan")
        name = str(folder.relative_to(DATA)) if folder.is_relative_to(DATA) else str(folder)
        print(f"{name:<40} {n_files:>5} {pancls:>9.3f} {sitk:>11.3f} {d2n:>10.3f} {pancls / sitk:>7.2f} {pancls / d2n:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
