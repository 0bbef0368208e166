"""What several subcommands share: the recipe a command starts from, and the config keys that hold file paths,
made absolute before a run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

#: Config keys (dotted) holding a file or folder path, read relative to the working directory: the data file of
#: `pancls lt`, the manifest and folders of `pancls cv`, pretrained backbone weights and a run to start the backbone
#: from, of both.
PATH_KEYS = ("data.path", "data.train_list", "data.eval_list", "data.manifest", "data.root", "data.cache_dir",
             "model.backbone_kwargs.pretrained", "model.init_backbone_from")


def absolute_paths(data: dict, keys: Iterable[str] = PATH_KEYS) -> dict:
    """Make each relative path under ``keys`` of a config mapping absolute (``os.path.abspath``: against the
    working directory, ``..`` folded), in place; returns it.

    The resolved ``config.yaml`` a command writes, and the config a resumed run is compared with, then name a
    file the same way however it was typed: ``cifar10.npz`` from the data folder and ``/data/cifar10.npz`` are
    one file, not "a different config". Keys that are missing, empty or not text are left alone."""
    for key in keys:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(name), str) and node[name]:
            node[name] = os.path.abspath(node[name])
    return data


def starting_recipe(config: Optional[Path], resume: bool, stored: Path, default: Optional[Path] = None) -> dict:
    """The config mapping a training command starts from, before its flags: ``--config`` when given; with
    ``--resume`` and no ``--config``, the run's own resolved config ``stored`` when it exists, so that a run
    resumes as it was started whatever the defaults are now (nnU-Net's "the experiment is a folder"; flags that
    would change it are then refused by the resume check); else ``default`` (a packaged recipe), or nothing."""
    from pancls.config import load_yaml

    if config is not None:
        return load_yaml(config)
    if resume and Path(stored).is_file():
        return load_yaml(stored)
    return load_yaml(default) if default is not None else {}
