"""`pancls cv --jobs N`: folds train side by side in worker processes; the merged run equals the sequential one,
and a failing fold neither stops the others nor leaves a summary behind."""
import json

import pytest
import torch

from pancls import cv, cv_parallel
from pancls.cli import main
from pancls.config import dump_yaml
from pancls.errors import UserError

FOLDS = 2


@pytest.fixture()
def one_thread(monkeypatch):
    """One thread in this process and in every worker (cores // jobs = 1): the same float summation order."""
    monkeypatch.setattr(cv_parallel, "available_cores", lambda: FOLDS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preprocessed-volume cache for the module (the volumes are the same in every run here)."""
    return tmp_path_factory.mktemp("cv_parallel_cache")


def _config(tiny_cv_config_factory, cohort, tmp_path, cache):
    cfg = tiny_cv_config_factory(cohort, tmp_path, **{"cv.folds": FOLDS, "cv.inner_folds": 2,
                                                      "data.cache_dir": str(cache)})
    dump_yaml(cfg, tmp_path / "config.yaml")
    return cfg


def _comparable(summary):
    """The summary less what depends on the process, not the data: wall seconds, speed and the thread count."""
    s = json.loads(json.dumps(summary))
    s.pop("machine")
    for record in s["folds_detail"]:
        record.pop("seconds_this_session")
        for block in (record["last"], record["inner_best"]):
            block.pop("seconds", None), block.pop("images_per_s", None)
    return s


def test_parallel_folds_merge_to_the_sequential_result(tiny_cv_config_factory, cohort, tmp_path, cache, one_thread,
                                                       capsys):
    cfg = _config(tiny_cv_config_factory, cohort, tmp_path, cache)
    sequential = cv.run(cfg, tmp_path / "seq", log=lambda _: None)

    assert main(["cv", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    finished = [line for line in err.splitlines() if " done in " in line]
    assert len(finished) == FOLDS and all("ETA" in line and "elapsed" in line for line in finished)
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert (par / "splits.json").read_bytes() == (seq / "splits.json").read_bytes()
    for k in range(FOLDS):
        assert (par / f"fold_{k}" / "predictions.csv").read_bytes() == (seq / f"fold_{k}" / "predictions.csv").read_bytes()
        a = torch.load(par / f"fold_{k}" / "last.pt", weights_only=False)["model"]
        b = torch.load(seq / f"fold_{k}" / "last.pt", weights_only=False)["model"]
        assert all(torch.equal(a[name], b[name]) for name in b), k
    assert (par / "oof_predictions.csv").read_bytes() == (seq / "oof_predictions.csv").read_bytes()
    merged = json.loads((par / "summary.json").read_text())
    assert _comparable(merged) == _comparable(sequential)
    assert (par / "report.html").is_file() and (par / "MODEL_CARD.md").is_file()


def test_a_failing_fold_lets_the_other_finish_and_is_named_in_one_line(tiny_cv_config_factory, cohort, tmp_path,
                                                                        cache, one_thread, capsys):
    _config(tiny_cv_config_factory, cohort, tmp_path, cache)
    run = tmp_path / "run"
    run.mkdir()
    (run / "fold_1").write_text("a file where fold 1's folder should be")  # fold 1's worker fails at once
    assert main(["cv", "--config", str(tmp_path / "config.yaml"), "--out", str(run), "--jobs", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "fold 1 failed" in errors[0] and "fold 0" not in errors[0], errors
    assert "FileExistsError" in errors[0]
    assert (run / "fold_0" / "fold.json").is_file()  # the other fold finished
    assert not (run / "summary.json").exists() and not (run / "oof_predictions.csv").exists()


def test_plan_clips_jobs_and_refuses_nonsense():
    p = cv_parallel.plan(4, done=[0, 1], jobs=8, cores=16)
    assert p.todo == [2, 3] and p.kept == [0, 1] and len(p.gpus) == 2 and p.threads == 8
    assert "--jobs 8 but 2 fold(s) to train" in p.notes[0]
    assert cv_parallel.plan(4, done=[], jobs=3, cores=2).threads == 1
    with pytest.raises(UserError, match="--jobs: must be at least 1"):
        cv_parallel.plan(4, done=[], jobs=0)
    p = cv_parallel.plan(4, done=[], gpus=[2, 3], cores=16)
    assert p.gpus == [2, 3] and p.threads == 8
    env = cv_parallel.worker_env(3, 2, base={"RANK": "1", "WORLD_SIZE": "2", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["OMP_NUM_THREADS"] == "3" and "RANK" not in env


def test_gpu_and_job_flags_are_one_line_refusals(tiny_cv_config_factory, cohort, tmp_path, cache, capsys):
    _config(tiny_cv_config_factory, cohort, tmp_path, cache)
    base = ["cv", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "r")]
    if not torch.cuda.is_available():
        assert main(base + ["--gpus", "0,1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--gpus" in err and "no CUDA device" in err and "\n" not in err
    assert main(base + ["--jobs", "0"]) == 2
    assert "--jobs: must be at least 1" in capsys.readouterr().err
    assert main(base + ["--jobs", "2", "--fold", "1"]) == 2
    assert "--jobs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed with
        main(base + ["--jobs", "2", "--gpus", "0"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # no refusal wrote anything


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG): Linux")
def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL of `pancls cv --jobs N` left its fold workers training (ppid 1), and a --resume raced them: a worker
    now gets SIGTERM from the kernel when its parent dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import subprocess, sys, os; from pancls.cv_parallel import die_with_parent\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
            " preexec_fn=die_with_parent(os.getpid()))\n"
            "print(child.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", "import time\n" + code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as fh:  # gone, or a zombie of init's waiting to be reaped
            if fh.read().split(") ")[-1].startswith("Z"):
                break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent")
