"""Config sections shared by every experiment command (``lt`` and ``cv``): the model and the loss.

Each is a dataclass read by :func:`pancls.config.from_dict` (unknown keys refused) and turned into objects by
:func:`build_model_and_loss`, so that a CIFAR run and a CT cross-validation build their networks the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence


@dataclass
class ModelConfig:
    """``model:`` -- a backbone of :data:`pancls.models.BACKBONES` plus a head of :data:`pancls.heads.HEADS`."""

    backbone: str = "resnet32_cifar"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    head: str = "tsp"
    head_kwargs: Dict[str, Any] = field(default_factory=dict)
    #: start the backbone from a finished pancls run (its folder or a checkpoint file); the head starts afresh.
    #: With ``freeze_backbone`` this is the classifier re-training (cRT) stage of a decoupled recipe.
    init_backbone_from: Optional[str] = None
    #: train the head only: backbone weights and BatchNorm statistics stay as they are
    freeze_backbone: bool = False

    def __post_init__(self) -> None:  # an unknown name is refused when the config is read, named by its key
        from pancls.heads import HEADS
        from pancls.models import BACKBONES

        BACKBONES.get(self.backbone, "backbone")
        HEADS.get(self.head, "head")


@dataclass
class LossConfig:
    """``loss:`` -- a name of :data:`pancls.losses.LOSSES` and its options."""

    name: str = "ce"
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pancls.losses import LOSSES

        LOSSES.get(self.name, "name")


def build_model_and_loss(model: ModelConfig, loss: LossConfig, class_counts: Sequence[int], init_weights: bool = True):
    """``(Classifier, LongTailLoss)`` for a training set with ``class_counts[k]`` samples of class k.

    ``init_weights``: read ``model.init_backbone_from`` (a run about to start); ``False`` for a network whose
    weights come from its own checkpoint next (a resumed run, a finished run re-read), which then needs no access
    to the run it once started from."""
    from pancls.losses import create_loss
    from pancls.models import create_model
    from pancls.validation import InvalidParameter

    # A bad option is named by its config key (model.head_kwargs.scale_init, loss.kwargs.max_m).
    try:
        net = create_model(model.backbone, model.head, len(class_counts), backbone_kwargs=model.backbone_kwargs,
                           head_kwargs=model.head_kwargs)
    except InvalidParameter as exc:
        raise exc.within("model", ("backbone_kwargs", "head_kwargs")) from None
    if model.init_backbone_from and init_weights:
        from pancls.models.weights import load_backbone_from

        load_backbone_from(net, model.init_backbone_from)
    if model.freeze_backbone:
        net.freeze_backbone()
    try:
        criterion = create_loss(loss.name, list(class_counts), **loss.kwargs)
    except InvalidParameter as exc:
        raise exc.within("loss.kwargs", loss.kwargs) from None
    return net, criterion
