"""`pancls lt` end to end: dry run on the real CIFAR-10 copy, and one clear line for every bad input."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pancls.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_one_json_line(cifar10_npz, tmp_path, capsys):
    code, out, err = _run(["lt", "--dataset", "cifar10", "--imbalance-ratio", "100", "--head", "tsp",
                           "--data", str(cifar10_npz), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert info["n_train"] == 12406
    assert info["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert 0.40e6 < info["parameters"] < 0.55e6  # ResNet-32 + a 128-d tSP head
    assert set(info["inactive"]) == {"train.sampler_start_epoch"}  # the default recipe samples nothing
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "cifar10", "--imbalance-ratio", "0.5"], "imbalance_ratio"),
        (["--dataset", "svhn"], "svhn"),
        # refused when the config is read, naming the key the flag sets
        (["--dataset", "cifar10", "--head", "tps"], "model.head: unknown head 'tps' (did you mean 'tsp'?)"),
        (["--dataset", "cifar10", "--loss", "nonsense"], "loss.name: unknown loss 'nonsense'"),
        (["--dataset", "cifar10", "--set", "model.backbone=resnet3"], "model.backbone: unknown backbone 'resnet3'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, cifar10_npz, tmp_path, capsys):
    code, out, err = _run(["lt", *argv, "--data", str(cifar10_npz), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert "Traceback" not in err


def test_missing_and_corrupt_archives(tmp_path, capsys):
    code, _, err = _run(["lt", "--data", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2 and "nope.tar.gz" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code, _, err = _run(["lt", "--data", str(bad), "--out", str(tmp_path / "r"), "--dry-run"], capsys)
    assert code == 2 and "cifar-10-python.tar.gz" in err and len(err.strip().splitlines()) == 1


def test_a_refused_run_leaves_no_folder(cifar10_npz, tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    for argv in (["--data", str(garbage)], ["--data", str(cifar10_npz), "--head", "tps"],
                 ["--data", str(cifar10_npz), "--out", "/proc/pancls_lt"]):
        out = tmp_path / "r"
        code, _, err = _run(["lt", "--out", str(out), *argv, "--device", "cpu"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


@pytest.mark.parametrize("foreign", [{"model": {}}, torch.zeros(2)])
def test_resume_from_another_programs_checkpoint_is_one_line(foreign, cifar10_npz, tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    torch.save(foreign, run / "last.pt")
    left = run / ".last.pt.1a2b3c4d.tmp.pt"  # what a SIGKILL during a checkpoint write leaves
    left.write_bytes(b"half")
    code, _, err = _run(["lt", "--resume", "--out", str(run), "--data", str(cifar10_npz), "--device", "cpu",
                         "--set", "model.backbone=resnet20_cifar"], capsys)
    assert code == 2 and "not a pancls checkpoint" in err and len(err.strip().splitlines()) == 1, err
    assert not left.exists()


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "pancls", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lt" in proc.stdout and "ingest" in proc.stdout


def _top1_from_checkpoint(run: Path, npz: Path) -> float:
    """Top-1 recomputed outside the engine: the saved weights, the official test split, argmax, compare."""
    from pancls.data.augment import to_float_normalised
    from pancls.data.cifar import load_cifar_split
    from pancls.lt import load_run

    _, _, model = load_run(run)
    test = load_cifar_split(npz, "cifar10", "test")
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(to_float_normalised(test.images[i:i + 2000])).argmax(1)
                          for i in range(0, len(test.images), 2000)])
    return float((pred.numpy() == test.labels).mean())


def test_short_training_writes_a_complete_run_folder(cifar10_npz, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.chdir(cifar10_npz.parent)  # the data given relative to the working directory
    argv = ["lt", "--dataset", "cifar10", "--imbalance-ratio", "100", "--head", "tsp", "--loss", "logit_adjust",
            "--data", cifar10_npz.name, "--out", str(out), "--epochs", "1", "--device", "cpu",
            "--set", "model.backbone=resnet20_cifar", "--set", "model.backbone_kwargs.width=0.25",
            "--set", "train.warmup_epochs=0", "--set", "train.progress=false"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert results["reported"] == "last epoch" and summary["top1"] == results["top1"]
    assert results["top1"] == pytest.approx(_top1_from_checkpoint(out, cifar10_npz), abs=1e-9)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert list(results["per_class_accuracy"]) == names  # keyed by class name
    assert list(results["crowding_min_angle_deg"]) == names == results["classes"]
    assert results["medium_shot_top1"] is not None and results["few_shot_top1"] is None  # no class < 20 images
    assert len(results["crowding_mean_angle_deg"]) == 10
    assert "evaluation set" in results["best_epoch_on_test_set__not_reported"]["selected_on"]
    assert (out / "crowding.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert "head: tsp" in (out / "config.yaml").read_text()
    # the learned scale of the kernel form, as the last checkpoint holds it (s = 1 + softplus(rho))
    rho = torch.load(out / "last.pt", weights_only=False)["model"]["head.rho"]
    scale = 1 + torch.nn.functional.softplus(rho).item()
    assert results["head"] == pytest.approx({"head": "tsp", "form": "kernel", "scale": scale, "kappa": 16.0,
                                             "logit_width": 2 * scale - 2 * scale / 33})
    # scripts/head_summary.py reads the same from the run folder (for runs older than the "head" entry)
    spec = importlib.util.spec_from_file_location("head_summary", ROOT / "scripts" / "head_summary.py")
    head_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_summary)
    row = head_summary.summarise(out)
    assert row.pop("run") == "run" and row.pop("epochs_done") == 1 and row.pop("loss") == "logit_adjust"
    assert row.pop("epochs") == 1 and row == pytest.approx(results["head"])
    inactive = results["provenance"]["inactive"]  # warmup_epochs 0, sampler none, progress false: idle keys
    assert {"train.warmup", "train.sampler_start_epoch", "train.progress_steps"} <= set(inactive)
    assert "warmup" not in results["provenance"]["config"]["train"]
    assert "warmup: step" in (out / "config.yaml").read_text()  # config.yaml keeps every key (reload, resume)

    code, _, err = _run(argv, capsys)  # the same folder again without --resume
    assert code == 2 and "--resume" in err
    code, _, err = _run(argv[:-2] + ["--set", "train.lr=0.5", "--resume"], capsys)  # another recipe
    assert code == 2 and "lr" in err
    assert "lr: 0.1" in (out / "config.yaml").read_text()  # the refused resume did not touch the run
    classes = (out / "classes.json").read_bytes()
    other = [a if a != "100" else "200" for a in argv]  # another training set: other class counts
    code, _, err = _run(other + ["--resume"], capsys)
    assert code == 2 and "imbalance_ratio" in err
    assert (out / "classes.json").read_bytes() == classes  # nor its classes.json
    code, stdout, err = _run(argv + ["--resume"], capsys)  # finished: resuming is a no-op
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["top1"] == results["top1"]
    assert f"path: {cifar10_npz}\n" in (out / "config.yaml").read_text()  # stored absolute
    absolute = [str(cifar10_npz) if a == cifar10_npz.name else a for a in argv]
    code, stdout, err = _run(absolute + ["--resume"], capsys)  # the same file typed absolute: the same run
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["top1"] == results["top1"]
    code, stdout, err = _run(["lt", "--out", str(out), "--resume"], capsys)  # the folder alone: its own config
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["top1"] == results["top1"]


def test_resume_of_a_run_that_stored_a_relative_path(tmp_path, monkeypatch):
    """Runs started before the commands stored paths absolute keep resuming when the file is the same."""
    import torch

    from pancls.lt import _keep_stored_path_spelling

    monkeypatch.chdir(tmp_path)
    torch.save({"config": {"run.data.path": "cifar10.npz", "run.model.backbone_kwargs.pretrained": "w.pt"}},
               tmp_path / "last.pt")
    run_config = {"data": {"path": str(tmp_path / "cifar10.npz")},
                  "model": {"backbone_kwargs": {"pretrained": str(tmp_path / "other.pt")}}}
    _keep_stored_path_spelling(run_config, tmp_path / "last.pt")
    assert run_config["data"]["path"] == "cifar10.npz"  # same file: the stored spelling, the configs match
    assert run_config["model"]["backbone_kwargs"]["pretrained"] == str(tmp_path / "other.pt")  # another file


def test_per_class_entries_are_keyed_by_class_and_old_lists_still_read():
    from pancls.lt import by_class, per_class

    classes = ["airplane", "automobile", "bird"]
    written = by_class({"top1": 0.5, "per_class_accuracy": [0.93, 0.5, None], "class_counts": [50, 20, 5],
                        "best": {"per_class_accuracy": [1.0, 0.0, 0.5]}, "classes": classes}, classes)
    assert written["per_class_accuracy"] == {"airplane": 0.93, "automobile": 0.5, "bird": None}
    assert written["best"]["per_class_accuracy"] == {"airplane": 1.0, "automobile": 0.0, "bird": 0.5}
    assert written["class_counts"] == [50, 20, 5] and written["top1"] == 0.5
    old = {"per_class_accuracy": [0.93, 0.5, None], "classes": classes}  # a results.json of an older run
    assert per_class(written, "per_class_accuracy") == per_class(old, "per_class_accuracy") == [0.93, 0.5, None]
    assert by_class({"per_class_accuracy": [1, 2]}, ["a", "a"]) == {"per_class_accuracy": [1, 2]}  # names clash


def test_inactive_train_keys_are_left_out_of_the_provenance_not_out_of_config_yaml(tmp_path):
    """Issue 18: milestones under the cosine schedule are not shown as if they mattered."""
    from pancls.config import dump_yaml, load_yaml
    from pancls.lt import _provenance, load_config

    cfg = load_config({"train": {"schedule": "cosine", "epochs": 10, "milestones": [3, 6], "gamma": 0.5,
                                 "sampler": "sqrt", "sampler_start_epoch": 4}})
    prov = json.loads(json.dumps(_provenance(torch.device("cpu"), cfg, 1.0)))  # as results.json holds it
    assert set(prov["inactive"]) == {"train.milestones", "train.gamma"}
    assert "cosine" in prov["inactive"]["train.milestones"]
    train = prov["config"]["train"]
    assert "milestones" not in train and "gamma" not in train
    assert train["schedule"] == "cosine" and train["sampler_start_epoch"] == 4 and train["warmup"] == "step"
    assert prov["config"]["model"] == json.loads(json.dumps(dataclasses.asdict(cfg.model)))  # other sections whole
    dump_yaml(cfg, tmp_path / "config.yaml")  # the run folder's config keeps them and reloads strictly
    assert load_config(load_yaml(tmp_path / "config.yaml")) == cfg
    step = load_config({"train": {"epochs": 10, "milestones": [3, 6], "sampler": "sqrt", "progress": True}})
    assert _provenance(torch.device("cpu"), step, 1.0)["inactive"] == {}
