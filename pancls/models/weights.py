"""Loading weights into a network that was built from its config: one fit check, two sources.

* :func:`describe_mismatch`: the one check that a state dict fits a network (keys and shapes), worded for a
  one-line refusal; used for MedicalNet weights (:mod:`pancls.models.monai_resnet`) and for a pancls run's
  backbone (:func:`load_backbone_from`).
* :func:`load_backbone_from`: the backbone of a finished ``pancls lt``/``pancls cv`` run (its ``last.pt``) into a
  new classifier whose head starts afresh: stage 2 of a decoupled recipe (classifier re-training, cRT: Kang et
  al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020), or any fine-tuning
  that starts from a pancls backbone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import nn

#: how many key names a refusal lists per kind before "..."
SHOWN = 6


def describe_mismatch(own: Mapping, state: Mapping) -> str:
    """``""`` when ``state`` has exactly the keys of ``own`` with the same shapes; otherwise what differs, as
    ``"missing N: a, b ...; unexpected N: ...; shape differs: ..."`` (at most :data:`SHOWN` names per kind)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))

    def names(keys) -> str:
        return ", ".join(keys[:SHOWN]) + (" ..." if len(keys) > SHOWN else "")

    return "; ".join(part for part in (
        f"missing {len(missing)}: {names(missing)}" if missing else "",
        f"unexpected {len(unexpected)}: {names(unexpected)}" if unexpected else "",
        f"shape differs: {names(shapes)}" if shapes else "") if part)


def load_backbone_from(net: nn.Module, source: str, key: str = "model.init_backbone_from") -> Path:
    """Copy the backbone weights of a pancls run folder (its ``last.pt``) or checkpoint file into ``net.backbone``
    (a :class:`~pancls.models.classifier.Classifier`); the head is left as built. Returns the checkpoint read.

    Refused in one line naming the file and ``key``: no checkpoint there, not a pancls checkpoint, or a backbone
    that does not fit the configured one (its missing, unexpected and reshaped keys)."""
    from pancls.errors import UserError
    from pancls.train.checkpoint import load_checkpoint

    path = Path(source)
    if path.is_dir():
        path = path / "last.pt"
    checkpoint = load_checkpoint(path, required=())  # refused below, naming the config key
    weights = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise UserError(f"{key}: not a pancls checkpoint (it holds no 'model' weights)", path)
    state = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    details = describe_mismatch(net.backbone.state_dict(), state)
    if details:
        raise UserError(f"{key}: its backbone does not fit model.backbone as configured ({details})", path)
    net.backbone.load_state_dict(state)
    return path
