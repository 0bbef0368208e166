"""Experiment tracking beside the run folder: MLflow, opt-in (``train.mlflow: true``), when it is installed.

TensorBoard stays the default log (``run_dir/tensorboard``). A group that keeps its experiments in MLflow sets
``train.mlflow: true`` (``--set train.mlflow=true``) and installs ``mlflow`` (or ``mlflow-skinny``); pancls
does not depend on it, and asking for it without the package is a one-line error naming the key.

Where it logs: ``MLFLOW_TRACKING_URI`` when set (the group's server), otherwise a store inside the run folder:
``run_dir/mlflow.db`` (SQLite, MLflow's recommended local store) when SQLAlchemy is installed (full ``mlflow``),
else the file store ``run_dir/mlruns`` (``mlflow-skinny``; MLflow 3 keeps it in maintenance mode behind
``MLFLOW_ALLOW_FILE_STORE``, which pancls sets for this case only). Browse with
``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`` (or ``RUN/mlruns``). The experiment is
``MLFLOW_EXPERIMENT_NAME`` or ``pancls``. What: the run's config fingerprint as parameters (the flattened keys a
resume must match), every numeric key of each ``metrics.jsonl`` line as a metric at step = epoch, and the run
folder as the tag ``pancls.run_dir``. A resumed run continues the same MLflow run (its id is kept in
``run_dir/mlflow_run_id``), logging from the first epoch it trains; only rank 0 logs. Nothing identifying a
patient is in a training config or its metrics, so nothing identifying leaves with them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from pancls.errors import UserError
from pancls.io import atomic_write_text

RUN_ID_FILE = "mlflow_run_id"
#: MLflow refuses longer parameter values; the full config is in the run folder anyway
_MAX_PARAM = 500


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise UserError("train.mlflow: true needs MLflow: pip install mlflow-skinny (or mlflow), or set it false; "
                        "TensorBoard logs are written without it", "train.mlflow") from None
    return mlflow


def local_store(run_dir: Path) -> str:
    """The tracking URI of the store inside ``run_dir`` (see the module docstring)."""
    try:
        import sqlalchemy  # noqa: F401  (MLflow's database stores need it)
    except ImportError:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (Path(run_dir) / "mlruns").resolve().as_uri()
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


class MLflowLogger:
    """One MLflow run per pancls run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        self.mlflow = _mlflow()
        self.run_dir = Path(run_dir)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            self.mlflow.set_tracking_uri(local_store(self.run_dir))
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "pancls")
        id_file = self.run_dir / RUN_ID_FILE
        run_id: Optional[str] = id_file.read_text().strip() if id_file.is_file() else None
        self.run = self.mlflow.start_run(run_id=run_id or None)
        if run_id is None:
            atomic_write_text(id_file, self.run.info.run_id + "\n")
            self.mlflow.set_tag("pancls.run_dir", str(self.run_dir.resolve()))
            self.mlflow.log_params({str(k)[:250]: str(v)[:_MAX_PARAM] for k, v in params.items()})

    def log_epoch(self, scalars: Mapping[str, float], epoch: int) -> None:
        """The epoch's numeric metrics (those TensorBoard gets), at step = epoch."""
        self.mlflow.log_metrics(dict(scalars), step=int(epoch))

    def close(self) -> None:
        self.mlflow.end_run()
