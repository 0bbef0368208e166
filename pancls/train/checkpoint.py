"""Crash-safe training checkpoints and the RNG/config bookkeeping that makes resuming exact.

A checkpoint is one ``torch.save`` file written to a temporary name and renamed into place
(:func:`pancls.io.atomic_save`), so a run killed mid-write keeps its previous ``last.pt``. Everything
in it is plain containers, numbers, strings and tensors, which lets :func:`load_checkpoint` use
``torch.load(weights_only=True)``: loading a checkpoint never executes pickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch

from pancls.errors import UserError, exception_text
from pancls.io import atomic_save


def refuse_unresumed(exists: bool, where: str | os.PathLike, resume: bool, what: str = "run",
                     kept: str = "") -> None:
    """The refusal of every run folder (``pancls lt``, :func:`pancls.train.engine.fit`, ``pancls cv``): a
    run already there is continued only when asked (``--resume``), never overwritten or silently mixed in.
    ``kept`` says what a resume keeps (cv: finished folds)."""
    if exists and not resume:
        raise UserError(f"a {what} already exists here; pass --resume to continue it{kept} or choose another --out",
                        where)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` atomically: the file at ``path`` is either the old or the new checkpoint."""
    atomic_save(path, lambda tmp: torch.save(dict(state), tmp))


#: what a checkpoint must hold to resume a run (:func:`save_checkpoint` writes them)
RESUME_KEYS = ("config", "epoch", "global_step", "model", "loss", "optimizer", "scaler", "schedule", "history",
               "best", "last_eval", "rng")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = ("model",)) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a missing or damaged file, or one that is not a
    mapping holding the ``required`` keys (another program's ``.pt``), is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise UserError(f"checkpoint is damaged or not a pancls checkpoint ({exception_text(exc, path)})",
                        path) from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise UserError(f"not a pancls checkpoint (no {', '.join(map(repr, missing))})", path)
    return state


def capture_rng_state() -> Dict[str, Any]:
    """The global RNG states of python, numpy, torch (CPU) and every CUDA device, as tensors and ints."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only where CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
        "has_gauss": nps["has_gauss"],
        "gauss": nps["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists and tuples become lists (the form JSON and YAML keep)."""
    flat: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, (list, tuple)) else value
    return flat


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a (flattened) config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _model_default(name: str) -> Any:
    from pancls.schemas import ModelConfig

    return ModelConfig.__dataclass_fields__[name].default


#: Config keys added after runs were written, each with its default: the value that does what a run without the
#: key did. A run whose stored config lacks such a key resumes under a current config holding exactly that value
#: (keys are matched after any prefix: "run.model.freeze_backbone" is "model.freeze_backbone").
ADDED_KEYS: Dict[str, Any] = {f"model.{name}": _model_default(name) for name in ("init_backbone_from",
                                                                                  "freeze_backbone")}


def _predates(key: str, value: Any) -> bool:
    """``key`` is one of :data:`ADDED_KEYS` at the value a run without it behaved by."""
    return any((key == added or key.endswith("." + added)) and value == default
               for added, default in ADDED_KEYS.items())


def check_same_config(stored: Mapping[str, Any], current: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Refuse to resume when the (flattened) configs differ; the message lists each differing key. A key of
    :data:`ADDED_KEYS` that the stored config predates counts as equal at its neutral value."""
    current = {k: v for k, v in current.items() if k in stored or not _predates(k, v)}
    if dict(stored) == dict(current):
        return

    def show(config: Mapping[str, Any], key: str) -> str:
        return repr(config[key]) if key in config else "(absent)"

    diffs = [f"{k}: {show(stored, k)} -> {show(current, k)}" for k in sorted(set(stored) | set(current))
             if k not in stored or k not in current or stored[k] != current[k]]
    raise UserError(
        "the config differs from the run being resumed (" + "; ".join(diffs)
        + "); resume with the original config or choose another --out", where)
