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
