import pytest

from pancls.io import atomic_save, atomic_write_json, atomic_write_text, owned_temp_dir, read_json


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert path.read_text().strip().endswith("}") and '"x": 2' in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_failed_write_keeps_previous_version_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def broken_writer(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save(path, broken_writer)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_temp_file_keeps_the_extension(tmp_path):
    seen = []
    atomic_save(tmp_path / "v.nii.gz", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")))
    assert seen[0].endswith(".nii.gz")


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    import pancls.io

    old = os.umask(0o027)
    pancls.io._UMASK = None  # read afresh
    try:
        atomic_write_text(tmp_path / "p.txt", "x")
    finally:
        os.umask(old)
        pancls.io._UMASK = None
    assert stat.S_IMODE((tmp_path / "p.txt").stat().st_mode) == 0o640


def test_json_safe_turns_numpy_and_torch_into_plain_json(tmp_path):
    import json

    import numpy as np
    import torch

    from pancls.io import atomic_write_json, json_safe

    value = {1: np.int64(3), "a": np.arange(3, dtype=np.int32), "t": torch.tensor([[0.5]]), "f": np.float32(0.25),
             "nested": ({"b": np.bool_(True)},)}
    expected = {"1": 3, "a": [0, 1, 2], "t": [[0.5]], "f": 0.25, "nested": [{"b": True}]}
    assert json_safe(value) == expected and type(json_safe(value)["1"]) is int
    atomic_write_json(tmp_path / "x.json", value)
    assert json.loads((tmp_path / "x.json").read_text()) == expected


def test_owned_temp_dir_removes_what_a_killed_process_left_and_spares_a_live_one(tmp_path):
    import fcntl
    import os
    import subprocess
    import sys

    # a process that made its folder, locked it and was killed with SIGKILL (the kernel dropped its lock)
    code = ("import sys; from pancls.io import owned_temp_dir\n"
            "with owned_temp_dir('pancls-x-', sys.argv[1]) as d:\n"
            "    (d / 'slice.dcm').write_bytes(b'patient data'); print(d, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    killed = tmp_path / proc.stdout.readline().strip()
    proc.kill()
    proc.wait()
    assert (killed / "slice.dcm").exists()
    # a live one: its lock is held (here by an open file description of this process)
    live = tmp_path / "pancls-x-live"
    live.mkdir()
    fd = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / "other-prefix-1"
    other.mkdir()
    try:
        with owned_temp_dir("pancls-x-", tmp_path) as mine:
            assert mine.is_dir() and oct(mine.stat().st_mode & 0o777) == "0o700"
            assert not killed.exists() and live.is_dir() and other.is_dir()
        assert not mine.exists()
    finally:
        os.close(fd)


def test_read_json_names_the_file_and_the_problem(tmp_path):
    from pancls.errors import UserError

    bad = tmp_path / "fold.json"
    bad.write_text('{"temperature": 1.')
    with pytest.raises(UserError, match="fold record is damaged: not valid JSON") as info:
        read_json(bad, "fold record")
    assert info.value.where == str(bad) and str(tmp_path) not in info.value.reason
    with pytest.raises(UserError, match="fold record not found"):
        read_json(tmp_path / "absent.json", "fold record")



def _holder(folder):
    """A process holding ``hold_lock(folder)`` until killed."""
    import subprocess
    import sys

    code = ("import sys; from pancls.io import hold_lock\n"
            "with hold_lock(sys.argv[1], 'the run'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip() == "held"


def test_hold_lock_refuses_a_second_process_at_once_and_is_free_when_its_holder_is_killed(tmp_path):
    from pancls.io import LockHeld, hold_lock

    proc, held = _holder(tmp_path)
    try:
        assert held
        with pytest.raises(LockHeld, match="the run is in use by another pancls process"):
            with hold_lock(tmp_path, "the run"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with hold_lock(tmp_path, "the run"):  # free again once the holder died (SIGKILL: the kernel released it)
        with hold_lock(tmp_path, "the run"):  # re-entrant within one process
            pass
        other, held = _holder(tmp_path)  # the outer block still holds it
        other.kill(), other.wait()
        assert not held and "in use by another pancls process" in other.stderr.read()
    other, held = _holder(tmp_path)
    other.kill(), other.wait()
    assert held
