"""`make bench` (bench/ingest_speed.py) without the CT fixtures: one line naming what is missing, exit 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    env = {**os.environ, "PANCLS_DATA": str(tmp_path / "nowhere")}
    return subprocess.run([sys.executable, "bench/ingest_speed.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_fixtures_are_one_line_and_exit_2(tmp_path):
    proc = _bench(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"the CT fixtures are not in {tmp_path / 'nowhere' / 'ct'}" in line
    assert "missing: series_ct/S21570/S2010, abdomen/dicom_series" in line and "SHARED_DATA=" in line


def test_a_missing_series_folder_is_one_line(tmp_path):
    proc = _bench(tmp_path, "--series", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"bench/ingest_speed.py: error: not a folder: {tmp_path / 'nope'} (--series takes a folder holding one DICOM "
        "series)")


def test_make_bench_runs_what_the_readme_measured():
    """The README's speed table says `make bench` = `bench/ingest_speed.py --runs 7 --cli`."""
    text = (REPO / "Makefile").read_text()
    assert "$(PY) bench/ingest_speed.py --runs 7 --cli" in text.split("\nbench:", 1)[1].split("\n\n", 1)[0]


# --------------------------------------------------------------------- bench/gpu_utilisation.py, without a GPU
def _gpu_bench(tmp_path, smi_lines, *args):
    """Run the sampler with a stand-in ``nvidia-smi`` on PATH that prints ``smi_lines`` (no GPU needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '" + "\\n".join(smi_lines) + "\\n'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "bench/gpu_utilisation.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_utilisation_reports_each_gpu_in_steady_state(tmp_path):
    import json

    out = tmp_path / "u.json"
    proc = _gpu_bench(tmp_path, ["0, 95, 1000", "1, 40, 2000", "[N/A], x, y"], "--interval", "0.05", "--skip", "0",
                      "--json", str(out), "--", sys.executable, "-c", "import time; time.sleep(0.6)")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    gpu0, gpu1 = report["gpus"]["0"], report["gpus"]["1"]
    assert gpu0["median_util"] == 95 and gpu0["share_at_goal"] == 1.0 and gpu0["peak_memory_mib"] == 1000
    assert gpu1["median_util"] == 40 and gpu1["share_at_goal"] == 0.0 and gpu0["samples"] >= 3
    assert "GPU 0: median 95 %" in proc.stdout


def test_gpu_utilisation_leaves_out_the_start_and_passes_the_exit_code(tmp_path):
    import json

    out = tmp_path / "u.json"
    proc = _gpu_bench(tmp_path, ["0, 95, 1000"], "--interval", "0.05", "--skip", "100", "--json", str(out), "--",
                      sys.executable, "-c", "raise SystemExit(3)")
    assert proc.returncode == 3
    assert json.loads(out.read_text())["gpus"]["0"]["samples"] == 0 and "within the first 100 s" in proc.stdout


def test_gpu_utilisation_without_nvidia_smi_is_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "bench/gpu_utilisation.py", "--", "true"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "gpu_utilisation: nvidia-smi not found: this measures a CUDA machine")


def test_parse_sample_by_hand():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gpu_utilisation import parse_sample, summarise
    finally:
        sys.path.pop(0)
    assert parse_sample("0, 87, 512\n1, [N/A], 3\n") == [(0, 87.0, 512.0)]
    s = summarise([(0.0, [(0, 10.0, 1.0)]), (5.0, [(0, 90.0, 2.0)]), (6.0, [(0, 70.0, 3.0)])], skip=1.0, goal=80.0)
    assert s[0] == {"samples": 2, "median_util": 80.0, "p10_util": 70.0, "share_at_goal": 0.5, "peak_memory_mib": 3.0}
