"""``Classifier = backbone + head``: the one model type for 2D benchmarks and 3D CT."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone producing a feature vector, followed by a classification head.

    The backbone must expose ``out_features`` (its feature width) and map a batch to ``(N, out_features)``.
    After :meth:`freeze_backbone` only the head trains: the backbone's weights take no gradient and its
    BatchNorm layers keep their running statistics (``train()`` leaves the backbone in eval mode), as in the
    classifier re-training stage of Kang et al., "Decoupling Representation and Classifier for Long-Tailed
    Recognition", ICLR 2020.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def freeze_backbone(self) -> "Classifier":
        """Fix the backbone (weights and BatchNorm statistics); returns ``self``."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        return self

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
