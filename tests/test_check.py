"""`pancls check MANIFEST`: the manifest validation from the command line, exit 0/2, class counts per fold."""
from __future__ import annotations

import csv
from pathlib import Path

from pancls.cli import main


def _check(capsys, *argv):
    code = main(["check", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ingest_then_check_passes(ct_data: Path, tmp_path: Path, capsys):
    sheet = tmp_path / "labels.csv"
    sheet.write_text("PatientID,label\nPLASTIC,PDAC\nCQ500-CT-310,CP\n")
    out = tmp_path / "ds"
    assert main(["ingest", str(ct_data / "series_ct"), str(ct_data / "jpeg2000"), "--out", str(out), "--labels",
                 str(sheet), "--min-slices", "1", "--no-progress"]) == 0
    capsys.readouterr()
    code, text, err = _check(capsys, out / "manifest.csv")
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].endswith("valid (2 volumes, 2 patients, 0 with a mask)")
    assert lines[1].split() == ["PDAC", "IPMN", "NET", "SCN", "ASC", "CP", "total"]
    assert lines[2].split() == ["all", "1", "0", "0", "0", "0", "1", "2"]
    assert "note: no volume of class IPMN, NET, SCN, ASC" in text


def test_folds_counted_and_every_problem_listed(cohort: Path, tmp_path: Path, capsys):
    rows = list(csv.DictReader(open(cohort / "manifest.csv", newline="")))
    assert "fold" not in rows[0]
    patients = sorted({r["patient_id"] for r in rows})
    fold_of = {p: i % 2 for i, p in enumerate(patients)}
    manifest = cohort / "with_folds.csv"  # beside the images: paths stay relative to the dataset root
    try:
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[*rows[0], "fold"])
            w.writeheader()
            w.writerows({**r, "fold": fold_of[r["patient_id"]]} for r in rows)
        code, text, err = _check(capsys, manifest, "--no-images")
        assert code == 0, err
        table = {line.split()[0] + (" " + line.split()[1] if line.startswith("fold") else ""): line.split()
                 for line in text.splitlines()[2:] if line and not line.startswith("note")}
        assert set(table) == {"fold 0", "fold 1", "all"}
        assert int(table["fold 0"][-1]) + int(table["fold 1"][-1]) == int(table["all"][-1]) == len(rows)

        broken = cohort / "broken.csv"
        bad = [dict(rows[0], label="PDCA"), dict(rows[1], image="images/missing.nii.gz"), rows[2], rows[2]]
        with open(broken, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(bad)
        code, text, err = _check(capsys, broken, "--root", cohort, "--allowed-root", cohort)
        assert code == 2 and text == ""
        assert "3 problems in the manifest" in err
        assert ":2: unknown label 'PDCA'; expected one of PDAC, IPMN, NET, SCN, ASC, CP" in err
        assert ":3: image file not found: images/missing.nii.gz" in err
        assert ":5: duplicate image, already listed on line 4" in err
        code, _, err = _check(capsys, manifest, "--no-images", "--classes", "a,b")
        assert code == 2 and "expected one of a, b" in err
    finally:
        manifest.unlink(missing_ok=True)
        (cohort / "broken.csv").unlink(missing_ok=True)
