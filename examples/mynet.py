"""An example of your own model for hpo: a small residual CNN with two hyperparameters of its own.

hpo calls ``build(in_channels=, num_classes=, image_size=, **params)`` once per trial, where
``params`` are the ``[model.space]`` hyperparameters of the study file (here ``width`` and
``blocks``), sampled per trial and stored in ``trial.params``.  The model gets normalized float
images (N, in_channels, image_size, image_size) and returns logits (N, num_classes).

    python -m hpo.run --study examples/mynet.toml --n-trials 8     # from the repository root
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """conv → BatchNorm → ReLU → conv → BatchNorm, plus the input; then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def build(in_channels: int, num_classes: int, image_size: int, *, width: int = 32, blocks: int = 2) -> nn.Module:
    """A stem to ``width`` channels, ``blocks`` residual blocks with a 2x2 max-pool after each, global pooling, linear.

    ``image_size`` is not needed here (global pooling takes any size); a model with a flattening head would use it.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    for _ in range(blocks):
        layers += [_Block(width), nn.MaxPool2d(2, ceil_mode=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)
