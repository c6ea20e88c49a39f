"""A registry of model names → builders of ``nn.Module`` from a trial's hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from hpo.space import Hyperparameters

Builder = Callable[..., nn.Module]


def conv_net(hp: Hyperparameters, *, in_channels: int, num_classes: int) -> nn.Module:
    """``depth`` blocks of conv → BatchNorm → ReLU → 2x2 max-pool, channels doubling per block.

    With depth 3 and base width 16 this is the tutorials' LeNet grown to 16 → 32 → 64 channels.
    Padding ``kernel_size // 2`` keeps the spatial size through every conv; the pools halve it.
    A global average pool makes the head independent of the input size.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for block in range(hp.depth):
        width = hp.base_width * 2**block
        layers += [
            # No conv bias: the BatchNorm right after it has its own.
            nn.Conv2d(channels, width, hp.kernel_size, padding=hp.kernel_size // 2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(hp.dropout), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


MODELS: Mapping[str, Builder] = {"cnn": conv_net}


def build_model(name: str, hp: Hyperparameters, *, in_channels: int, num_classes: int) -> nn.Module:
    return MODELS[name](hp, in_channels=in_channels, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
