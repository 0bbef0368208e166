"""Models: a backbone from :data:`BACKBONES` plus a head from :data:`pancls.heads.HEADS`.

``create_model(backbone="resnet32_cifar", head="tsp", num_classes=10, head_kwargs={...})`` is the one
entry point (after timm's ``create_model``). A head only ever sees the backbone's feature width, so
every head works on every backbone, 2D or 3D.
"""
from __future__ import annotations

from typing import Any, Mapping

# Each backbone module registers its networks into BACKBONES when imported; importing them here makes
# every registered name available as soon as pancls.models is.
from pancls.models import monai_resnet, resnet_2d, resnet_cifar  # noqa: F401
from pancls.models.backbones import BACKBONES
from pancls.models.classifier import Classifier
from pancls.validation import InvalidParameter, check_scalar


def create_model(
    backbone: str,
    head: str,
    num_classes: int,
    backbone_kwargs: Mapping[str, Any] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
) -> Classifier:
    """Build ``Classifier(backbone, head)`` by name.

    Parameters
    ----------
    backbone : str
        A name in :data:`BACKBONES` (``resnet32_cifar``, ``resnet10``, ``resnet18``, ...).
    head : str
        A name in :data:`pancls.heads.HEADS` (``linear``, ``cosine``, ``tsp``).
    num_classes : int
        K, the number of classes.
    """
    from pancls.heads import HEADS

    check_scalar(num_classes, "num_classes", int, min_val=2)
    backbone_kwargs, head_kwargs = dict(backbone_kwargs or {}), dict(head_kwargs or {})
    try:
        net = BACKBONES.create(backbone, **backbone_kwargs)
    except InvalidParameter as exc:  # a bad option the caller gave is named as the option of that mapping
        raise exc.within("backbone_kwargs", backbone_kwargs) from None
    try:
        classifier_head = HEADS.create(head, in_features=net.out_features, num_classes=num_classes, **head_kwargs)
    except InvalidParameter as exc:
        raise exc.within("head_kwargs", head_kwargs) from None
    return Classifier(net, classifier_head)


__all__ = ["BACKBONES", "Classifier", "create_model"]
