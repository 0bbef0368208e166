"""Speed of reading one DICOM series into a volume: pancls vs SimpleITK vs dcm2niix.

Each measurement runs in a fresh process (no warm imports or caches inside the interpreter; the OS
page cache is warm after the first run, the same for all three). Timed work:

* pancls: scan (the headers of every file in the folder) + series selection + build_volume of the chosen
  series from the scanned headers, in memory (no NIfTI written); timed inside the child, after imports.
* SimpleITK: ImageSeriesReader.GetGDCMSeriesFileNames + Execute, in memory; timed inside the child, after
  imports.
* dcm2niix: dcm2niix -z n on the folder, writing uncompressed NIfTI to a temporary folder (it cannot skip
  writing); timed around the subprocess, so its (small, native) start-up is included.
* --cli adds pancls ingest end to end (python -m pancls ingest FOLDER --out TMP: interpreter start-up,
  imports, scan, build, gzip-compressed NIfTI + sidecar + manifest), timed around the subprocess like
  dcm2niix. For reference only: it is dominated by Python start-up and gzip.

Both in-memory readers hash their voxels (outside the timed part) and the table says whether pancls and
SimpleITK returned the same HU volume, so a fast wrong answer cannot pass for a win.

The table gives the median of --runs runs and the ratios pancls/SimpleITK and pancls/dcm2niix
(< 1: pancls is faster), as markdown. Goal: pancls no slower than SimpleITK, aiming for half its time.

The default series are two real CT fixtures of the shared data folder ($PANCLS_DATA/ct, see its README.md):
series_ct/S21570/S2010 (10 uncompressed slices) and abdomen/dicom_series (20 JPEG 2000 slices).

Typical use:
  make bench                                         = python bench/ingest_speed.py --runs 7 --cli
  make bench SHARED_DATA=/path/to/shared/data        the fixtures elsewhere
  python bench/ingest_speed.py --series /data/one_series --runs 3
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

# Each child prints "<seconds> <sha256 of the int16 HU volume as [slice, row, column], slices ascending>".
PANCLS = """
import hashlib, sys, time
from pathlib import Path
import numpy as np
from pancls.ct.scan import scan
from pancls.ct.select import select_series
from pancls.ct.volume import build_volume
workers = int(sys.argv[2]) or None
t0 = time.perf_counter()
kept = [d.series for d in select_series(scan([Path(sys.argv[1])], workers=workers, progress=False).series) if d.kept]
assert len(kept) == 1, kept
volume = build_volume(kept[0].paths, workers=workers, headers=kept[0].headers)
elapsed = time.perf_counter() - t0
print(elapsed, hashlib.sha256(np.ascontiguousarray(volume.array.transpose(2, 1, 0)).tobytes()).hexdigest())
"""

SITK = """
import hashlib, sys, time
import numpy as np
import SimpleITK as sitk
t0 = time.perf_counter()
reader = sitk.ImageSeriesReader()
reader.SetFileNames(reader.GetGDCMSeriesFileNames(sys.argv[1]))
image = reader.Execute()
elapsed = time.perf_counter() - t0
array = sitk.GetArrayFromImage(image)
hu = array.astype(np.int16)
print(elapsed, hashlib.sha256(hu.tobytes()).hexdigest() if np.array_equal(hu, array) else "not-int16")
"""


def _child(code: str, *args: str) -> tuple[float, str]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    seconds, digest = proc.stdout.split()[:2]
    return float(seconds), digest


def _timed_subprocess(argv: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{proc.stdout}{proc.stderr}")
    return elapsed


def _dcm2niix(folder: Path) -> float:
    with tempfile.TemporaryDirectory() as out:
        return _timed_subprocess(["dcm2niix", "-z", "n", "-f", "%s", "-o", out, str(folder)])


def _pancls_cli(folder: Path, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "pancls", "ingest", str(folder), "--out", str(Path(out) / "ds"), "--no-progress"]
        return _timed_subprocess(argv + (["--workers", str(workers)] if workers else []), cwd=REPO)


def machine_line() -> str:
    """CPU model, usable cores, load and the versions of the three readers: enough to compare runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    versions = [f"Python {platform.python_version()}"]
    for module in ("pydicom", "SimpleITK"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} missing")
    if shutil.which("dcm2niix"):
        proc = subprocess.run(["dcm2niix", "--version"], capture_output=True, text=True)
        version = next((w for w in (proc.stdout + proc.stderr).split() if w.startswith("v1.")), "?")
        versions.append(f"dcm2niix {version}")
    from pancls.machine import cpu_model

    return (f"machine: {cpu_model()}, {cores} cores usable ({os.cpu_count()} CPUs), load average {load}; "
            + ", ".join(versions))


def missing_message(missing: list[Path], given: bool) -> str:
    """One line: which series folders are missing, and where the default CT fixtures come from."""
    if given:
        return f"not a folder: {', '.join(map(str, missing))} (--series takes a folder holding one DICOM series)"
    return (f"the CT fixtures are not in {DATA} (missing: {', '.join(str(f.relative_to(DATA)) for f in missing)}); "
            "point SHARED_DATA= (make bench) or PANCLS_DATA= (the script) at the shared data folder, whose ct/ "
            "README.md lists the upstream sources, or pass --series FOLDER")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--series", type=Path, action="append", metavar="FOLDER",
                        help="a folder holding one DICOM series (repeatable; default: the two CT fixtures)")
    parser.add_argument("--runs", type=int, default=5, help="runs per reader and series; the median is shown (default 5)")
    parser.add_argument("--workers", type=int, default=0, help="pancls threads (0: its default)")
    parser.add_argument("--cli", action="store_true", help="also time `pancls ingest` end to end, NIfTI written")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    folders = args.series or DEFAULT_SERIES
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        print(f"bench/ingest_speed.py: error: {missing_message(missing, given=bool(args.series))}", file=sys.stderr)
        return 2
    has_dcm2niix = shutil.which("dcm2niix") is not None
    print(machine_line())
    print(f"median of {args.runs} runs, each in a fresh process; pancls = scan + select + build in memory, "
          f"timed after imports, like SimpleITK; dcm2niix (-z n) timed around its process"
          + ("; pancls ingest (CLI, .nii.gz written) timed around its process" if args.cli else ""))
    print()
    columns = ["series", "files", "pancls s", "SimpleITK s", "dcm2niix s", "pancls/SimpleITK", "pancls/dcm2niix",
               "same HU as SimpleITK"] + (["pancls ingest CLI s"] if args.cli else [])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if c in ("series", "same HU as SimpleITK") else "---:" for c in columns) + "|")
    for folder in folders:
        n_files = sum(1 for p in folder.iterdir() if p.is_file())
        ours = [_child(PANCLS, str(folder), str(args.workers)) for _ in range(args.runs)]
        theirs = [_child(SITK, str(folder)) for _ in range(args.runs)]
        pancls, sitk = statistics.median(t for t, _ in ours), statistics.median(t for t, _ in theirs)
        d2n = statistics.median(_dcm2niix(folder) for _ in range(args.runs)) if has_dcm2niix else float("nan")
        same = {d for _, d in ours} == {d for _, d in theirs} and len({d for _, d in ours}) == 1
        name = str(folder.relative_to(DATA)) if folder.is_relative_to(DATA) else str(folder)
        cells = [name, str(n_files), f"{pancls:.3f}", f"{sitk:.3f}", f"{d2n:.3f}", f"{pancls / sitk:.2f}",
                 f"{pancls / d2n:.2f}", "yes" if same else "NO"]
        if args.cli:
            cells.append(f"{statistics.median(_pancls_cli(folder, args.workers) for _ in range(args.runs)):.3f}")
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
