"""`pancls cv` end to end on a tiny synthetic cohort: run folder, honest selection, resume, ROI policy, refusals."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pancls import cv
from pancls.cli import main
from pancls.config import load_yaml
from pancls.errors import UserError


@pytest.fixture(scope="session")
def config(tiny_cv_config_factory):
    return tiny_cv_config_factory


@pytest.fixture(scope="module")
def finished(config, cohort, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    cfg = config(cohort, tmp)
    lines = []
    summary = cv.run(cfg, tmp / "run", log=lines.append)
    return tmp / "run", summary, lines, cfg


def test_run_folder_has_everything(finished):
    run, summary, lines, _ = finished
    for name in ("configs/config.yaml", "configs/metadata.json", "classes.json", "splits.json",
                 "oof_predictions.csv", "summary.json", "report.md", "report.html", "MODEL_CARD.md",
                 "figures/confusion.png", "figures/roc.png", "figures/reliability.png", "figures/crowding.png"):
        assert (run / name).is_file(), name
    for k in range(4):
        for name in ("last.pt", "best.pt", "metrics.jsonl", "predictions.csv", "fold.json"):
            assert (run / f"fold_{k}" / name).is_file(), (k, name)
    # a progress line per epoch with the run's ETA
    assert sum("run ETA" in line for line in lines) == 4 * 3
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_out_of_fold_predictions_cover_every_patient_once(finished, cohort):
    run, summary, _, _ = finished
    oof = pd.read_csv(run / "oof_predictions.csv", dtype={"patient_id": str})
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    assert sorted(oof["patient_id"]) == sorted(manifest["patient_id"])
    splits = json.loads((run / "splits.json").read_text())
    assert all(splits["test_fold"][p] == f for p, f in zip(oof["patient_id"], oof["fold"], strict=True))
    probs = oof[[f"p_{c}" for c in summary["classes"]]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # the labels in the predictions are the manifest's
    label = dict(zip(manifest["patient_id"], manifest["label"], strict=True))
    assert all(label[p] == y for p, y in zip(oof["patient_id"], oof["label"], strict=True))
    # pooled top-1 recomputed from the file equals the summary's
    assert math.isclose(summary["pooled"]["top1"], float((oof["pred"] == oof["label"]).mean()), abs_tol=1e-9)


def test_selection_and_temperature_come_from_the_inner_split_only(finished):
    run, summary, _, _ = finished
    splits = json.loads((run / "splits.json").read_text())
    for k in range(4):
        record = json.loads((run / f"fold_{k}" / "fold.json").read_text())
        assert record["selected_on"].startswith("inner validation")
        assert record["inner_best"]["selected_on"].startswith("inner validation")
        inner = set(splits["inner_validation"][str(k)])
        test = {p for p, f in splits["test_fold"].items() if f == k}
        assert inner and not inner & test
        assert record["val_patients"] == len(inner)
        history = [json.loads(line) for line in (run / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()]
        best = max(history, key=lambda r: r["eval_balanced_accuracy"])  # first maximum, as the engine keeps
        assert record["selected_epoch"] == best["epoch"] + 1
        assert record["temperature"] > 0
    assert summary["baselines"]["majority"]["pooled"]["collapsed"] is True  # one class for everyone


def test_per_class_recall_has_patient_intervals_and_the_baselines_beside_it(finished, cohort):
    """The clinical rule for every headline number, per class too: an interval (patient bootstrap, paired with
    the baselines') and the all-majority baseline beside it, in summary.json, the terminal and the model card."""
    run, summary, _, _ = finished
    manifest = pd.read_csv(cohort / "manifest.csv", dtype={"patient_id": str})
    patients = manifest.drop_duplicates("patient_id")["label"].value_counts()
    assert summary["class_counts"] == {c: int(patients.get(c, 0)) for c in summary["classes"]}
    major = summary["baselines"]["majority"]
    for c in summary["classes"]:
        for name in ("sensitivity", "specificity"):
            b = summary["intervals"]["per_class"][c][name]
            assert b["estimate"] == pytest.approx(summary["pooled"]["per_class"][c][name])
            assert b["lo"] <= b["estimate"] <= b["hi"]
        to_majority = c == major["pooled"]["collapsed_to"]
        assert major["intervals"]["per_class"][c]["sensitivity"]["estimate"] == (1.0 if to_majority else 0.0)
    # the calibrated row's intervals: rank metrics as the raw row's, calibration its own
    cal = summary["intervals_calibrated"]
    assert cal["top2"] == summary["intervals"]["top2"]
    assert cal["ece"]["estimate"] == pytest.approx(summary["pooled_calibrated"]["ece"])
    text = cv.headline(summary, run)
    rows = [line for line in text.splitlines() if line.split(" ")[0] in summary["classes"]]
    assert len(rows) == len(summary["classes"]) and all(row.count("[") == 3 for row in rows)
    card = (run / "MODEL_CARD.md").read_text()
    assert "| class | patients | model | all-majority baseline | intensity baseline |" in card
    assert (run / "figures" / "embedding.png").is_file() == (min(np.bincount(
        pd.read_csv(run / "oof_predictions.csv")["fold"])) >= 10)  # one t-SNE panel per fold


def test_roi_policy_is_recorded(finished):
    run, *_ = finished
    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert meta["pancls"]["roi"] == "mask" and meta["pancls"]["inference_requires_mask"] is True
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["5"] == "CP"


def test_report_regenerates_from_the_folder(finished, capsys):
    run, summary, _, _ = finished
    (run / "summary.json").unlink()
    assert main(["report", str(run)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["pooled"] == json.loads(json.dumps(summary["pooled"]))
    assert "all-majority" in capsys.readouterr().out


def test_resume_after_a_kill_is_bit_exact(config, cohort, tmp_path, finished):
    run_full, *_ = finished
    cfg = config(cohort, tmp_path)

    class Killed(Exception):
        pass

    def kill_after_first_epoch(line):
        if "epoch 1/3" in line:
            raise Killed

    with pytest.raises(Killed):
        cv.run(cfg, tmp_path / "run", fold=0, log=kill_after_first_epoch)
    assert not (tmp_path / "run" / "fold_0" / "fold.json").exists()
    cv.run(cfg, tmp_path / "run", fold=0, resume=True, log=lambda _: None)
    a = torch.load(tmp_path / "run" / "fold_0" / "last.pt", weights_only=False)
    b = torch.load(run_full / "fold_0" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "run" / "fold_0" / "predictions.csv").read_text() == \
        (run_full / "fold_0" / "predictions.csv").read_text()


def test_refusals_are_one_line_exit_2(cohort, tmp_path, capsys):
    manifest = cohort / "manifest.csv"
    base = ["cv", "--manifest", str(manifest), "--out", str(tmp_path / "r"), "--device", "cpu",
            "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    # --fold out of range
    assert main(base + ["--fold", "4"]) == 2
    assert "--fold: must be in 0..3" in capsys.readouterr().err
    # a mask ROI without masks
    no_mask = cohort / "manifest_without_masks.csv"
    no_mask.write_text(pd.read_csv(manifest).drop(columns=["mask"]).to_csv(index=False))
    args = ["cv", "--manifest", str(no_mask), "--out", str(tmp_path / "r2"),
            "--set", "data.cache_dir=" + str(tmp_path / "cache")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "roi is 'mask' but 24 of 24 rows have no mask" in err and "\n" not in err
    # more folds than patients of a class
    assert main(base + ["--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "5 folds need at least 5 patients" in err and "CP 4" in err
    # a recipe's tSP options kept under --head softmax: named by their key, before anything is written
    assert main(base + ["--head", "softmax", "--set", "model.head_kwargs={form: paper, nu: 7.0}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.head_kwargs.form: not an option of head 'softmax' (and 'nu')" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_a_run_folder_of_another_manifest_is_refused(cohort, tmp_path, finished):
    run, *_ = finished
    cfg = load_yaml(run / "configs" / "config.yaml")
    other = cohort / "manifest_relabelled.csv"
    table = pd.read_csv(cohort / "manifest.csv")
    table.loc[0, "label"] = "PDAC" if table.loc[0, "label"] != "PDAC" else "CP"
    other.write_text(table.to_csv(index=False))
    import shutil
    shutil.copytree(run, tmp_path / "copy")
    cfg["data"]["manifest"] = str(other)
    from pancls.config import dump_yaml
    dump_yaml(cfg, tmp_path / "copy" / "configs" / "config.yaml")  # same config, the manifest's content changed
    with pytest.raises(UserError, match="split from a different manifest"):
        cv.run(cv.load_config(cfg), tmp_path / "copy", resume=True, log=lambda _: None)


def test_nan_loss_stops_the_fold_and_names_the_epoch(config, cohort, tmp_path):
    cfg = config(cohort, tmp_path, **{"train.lr": 1e12, "train.optimizer": "sgd", "model.head": "softmax",
                                      "train.momentum": 0.9})
    with pytest.raises(UserError, match=r"fold 0: training diverged: the mean loss of epoch \d"):
        cv.run(cfg, tmp_path / "run", fold=0, log=lambda _: None)
    assert not (tmp_path / "run" / "fold_0" / "fold.json").exists()


def test_non_finite_outputs_stop_the_fold_instead_of_scoring_as_class_0(config, cohort, tmp_path, monkeypatch):
    """A network whose training loss stayed finite can still output NaN for a study (the engine's check is
    on the loss): the fold stops with one line, and no predictions.csv scores those rows as PDAC."""
    from pancls.train import engine

    real = engine.predict_logits

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out["logits"][0] = float("nan")
        return out

    monkeypatch.setattr(engine, "predict_logits", broken)
    cfg = config(cohort, tmp_path, **{"train.epochs": 1, "train.warmup_epochs": 0})
    with pytest.raises(UserError, match=r"fold 0: the model's outputs are not finite numbers for 1 of \d+ "
                                        r"inner validation studies \(training diverged\)"):
        cv.run(cfg, tmp_path / "run", fold=0, log=lambda _: None)
    assert not (tmp_path / "run" / "fold_0" / "predictions.csv").exists()
    assert not (tmp_path / "run" / "fold_0" / "fold.json").exists()


@pytest.mark.parametrize("head", ["tsp", "softmax", "cosine"])
def test_torchscript_round_trip_of_the_3d_model(head, tmp_path):
    from pancls.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet10", head, 6, backbone_kwargs={"spatial_dims": 3, "in_channels": 2,
                                                               "widen_factor": 0.125}).eval()
    x = torch.randn(2, 2, 16, 16, 8)
    traced = torch.jit.trace(model, x)
    traced.save(str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    y = torch.randn(3, 2, 16, 16, 8)  # another batch size and values: the trace is not specialised to x
    assert torch.allclose(loaded(y), model(y), atol=1e-6)


@pytest.mark.parametrize("path", [cv.DEMO_CONFIG, cv.FULL_CONFIG, *sorted((cv.DEMO_CONFIG.parents[2] / "configs").glob("cv_*.yaml"))],
                         ids=lambda p: p.name)
def test_shipped_cv_recipes_load_and_build(path):
    from pancls.schemas import build_model_and_loss

    cfg = cv.load_config(load_yaml(path))
    model, _ = build_model_and_loss(cv.resolve_model(cfg), cfg.loss, [315, 82, 60, 45, 20, 8])
    x = torch.zeros(1, len(cfg.preprocess.windows), *cfg.preprocess.size)
    assert model.eval()(x).shape == (1, 6)


def test_a_dataset_of_links_needs_its_store_in_allowed_roots(config, cohort, tmp_path):
    from pancls.data.manifest import ManifestError

    table = pd.read_csv(cohort / "manifest.csv")
    ds = tmp_path / "links"
    for column in ("image", "mask"):
        for rel in table[column]:
            (ds / rel).parent.mkdir(parents=True, exist_ok=True)
            (ds / rel).symlink_to(cohort / rel)
    table.to_csv(ds / "manifest.csv", index=False)
    cfg = config(cohort, tmp_path)
    cfg.data.manifest = str(ds / "manifest.csv")
    with pytest.raises(ManifestError, match="allowed_roots"):
        cv.load_records(cfg, log=lambda _: None)
    cfg.data.allowed_roots = [str(cohort)]
    _, records = cv.load_records(cfg, log=lambda _: None)
    assert len(records) == len(table)


def test_resume_without_config_rereads_the_runs_own_config(finished, tmp_path, capsys):
    """`pancls cv --resume --out RUN` continues the run as it was started (its configs/config.yaml: another
    manifest and recipe than the demo defaults here), retraining nothing that is finished; a flag that would
    change the run is still refused with one line naming the folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    weights = {k: (run / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in range(4)}
    assert main(["cv", "--resume", "--out", str(run)]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    assert {k: (run / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in range(4)} == weights
    assert main(["cv", "--resume", "--out", str(run), "--head", "softmax"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config differs" in err[0] and str(run) in err[0] and "model.head: " in err[0]


def test_clinical_defaults_follow_issue_16():
    """Issue 16's evidence sets the clinical defaults: a tSP head (the method under test) in its best measured
    form, the paper form with nu = 7, with logit adjustment, in the dataclass default and in both shipped
    full-cohort recipes that a user starts from; and --head softmax works on each (no tSP-only options)."""
    from pancls.config import apply_flags
    from pancls.heads import TSPHead
    from pancls.schemas import build_model_and_loss

    expected = ("tsp_paper_nu7", "logit_adjust")
    assert (cv.CVConfig().model.head, cv.CVConfig().loss.name) == expected
    for path in (cv.DEMO_CONFIG, cv.FULL_CONFIG):
        cfg = cv.load_config(load_yaml(path))
        assert (cfg.model.head, cfg.loss.name) == expected, path
        model, _ = build_model_and_loss(cv.resolve_model(cfg), cfg.loss, [315, 82, 60, 45, 20, 8])
        assert isinstance(model.head, TSPHead) and (model.head.form, model.head.nu) == ("paper", 7.0)
        softmax = cv.load_config(apply_flags(load_yaml(path), {"model.head": "softmax"}))
        build_model_and_loss(cv.resolve_model(softmax), softmax.loss, [315, 82, 60, 45, 20, 8])


def _cv_compare():
    import importlib.util

    path = cv.DEMO_CONFIG.parents[2] / "scripts" / "cv_compare.py"
    spec = importlib.util.spec_from_file_location("cv_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(_cv_compare().VARIANTS))
def test_every_cv_compare_variant_builds_on_the_demo_recipe(name):
    """scripts/cv_compare.py's variants are --head/--loss/--set on the demo recipe: each must pass the strict
    schema and build its model, so that a comparison never dies at its fifth variant."""
    from pancls.config import apply_flags, apply_overrides
    from pancls.schemas import build_model_and_loss

    head, loss, extra = _cv_compare().VARIANTS[name]
    data = apply_overrides(apply_flags(load_yaml(cv.DEMO_CONFIG), {"model.head": head, "loss.name": loss}), extra)
    cfg = cv.load_config(data)
    model, criterion = build_model_and_loss(cv.resolve_model(cfg), cfg.loss, [315, 82, 60, 45, 20, 8])
    x = torch.zeros(2, len(cfg.preprocess.windows), *cfg.preprocess.size)
    assert model.eval()(x).shape == (2, 6) and (cfg.model.head, cfg.loss.name) == (head, loss)


def test_a_damaged_or_changed_run_folder_is_one_line_for_report_and_resume(finished, cohort, tmp_path, capsys):
    """A JSON file cut short (splits, a fold record), a manifest changed since the split, a resume that would
    relabel finished folds with another length: one line, exit 2, nothing rewritten."""
    import shutil

    def copy(name):
        shutil.copytree(finished[0], tmp_path / name)
        return tmp_path / name

    for name, file in (("splits", "splits.json"), ("fold", "fold_2/fold.json")):
        run = copy(name)
        (run / file).write_text((run / file).read_text()[:20])
        for args in (["report", str(run)], ["cv", "--resume", "--out", str(run)]):
            assert main(args) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pancls")]
            assert len(err) == 1 and "damaged: not valid JSON" in err[0] and file.split("/")[-1] in err[0], err
    # the manifest's rows changed since the split: report refuses instead of a KeyError
    run = copy("manifest")
    cfg = load_yaml(run / "configs" / "config.yaml")
    table = pd.read_csv(cohort / "manifest.csv")
    table.loc[0, "patient_id"] = "NEW0001"  # a patient the splits do not know
    (cohort / "manifest_grown.csv").write_text(table.to_csv(index=False))
    cfg["data"]["manifest"] = str(cohort / "manifest_grown.csv")
    from pancls.config import dump_yaml

    dump_yaml(cfg, run / "configs" / "config.yaml")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the manifest changed since this run was split" in err[0]
    # another length on resume would pool folds of two lengths under one label
    run = copy("epochs")
    assert main(["cv", "--resume", "--out", str(run), "--epochs", "20"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_splits_that_cannot_train_every_fold_are_refused_before_the_folder(cohort, tmp_path):
    from pancls.data.classes import DEFAULT_CLASSES
    from pancls.data.manifest import load_manifest
    from pancls.data.splits import load_or_make_splits

    manifest = load_manifest(cohort / "manifest.csv", DEFAULT_CLASSES)
    records, classes = manifest.records(), list(manifest.classes)
    # the default five inner folds on a cohort with four CP patients, three of them training patients per fold
    with pytest.raises(UserError, match="cannot be split into 5 inner folds") as info:
        load_or_make_splits(tmp_path / "a", records, classes, 4, 0, 5, manifest.root)
    assert info.value.where == "cv.inner_folds" and "lower cv.inner_folds" in info.value.reason
    # a fold column that puts every CP patient into fold 0: fold 0 would train without CP
    cp = classes.index("CP")
    placed = [dict(r, fold=0 if r["label"] == cp else i % 4) for i, r in enumerate(records)]
    seen = {r["fold"] for r in placed}
    assert seen == {0, 1, 2, 3}
    with pytest.raises(UserError, match="fold 0: no training patient of class CP; the manifest's fold column"):
        load_or_make_splits(tmp_path / "b", placed, classes, 4, 0, 2, manifest.root)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_values_that_would_fail_after_training_are_refused_when_read(tmp_path, capsys):
    for value in ("0", "-3"):
        assert main(["cv", "--out", str(tmp_path / "r"), "--set", f"cv.bootstrap={value}"]) == 2
        assert "cv.bootstrap: must be an integer >= 10" in capsys.readouterr().err
    assert main(["cv", "--out", "/proc/pancls_run"]) == 2  # no one can create a folder there, root included
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write into the run folder's parent folder" in err[0]
    assert main(["cv", "--out", str(tmp_path / "r"), "--device", "cdua"]) == 2  # lt's one check, with its hint
    assert "config.device: unknown device 'cdua' (did you mean 'cuda'?)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_manifest_path_is_stored_absolute(cohort, tmp_path, monkeypatch):
    """A run started with a relative --manifest resumes from any folder, and with the path spelled out."""
    import argparse

    from pancls.commands import cv as cv_command

    parser = argparse.ArgumentParser()
    cv_command.add_arguments(parser)
    monkeypatch.chdir(cohort)
    args = parser.parse_args(["--manifest", "manifest.csv", "--out", str(tmp_path / "r")])
    assert cv_command.build_config(args).data.manifest == str(cohort / "manifest.csv")


def test_a_manifest_without_config_gets_the_full_recipe_not_the_cpu_demo(tmp_path, capsys):
    """`pancls cv --manifest M` on a hospital cohort must not train the CPU demo's quarter-width ResNet-10 on a
    32 x 32 x 16 ROI with device: cpu; the demo recipe is for the synthetic demo cohort only."""
    import argparse

    from pancls.commands import cv as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    own = command.build_config(parser.parse_args(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path)]))
    full = cv.load_config(load_yaml(cv.FULL_CONFIG))
    assert (own.model.backbone, own.preprocess.size, own.train.epochs, own.device) == \
        (full.model.backbone, full.preprocess.size, full.train.epochs, "auto") == ("resnet18", [64, 64, 32], 60, "auto")
    demo = command.build_config(parser.parse_args(["--out", str(tmp_path)]))
    assert (demo.model.backbone, demo.device) == ("resnet10", "cpu")
    chosen = command.build_config(parser.parse_args(["--manifest", "m.csv", "--config", str(cv.DEMO_CONFIG),
                                                     "--out", str(tmp_path)]))
    assert chosen.model.backbone == "resnet10"  # --config wins


def test_a_backbone_from_another_cv_run_starts_each_fold_from_its_own_fold_never_from_one_that_saw_its_test_fold(
        config, cohort, tmp_path, finished):
    """model.init_backbone_from in cv (stage 2 of a decoupled recipe): fold k starts from the source run's fold_k,
    whose training never saw fold k's test patients. One fold's checkpoint for every fold, or a run split
    otherwise, would evaluate folds with a backbone trained on their test patients: refused before anything is
    written."""
    source, *_ = finished
    splits = json.loads((source / "splits.json").read_text())
    cfg = config(cohort, tmp_path, **{"model.init_backbone_from": str(source), "model.freeze_backbone": True})
    assert cv.backbone_sources(cfg, splits) == {k: str(source / f"fold_{k}") for k in range(4)}
    for one_fold in (source / "fold_0", source / "fold_0" / "last.pt"):
        bad = config(cohort, tmp_path, **{"model.init_backbone_from": str(one_fold)})
        with pytest.raises(UserError, match="the backbone for fold 1 .* trained on [0-9]+ of this run's fold-1 test"):
            cv.backbone_sources(bad, splits)
        with pytest.raises(UserError, match="give the cv run folder itself"):
            cv.run(bad, tmp_path / "refused", log=lambda _: None)
        assert not (tmp_path / "refused").exists()
    shifted = {**splits, "test_fold": {p: (f + 1) % 4 for p, f in splits["test_fold"].items()}}
    with pytest.raises(UserError, match="its splits differ from this run's"):
        cv.backbone_sources(cfg, shifted)
    other_ids = {**splits, "manifest_sha256": "0" * 64,  # a re-ingested cohort: no patient id in common
                 "test_fold": {f"x{p}": f for p, f in splits["test_fold"].items()}}
    with pytest.raises(UserError, match="a cv run of another manifest"):
        cv.backbone_sources(cfg, other_ids)
    elsewhere = tmp_path / "weights.pt"  # not from a cv run: nothing to check, every fold starts from it
    elsewhere.write_bytes(b"")
    other = config(cohort, tmp_path, **{"model.init_backbone_from": str(elsewhere)})
    assert cv.backbone_sources(other, splits) == {k: str(elsewhere) for k in range(4)}
    # trained: fold 1's frozen backbone is the source's fold 1 backbone, not fold 0's
    cv.run(cfg, tmp_path / "stage2", fold=1, log=lambda _: None)
    new = torch.load(tmp_path / "stage2" / "fold_1" / "last.pt", weights_only=False)["model"]
    own, first = (torch.load(source / f"fold_{j}" / "last.pt", weights_only=False)["model"] for j in (1, 0))
    keys = [k for k in new if k.startswith("backbone.") and new[k].is_floating_point()]
    assert keys and all(torch.equal(new[k], own[k]) for k in keys)
    assert not all(torch.equal(new[k], first[k]) for k in keys)


def test_a_run_or_fold_another_process_trains_is_refused_and_report_cleans_a_killed_summary(
        config, cohort, tmp_path, finished):
    """Two processes never train one run (a second `pancls cv --resume` trained the same folds beside the first,
    its epochs interleaved in metrics.jsonl), nor one fold (a --fold k worker beside a whole-run process);
    `pancls report` removes what a summary killed mid-write left (only `pancls cv` without --fold did)."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    cfg = cv.load_config(load_yaml(run / "configs" / "config.yaml"))
    shutil.rmtree(run / "fold_2")  # a fold to train
    code = ("import sys; from pancls.io import hold_lock\n"
            "with hold_lock(sys.argv[1], 'x'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    for held, call in ((run, dict()), (run / "fold_2", dict(fold=2))):
        held.mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", code, str(held)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(UserError, match="in use by another pancls process") as info:
                cv.run(cfg, run, resume=True, log=lambda _: None, **call)
            assert info.value.where == str(held)
        finally:
            proc.kill()
            proc.wait()
    assert not (run / "fold_2" / "fold.json").exists()
    stale = [run / ".summary.json.0a1b2c3d.tmp.json", run / "figures" / ".roc.png.0a1b2c3d.tmp.png"]
    for path in stale:
        path.write_bytes(b"half")
    cv.run(cfg, run, resume=True, fold=2, summary=False, log=lambda _: None)  # a worker: the summary is not its
    assert all(path.exists() for path in stale)
    assert main(["report", str(run)]) == 0
    assert not any(path.exists() for path in stale)


def test_a_refused_run_leaves_nothing_in_an_existing_folder_and_lock_errors_are_one_line(cohort, tmp_path):
    """A refusal writes nothing: not even the run lock's file in a folder that holds no run yet; a lock file
    that cannot be made is one line, not a traceback."""
    import os

    from pancls.io import hold_lock

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(["cv", "--manifest", str(cohort / "manifest.csv"), "--out", str(existing), "--folds", "5",
                 "--device", "cpu", "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert os.listdir(existing) == ["notes.txt"]
    with pytest.raises(UserError, match="cannot create the lock file .lock of the run"):
        with hold_lock("/proc", "the run"):
            pass


def test_a_fold_without_its_selected_weights_is_refused_not_scored_with_the_last_epoch(finished, tmp_path):
    """best_inner selection needs best.pt; without it (a run stopped between its two checkpoints by an older
    pancls) the fold was silently scored with last.pt, the one thing the inner split did not choose."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    (run / "fold_1" / "best.pt").unlink()
    (run / "fold_1" / "fold.json").unlink()
    cfg = cv.load_config(load_yaml(run / "configs" / "config.yaml"))
    with pytest.raises(UserError, match="fold 1: no best.pt holds the epoch the inner validation split selected"):
        cv.run(cfg, run, resume=True, log=lambda _: None)
