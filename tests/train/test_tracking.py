"""MLflow opt-in (train.mlflow): metrics and config reach MLflow, a resume continues the same MLflow run, and
asking for it without the package is one error naming the key."""
import dataclasses
import json
import sys

import pytest
import torch
from torch import nn

from pancls.errors import UserError
from pancls.train.engine import TrainConfig, fit
from pancls.train.loaders import TensorBatchLoader

CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, milestones=(2,), amp="off", progress=False,
                  tensorboard=False, mlflow=True, seed=3)


def _fit(run_dir, cfg=CFG, resume=False):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.arange(64) % 2
    x[y == 1] += 1.5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    return fit(model, TensorBatchLoader(x, y, cfg.batch_size, seed=1), TensorBatchLoader(x, y, 64, shuffle=False),
               nn.CrossEntropyLoss(), cfg, run_dir, device="cpu", resume=resume, log=lambda line: None,
               run_config={"model": {"head": "linear"}})


def test_without_mlflow_installed_the_key_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(UserError) as err:
        _fit(tmp_path / "run")
    assert err.value.where == "train.mlflow" and "pip install mlflow" in str(err.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_mlflow_is_not_in_the_resume_fingerprint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pytest.importorskip("mlflow")
    _fit(tmp_path / "run", dataclasses.replace(CFG, mlflow=False, epochs=2))
    _fit(tmp_path / "run", dataclasses.replace(CFG, mlflow=False), resume=True)  # switching it on/off is not a new run
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_metrics_and_params_reach_mlflow_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run = tmp_path / "run"
    _fit(run, dataclasses.replace(CFG, epochs=2))
    run_id = (run / "mlflow_run_id").read_text().strip()
    _fit(run, resume=True)
    assert (run / "mlflow_run_id").read_text().strip() == run_id
    from pancls.train.tracking import local_store

    client = mlflow.MlflowClient(tracking_uri=local_store(run))
    assert len(client.search_runs([client.get_experiment_by_name("pancls").experiment_id])) == 1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["train_loss"])) for r in lines]
    assert [m.value for m in client.get_metric_history(run_id, "eval_top1")] == pytest.approx(
        [r["eval_top1"] for r in lines])
    params = client.get_run(run_id).data.params
    assert params["train.lr"] == "0.05" and params["run.model.head"] == "linear" and "train.epochs" not in params
    assert client.get_run(run_id).data.tags["pancls.run_dir"] == str(run.resolve())
