"""``Classifier = backbone + head``: the one model type for 2D benchmarks and 3D CT."""
from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Backbone producing a feature vector, followed by a classification head.

    The backbone must expose ``out_features`` (its feature width) and map a batch to ``(N, out_features)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
