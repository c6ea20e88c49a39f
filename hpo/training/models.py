"""Model builders, registered by name: ``@register_model("cnn")`` (timm-style) → ``build_model("cnn", hp, ...)``.

A built-in builder takes ``(hp, in_channels=, num_classes=, image_size=)``; the names, and whether
[space] shapes a model, are declared torch-free in :mod:`hpo.studyfile.names`.  Any other name is
the user's own model (:mod:`hpo.training.user_models`: import path, entry point, or a name
registered with ``@register_model``, which is ``hpo.register_model``), built from its [model.space].  The configurable CNN reads the architecture hyperparameters (those
declared ``models=CNN`` in ``hpo.studyfile.space``); ResNet18 and ResNet-9 are fixed architectures.
The ``init`` hyperparameter applies to every model (to a pretrained one's new head only).
``torchvision:<arch>`` names are not registered here: :func:`build_model` hands them to
:mod:`hpo.training.backbones`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from hpo.studyfile import names
from hpo.studyfile.space import Hyperparameters
from hpo.training import user_models

Builder = Callable[..., nn.Module]

# Registered builders by name; filled by @register_model below.
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register the decorated builder under ``name``: ``@hpo.register_model("mynet")``.

    A user's name gets the user-model contract ``build(in_channels, num_classes, image_size, **params)``
    and becomes valid in ``[model] name`` in this process; a built-in name (hpo.studyfile.names.MODELS)
    gets hpo's own ``(hp, *, in_channels, num_classes, image_size)``.
    """

    def register(builder: Builder) -> Builder:
        if name not in names.MODELS:
            user_models.register(name, builder)
            return builder
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice ({MODELS[name].__qualname__}, {builder.__qualname__})")
        MODELS[name] = builder
        return builder

    return register

_ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": nn.GELU,
    "elu": lambda: nn.ELU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


@register_model("cnn")
def conv_net(hp: Hyperparameters, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``depth`` blocks of conv → [BatchNorm] → activation → [2x2 pool] → [channel dropout].

    Channels double per block from ``base_width``.  Padding ``kernel_size // 2`` keeps the spatial
    size through a stride-1 conv; a stride-2 conv and each pool halve it (rounding up, so a 1 px map
    stays 1 px).  With ``dense_width`` 0 the head is global average pooling → dropout → linear, which
    is independent of the input size; otherwise it flattens the last feature map → dropout → dense
    → activation → dropout → linear, as the tutorials' LeNet does (depth 3, base width 16, kernel 3,
    dense width 500, dropout 0.5: 16 → 32 → 64 channels, 64 x 4 x 4 → 500 → 10 on 32 px images).
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for block in range(hp.depth):
        width = hp.base_width * 2**block
        # No conv bias with BatchNorm right after it: the BatchNorm has its own.
        layers.append(
            nn.Conv2d(
                channels, width, hp.kernel_size, stride=hp.stride, padding=hp.kernel_size // 2, bias=not hp.batch_norm
            )
        )
        size = (size - 1) // hp.stride + 1
        if hp.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(_ACTIVATIONS[hp.activation]())
        if hp.pool != "none":
            layers.append(nn.MaxPool2d(2, ceil_mode=True) if hp.pool == "max" else nn.AvgPool2d(2, ceil_mode=True))
            size = math.ceil(size / 2)
        if hp.conv_dropout > 0:
            layers.append(nn.Dropout2d(hp.conv_dropout))
        channels = width
    if hp.dense_width == 0:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(hp.dropout), nn.Linear(channels, num_classes)]
    else:
        layers += [
            nn.Flatten(),
            nn.Dropout(hp.dropout),
            nn.Linear(channels * size * size, hp.dense_width),
            _ACTIVATIONS[hp.activation](),
            nn.Dropout(hp.dropout),
            nn.Linear(hp.dense_width, num_classes),
        ]
    return nn.Sequential(*layers)


@register_model("resnet18")
def resnet18(hp: Hyperparameters, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet18; for images of 64 px or less, a 3x3 stride-1 stem and no max-pool.

    The ImageNet stem (7x7 stride 2, then a 3x3 max-pool) would take a 32 px image down to 8 px
    before the first residual block; the small-image stem keeps 32 px there.
    """
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Scale(nn.Module):
    """Multiplies the logits by a constant: Page's 0.125, which keeps early softmax outputs soft."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@register_model("resnet9")
def resnet9(hp: Hyperparameters, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The 9-layer ResNet of David Page's "How to train your ResNet" (DAWNBench CIFAR-10 record).

    prep conv 64 → conv 128 + max-pool + residual(2 convs) → conv 256 + max-pool → conv 512 +
    max-pool + residual(2 convs) → global max-pool → linear (no bias) → x 0.125.  Every conv is
    3x3 → BatchNorm → ReLU.  Its training recipe (SGD with Nesterov momentum, one-cycle schedule,
    label smoothing, batch 512) lives in studies/cifar-resnet9.toml.
    """
    return nn.Sequential(
        _conv_bn(in_channels, 64),
        _conv_bn(64, 128),
        nn.MaxPool2d(2, ceil_mode=True),
        _Residual(128),
        _conv_bn(128, 256),
        nn.MaxPool2d(2, ceil_mode=True),
        _conv_bn(256, 512),
        nn.MaxPool2d(2, ceil_mode=True),
        _Residual(512),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes, bias=False),
        _Scale(0.125),
    )


# nn.init's name for the gain of each activation; GELU and ELU are close enough to ReLU's.
_GAIN_NAMES: Mapping[str, str] = {
    "relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "elu": "relu", "tanh": "tanh", "sigmoid": "sigmoid",
}


def initialize(model: nn.Module, init: str, activation: str) -> None:
    """Re-initialize every conv and linear weight (biases to zero); ``default`` keeps PyTorch's init."""
    if init == "default":
        return
    gain_name = _GAIN_NAMES[activation]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if init == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain_name)
            else:
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(gain_name))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    name: str, hp: Hyperparameters, *, in_channels: int, num_classes: int, image_size: int, weights: str | None = None
) -> nn.Module:
    """The model ``[model] name`` (with ``[model] weights``, for torchvision:<arch> only), initialized as ``hp.init`` says."""
    arch = names.torchvision_arch(name)
    if arch is not None:
        return _torchvision_model(arch, hp, weights=weights, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if names.is_user_model(name):
        model = user_models.build_user_model(
            name, hp.model_params, in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
        initialize(model, hp.init, "relu")
        return model
    model = MODELS[name](hp, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    # The fixed architectures use ReLU whatever hp.activation says.
    initialize(model, hp.init, hp.activation if names.MODELS[name].configurable else "relu")
    return model


def _torchvision_model(
    arch: str, hp: Hyperparameters, *, weights: str | None, in_channels: int, num_classes: int, image_size: int
) -> nn.Module:
    """``torchvision:<arch>`` (hpo.training.backbones); pretrained weights are kept: ``init`` re-initializes the new head only."""
    from hpo.training.backbones import HEAD_ATTRIBUTE, build_backbone

    model = build_backbone(arch, weights=weights, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    initialize(model if weights is None else model.get_submodule(getattr(model, HEAD_ATTRIBUTE)), hp.init, "relu")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
