"""Export a ``pancls cv`` run folder as a MONAI bundle (the exchange format of MONAI Deploy and MONAI Label).

Layout (MONAI Bundle Specification)::

    BUNDLE/configs/metadata.json    versions, task, network_data_format (input: windowed CT, output: K probabilities)
    BUNDLE/configs/inference.json   loader + the run's own preprocessing + the network, for ``monai.bundle run``
    BUNDLE/models/model.ts          TorchScript of the fold ensemble: mean_k softmax(z_k / T_k), with metadata.json
                                    and inference.json inside (MONAI's save_net_with_metadata format)
    BUNDLE/models/model.pt          the state dict of :class:`FoldEnsemble` (the spec's required file)
    BUNDLE/docs/README.md           the run's model card;  docs/license.txt

The preprocessing in ``inference.json`` is :func:`pancls.data.transforms.deterministic_specs` of the run's
config -- the same list training and ``pancls predict`` instantiate -- so the bundle cannot drift from them,
after a first step that reads the files as ``pancls predict`` does (:class:`pancls.predict.LoadStudyd`:
orientation checked, the mask aligned on the image's grid or refused). It names pancls transforms (that one,
and ``RequireForegroundd``, which refuses an empty mask), so the bundle needs pancls importable; the network
itself is plain TorchScript.

Run it::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
        --image CT.nii.gz [--mask MASK.nii.gz]        # -> BUNDLE/eval/probabilities.json

``python -m monai.bundle verify_metadata --meta_file BUNDLE/configs/metadata.json --filepath SCHEMA`` checks the
metadata; :data:`SCHEMA_FILE` is a JSON Schema written from the specification's list of mandatory keys (the
published schema is a download, and nothing here downloads at run time).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from torch import nn

from pancls.errors import UserError

SCHEMA_FILE = Path(__file__).parent / "recipes" / "bundle_metadata_schema.json"
PUBLISHED_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                    "meta_schema_20220324.json")


class FoldEnsemble(nn.Module):
    """``x -> mean_k softmax(model_k(x) / T_k)``: the fold models with their temperatures, as one network.

    Parameters
    ----------
    models : the fold models (each ``(B, C, *size) -> (B, K)`` logits).
    temperatures : one positive temperature per model (fitted on its fold's inner validation split).
    """

    def __init__(self, models: Sequence[nn.Module], temperatures: Sequence[float]):
        super().__init__()
        if len(models) != len(temperatures) or not models:
            raise ValueError(f"need one temperature per model, got {len(models)} models and {len(temperatures)}")
        self.folds = nn.ModuleList(models)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))

    def fold_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(F, B, K)``: each fold model's ``softmax(z_k / T_k)``."""
        return torch.stack([torch.softmax(m(x).float() / self.temperatures[i], dim=1) for i, m in enumerate(self.folds)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fold_probabilities(x).mean(0)


def to_torchscript(loaded) -> torch.jit.ScriptModule:
    """Trace the ensemble of a :class:`pancls.predict.LoadedRun` on a zero input of the run's shape."""
    ensemble = loaded.ensemble.cpu().eval()
    p = loaded.cfg.preprocess
    example = torch.zeros(1, len(p.windows), *p.size)
    with torch.no_grad():
        return torch.jit.trace(ensemble, example, check_trace=True)


def inference_config(loaded) -> Dict[str, Any]:
    """``configs/inference.json``: read ``@image`` (and ``@mask``), preprocess, run ``model.ts``, write
    ``@output_dir/probabilities.json``."""
    from pancls.config import to_dict
    from pancls.data.transforms import IMAGE_KEY, MASK_KEY, deterministic_specs

    p = loaded.cfg.preprocess
    keys = [IMAGE_KEY, MASK_KEY] if loaded.requires_mask else [IMAGE_KEY]
    item = "dict(image=@image, mask=@mask)" if loaded.requires_mask else "dict(image=@image)"
    return {
        "imports": ["$import json", "$import os", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "image": "",
        "mask": "",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "classes": list(loaded.classes),
        "roi": p.roi,
        "network": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device).eval()",
        # read as pancls predict reads the files (orientation checked, the mask aligned on the image's grid or
        # refused), then the run's own deterministic steps
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "pancls.predict.LoadStudyd", "keys": keys, "preprocess": to_dict(p)},
            *deterministic_specs(p, keys)[1:]]},
        "input": f"$torch.as_tensor(@preprocessing({item})['image'])",
        "probabilities": "$@network(@input[None].float().to(@device)).detach().cpu()[0].tolist()",
        "result": "$dict(classes=@classes, probabilities=dict(zip(@classes, @probabilities)), "
                  "predicted=@classes[max(range(len(@probabilities)), key=@probabilities.__getitem__)])",
        "run": ["$os.makedirs(@output_dir, exist_ok=True)",
                "$json.dump(@result, open(os.path.join(@output_dir, 'probabilities.json'), 'w'), indent=2)"],
    }


def bundle_metadata(loaded) -> Dict[str, Any]:
    """``configs/metadata.json``: the run's metadata plus the keys the MONAI bundle specification requires."""
    import monai
    import numpy as np

    from pancls import __version__

    meta = json.loads(json.dumps(loaded.metadata))
    io = meta["network_data_format"]
    io["outputs"]["pred"]["description"] = "mean over the fold models of softmax(logits / temperature)"
    meta.update({
        "schema": PUBLISHED_SCHEMA,
        "version": meta.get("version", "0.1.0"),
        "changelog": {meta.get("version", "0.1.0"): f"exported by pancls {__version__} from a pancls cv run"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # required, not optional: inference.json's first step is pancls's, and it reads with nibabel/SimpleITK
        # (MONAI >= 1.4 names the key so and rewrites the old "optional_packages_version" with a warning)
        "required_packages_version": {"pancls": __version__, "nibabel": _version_of("nibabel"),
                                      "SimpleITK": _version_of("SimpleITK")},
        "authors": "pancls users (the run's owners)",
        "copyright": "the run's owners",
        "intended_use": "Research use only; not a medical device, not for diagnosis or treatment decisions.",
        "data_type": "nibabel",
        "data_source": "the manifest of the pancls cv run (not distributed with the bundle)",
        "pancls_model_id": loaded.model_id,
        "pancls_config_sha256": loaded.config_sha256,
    })
    return meta


def _version_of(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def export(run: Path, out: Path, fold=None, force: bool = False) -> Dict[str, Any]:
    """Write the bundle of ``run`` into ``out`` (complete or not at all: built beside it, then renamed)."""
    from pancls.io import check_writable_folder, owned_temp_dir, publish_temp_dir
    from pancls.predict import load_run

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", out)
    target, source = out.resolve(), Path(run).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise UserError("is the run folder, inside it or holds it (--force would delete the run); choose a folder "
                        "of its own", out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError("the folder is not empty; choose another --out or pass --force to replace it", out)
    check_writable_folder(target.parent, "the --out's parent folder")
    loaded = load_run(run, fold=fold, device="cpu")
    # built beside out; a build a kill left (a folder of that prefix no process holds) is removed on the next export
    with owned_temp_dir(f".{out.name}.bundle-", target.parent) as build:
        _write_bundle(build, loaded, Path(run))
        if out.exists():
            shutil.rmtree(out)
        publish_temp_dir(build, out)
    return {"out": str(out), "model_id": loaded.model_id, "folds": [f.fold for f in loaded.folds]}


def _write_bundle(build: Path, loaded, run: Path) -> None:
    """The bundle's files into the empty folder ``build``."""
    from pancls.io import atomic_write_json, atomic_write_text

    for sub in ("configs", "models", "docs"):
        (build / sub).mkdir()
    from monai.data import save_net_with_metadata

    metadata, inference = bundle_metadata(loaded), inference_config(loaded)
    atomic_write_json(build / "configs" / "metadata.json", metadata)
    atomic_write_json(build / "configs" / "inference.json", inference)
    scripted = to_torchscript(loaded)
    # MONAI's TorchScript-with-metadata format: metadata.json (and inference.json) inside the file, so that
    # monai.data.load_net_with_metadata and monai.bundle.load(load_ts_module=True) read it (versions come from the
    # metadata itself: no timestamp, the same run exports the same file)
    save_net_with_metadata(scripted, str(build / "models" / "model.ts"), include_config_vals=False,
                           meta_values=metadata, more_extra_files={"inference.json": json.dumps(inference).encode()})
    torch.save(scripted.state_dict(), build / "models" / "model.pt")
    card = run / "MODEL_CARD.md"
    readme = card.read_text(encoding="utf-8") if card.exists() else "# pancls model\n"
    atomic_write_text(build / "docs" / "README.md", readme + _usage(loaded))
    atomic_write_text(build / "docs" / "license.txt",
                      "Research use only; not a medical device. Weights: the run owners' terms.\n")


def _usage(loaded) -> str:
    mask = " --mask MASK.nii.gz" if loaded.requires_mask else ""
    return f"""

## Running this bundle

    pip install pancls   # the preprocessing names one pancls transform
    python -m monai.bundle run --config_file configs/inference.json --bundle_root . --image CT.nii.gz{mask}

writes `eval/probabilities.json`. The ROI is `{loaded.cfg.preprocess.roi}`
({'a lesion mask on the image grid is required' if loaded.requires_mask else 'no mask needed'}).
`pancls predict` gives the same probabilities and adds quality flags, fold agreement and DICOM input.
"""
