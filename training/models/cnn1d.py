"""A small baseline 1D CNN for 12-lead ECG multi-label classification.

Conv1d + BatchNorm + ReLU blocks, then global average pooling and one linear
layer. The global-average-pool head is deliberate: class activation maps are
``classifier.weight @ features(x)`` (see ``class_activation_map``), so the
explanation module needs no gradients.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

__all__ = ["Cnn1d", "count_parameters"]


def _block(c_in: int, c_out: int, kernel: int, stride: int = 1, pool: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool > 1:
        layers.append(nn.MaxPool1d(pool))
    return nn.Sequential(*layers)


class Cnn1d(nn.Module):
    """(N, 12, T) -> (N, n_classes) logits; ~150k parameters at the defaults.

    The time axis is reduced 16x before pooling (1000 samples at 100 Hz -> 62
    feature steps of 160 ms each), which is the resolution of its CAMs.
    """

    def __init__(self, n_leads: int = 12, n_classes: int = 5, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(n_leads, w, 7, stride=2),
            _block(w, 2 * w, 5, pool=2),
            _block(2 * w, 2 * w, 5, pool=2),
            _block(2 * w, 4 * w, 5, pool=2),
            _block(4 * w, 4 * w, 3),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.features(x)).flatten(1)
        return cast(torch.Tensor, self.classifier(self.dropout(z)))

    @torch.no_grad()
    def class_activation_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_classes, T') CAMs: the logit is their time mean plus the bias."""
        f = self.features(x)
        return torch.einsum("kc,nct->nkt", self.classifier.weight, f)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
