"""A 1D ResNet with squeeze-and-excitation blocks for 12-lead ECG multi-label classification.

Layout (defaults: width 32, 100 Hz x 10 s input)::

    stem   Conv1d(12 -> w, k=15, stride 2) + BN + ReLU             T/2
    stage  ResidualSE(w  -> w,  k=7)                                T/2
    stage  ResidualSE(w  -> 2w, k=7, stride 2)                      T/4
    stage  ResidualSE(2w -> 4w, k=7, stride 2)                      T/8
    stage  ResidualSE(4w -> 4w, k=7, stride 2)                      T/16
    head   global average pool -> dropout -> Linear(4w -> classes)

Each residual block is conv-BN-ReLU-dropout-conv-BN, then a squeeze-and-excitation
gate (global average over time -> bottleneck MLP -> sigmoid, one weight per
channel: the block learns which of its channels, and through the stem which
leads, matter for this ECG), then the shortcut (1x1 conv + BN when the shape
changes) and ReLU.

The head is a global average pool followed by one linear layer, so the logit of
class k is ``b_k + mean_t(sum_c W_kc f_ct)``: ``class_activation_map`` returns
``sum_c W_kc f_ct`` (one map per class, in logit units), which for this head is
exactly Grad-CAM and needs no backward pass. ``training.export`` computes the
same maps inside the ONNX graph.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

__all__ = ["SqueezeExcitation1d", "ResidualSE1d", "ResNetSE1d"]


class SqueezeExcitation1d(nn.Module):
    """Channel gate: x * sigmoid(MLP(mean_t x))."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv1d(channels, hidden, 1)
        self.fc2 = nn.Conv1d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=-1, keepdim=True)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class ResidualSE1d(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, kernel: int = 7, stride: int = 1, dropout: float = 0.1, reduction: int = 8
    ) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.se = SqueezeExcitation1d(c_out, reduction)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm1d(c_out),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(self.drop(y)))
        y = self.se(y)
        return torch.relu(y + self.shortcut(x))


class ResNetSE1d(nn.Module):
    """(N, 12, T) -> (N, n_classes) logits; about 0.47 M parameters at width 32.

    The time axis is reduced 16x (1000 samples at 100 Hz -> 63 feature steps,
    160 ms each), which is the resolution of its class activation maps.
    """

    def __init__(
        self,
        n_leads: int = 12,
        n_classes: int = 5,
        width: int = 32,
        kernel: int = 7,
        dropout: float = 0.3,
        block_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(n_leads, w, 15, stride=2, padding=7, bias=False),
            nn.BatchNorm1d(w),
            nn.ReLU(inplace=True),
            ResidualSE1d(w, w, kernel, 1, block_dropout),
            ResidualSE1d(w, 2 * w, kernel, 2, block_dropout),
            ResidualSE1d(2 * w, 4 * w, kernel, 2, block_dropout),
            ResidualSE1d(4 * w, 4 * w, kernel, 2, block_dropout),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(4 * w, n_classes)
        self.n_features = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.features(x)).flatten(1)
        return cast(torch.Tensor, self.classifier(self.dropout(z)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, 4w): what self-supervised pretraining trains."""
        return cast(torch.Tensor, self.pool(self.features(x)).flatten(1))

    @torch.no_grad()
    def class_activation_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_classes, T') CAMs: the logit is their time mean plus the bias."""
        f = self.features(x)
        return torch.einsum("kc,nct->nkt", self.classifier.weight, f)
