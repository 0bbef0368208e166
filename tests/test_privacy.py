"""Keyed pseudonyms and the dataset secret (pancls.privacy), and how pancls ingest uses them."""
from __future__ import annotations

import hashlib
import io
import stat
from pathlib import Path

import pytest

from pancls.ct.select import SelectionRules
from pancls.errors import UserError
from pancls.ingest import IngestConfig, ingest
from pancls.privacy import keyed_id, load_or_create_secret

SHORT = IngestConfig(selection=SelectionRules(min_slices=1))  # jpeg2000 is one slice


def test_keyed_id_depends_on_secret_and_kind_and_is_not_a_plain_hash():
    uid = "1.3.46.670589.33.1.63780596123456789"
    a = keyed_id(b"k" * 32, "series", uid)
    assert a == keyed_id(b"k" * 32, "series", uid) and len(a) == 16
    assert a != keyed_id(b"j" * 32, "series", uid)
    assert a != keyed_id(b"k" * 32, "study", uid)
    plain = hashlib.sha256(uid.encode()).hexdigest()
    assert a not in plain and plain[:16] != a
    with pytest.raises(ValueError):
        keyed_id(b"k", "series", uid, length=65)


def test_secret_is_created_once_private_and_reused(tmp_path: Path):
    folder = tmp_path / ".private"
    key = load_or_create_secret(folder)
    path = folder / "secret"
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(folder) == key


def test_empty_or_bad_secret_is_refused(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UserError, match="secret is empty"):
        load_or_create_secret(tmp_path, file=empty)
    assert load_or_create_secret(tmp_path, file=empty, insecure=True) == b""
    (tmp_path / "junk").write_text("not hex")
    with pytest.raises(UserError, match="hex digits"):
        load_or_create_secret(tmp_path, file=tmp_path / "junk")
    with pytest.raises(UserError, match="not found"):
        load_or_create_secret(tmp_path, file=tmp_path / "missing")


def _ids(out: Path):
    return (out / "manifest.csv").read_text().splitlines()[1:]


def test_ingest_ids_are_keyed_with_the_dataset_secret(ct_data: Path, tmp_path: Path):
    src = ct_data / "jpeg2000"
    ingest([src], tmp_path / "a", SHORT, progress=False, err=io.StringIO())
    secret = tmp_path / "a" / ".private" / "secret"
    assert secret.exists()
    ingest([src], tmp_path / "a", SHORT, progress=False, err=io.StringIO(), force=True)
    ingest([src], tmp_path / "b", SHORT, progress=False, err=io.StringIO())
    ingest([src], tmp_path / "c", SHORT, progress=False, err=io.StringIO(), secret_file=secret)
    assert _ids(tmp_path / "a") == _ids(tmp_path / "c")  # same secret, same ids (one id space)
    assert _ids(tmp_path / "a") != _ids(tmp_path / "b")  # another dataset's secret: unrelated ids
    assert not (tmp_path / "c" / ".private" / "secret").exists()


def test_ingest_refuses_an_empty_secret_unless_insecure(ct_data: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(UserError, match="--insecure-ids"):
        ingest([ct_data / "jpeg2000"], tmp_path / "out", SHORT, progress=False, err=io.StringIO(), secret_file=empty)
    assert not (tmp_path / "out").exists()  # the refusal came before any folder was made
    report = ingest([ct_data / "jpeg2000"], tmp_path / "out", SHORT, progress=False, err=io.StringIO(),
                    secret_file=empty, insecure_ids=True)
    assert report.converted == 1


def test_a_rerun_removes_temporary_files_a_kill_left_in_every_folder_ingest_writes(ct_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    ingest([ct_data / "jpeg2000"], out, SHORT, progress=False, err=io.StringIO())
    (out / "masks").mkdir()
    left = [out / "masks" / ".case.nii.gz.0123abcd.tmp.nii.gz", out / ".private" / ".keys.csv.0123abcd.tmp.csv",
            out / "images" / ".case.nii.gz.0123abcd.tmp.nii.gz", out / ".manifest.csv.0123abcd.tmp.csv"]
    for file in left:
        file.write_bytes(b"half")
    ingest([ct_data / "jpeg2000"], out, SHORT, progress=False, err=io.StringIO())
    assert [f for f in left if f.exists()] == []
