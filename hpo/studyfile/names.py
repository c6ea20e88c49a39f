"""The names a study file may give ``[model] name`` and ``[data] dataset``, and what is known of each without torch.

This table is the one list of names: the study file is validated against it (torch-free), and the
builders in :mod:`hpo.training.models` register against it, so that the two cannot drift apart.  To
add a built-in model: a row in ``MODELS``, then a builder registered under that name.  To add a
torchvision dataset: a row in ``DATASETS``.

Besides the names in ``MODELS``, ``[model] name`` may be ``torchvision:<arch>``: any classification
model of ``torchvision.models`` (``torchvision:resnet18``, ``torchvision:convnext_tiny``...), built
by :mod:`hpo.training.backbones`; only the syntax is checked here, whether torchvision has ``<arch>``
when the model is prepared.  A user's own model is named by import path (``package.module:build``),
by a name an installed package registers in the ``hpo.models`` entry-point group, or by a name
registered in this process with ``@hpo.register_model("mynet")``; all are checked here without
importing the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """A model name's torch-free facts."""

    description: str  # one line, for errors and the README
    # True: the architecture is shaped by the [space] hyperparameters declared for this model
    # (depth, widths, kernel, activation...); False: a fixed architecture that reads none of them
    # and always uses ReLU (its ``init`` gain is ReLU's).
    configurable: bool = False


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a dataset before reading it."""

    # Class name in torchvision.datasets; None: only image folders.
    torchvision_class: str | None
    # Channels and side in pixels of its images; None: found from the images.
    channels: int | None
    image_size: int
    # Per-channel mean and std of the training images in [0, 1] units (the published figures);
    # None: computed from the training images.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


MODELS: Mapping[str, ModelInfo] = {
    "cnn": ModelInfo("the configurable CNN (LeNet-like blocks, shaped by [space])", configurable=True),
    "resnet18": ModelInfo("torchvision's ResNet18, with a small-image stem at 64 px and less"),
    "resnet9": ModelInfo("David Page's 9-layer ResNet (DAWNBench CIFAR-10)"),
}

DATASETS: Mapping[str, DatasetInfo] = {
    "cifar10": DatasetInfo("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("CIFAR100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": DatasetInfo("MNIST", 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo("FashionMNIST", 1, 28, (0.2860,), (0.3530,)),
    "image_folder": DatasetInfo(None, None, 32),
}

# The models whose architecture [space] shapes: what a hyperparameter's ``models=`` names.
CONFIGURABLE_MODELS: tuple[str, ...] = tuple(name for name, info in MODELS.items() if info.configurable)

# [model] name = "torchvision:<arch>": a classification model of torchvision.models, pretrained or not.
TORCHVISION_PREFIX = "torchvision:"
# What a hyperparameter's ``models=`` says to shape every torchvision:<arch> model (hpo.studyfile.space.applies_to).
TORCHVISION_MODELS = "torchvision:*"
_ARCH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# [model] weights that name a member of the arch's weights enum ("DEFAULT", "IMAGENET1K_V1") rather than a file.
_WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_WEIGHTS_SUFFIXES = (".pth", ".pt")


def torchvision_arch(name: str) -> str | None:
    """The ``<arch>`` of a ``torchvision:<arch>`` model name, None for any other name; ValueError when malformed."""
    if not name.startswith(TORCHVISION_PREFIX):
        return None
    arch = name[len(TORCHVISION_PREFIX) :]
    if not _ARCH.match(arch):
        raise ValueError(f"name must be torchvision:<arch> with <arch> a torchvision model name such as resnet18, got {name!r}")
    return arch


def is_weights_file(weights: str) -> bool:
    """Whether ``[model] weights`` is a path to a state-dict file (a folder in it, or a .pth/.pt suffix), not a weights name."""
    return "/" in weights or "\\" in weights or weights.endswith(_WEIGHTS_SUFFIXES)


def weights_problem(weights: str) -> str | None:
    """What is wrong with a ``[model] weights`` value, torch-free (None: nothing); whether it exists is checked later."""
    if is_weights_file(weights) or _WEIGHTS_NAME.match(weights):
        return None
    return (
        'weights must be "DEFAULT", a weights name of the model such as "IMAGENET1K_V1", or a path to a .pth or .pt '
        f"state-dict file, got {weights!r}"
    )


# ``[model] name`` beyond the built-in names: a builder by import path, e.g. "mypkg.nets:build".
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# Installed packages register model names in this entry-point group: ``mynet = "mypkg.nets:build"``.
ENTRY_POINT_GROUP = "hpo.models"

# Names registered in this process with @hpo.register_model, → where the builder is (for messages).
_REGISTERED: dict[str, str] = {}


def declare_model(name: str, where: str) -> None:
    """Make ``name`` valid in ``[model] name`` in this process (hpo.training.models.register_model calls this)."""
    if name in MODELS or IMPORT_PATH.match(name) or name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model name {name!r} is taken: built-in names and import paths cannot be registered")
    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ValueError(f"model name must be letters, digits, '_' and '-', starting with a letter, got {name!r}")
    _REGISTERED[name] = where


def entry_point_models() -> dict[str, str]:
    """Model names installed packages register (entry-point group ``hpo.models``) → their import path; nothing imported."""
    from importlib.metadata import entry_points

    return {entry.name: entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)}


def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be a ``[model] name``, or None: checked without importing anything of the model."""
    try:
        if torchvision_arch(name) is not None:
            return None
    except ValueError as exc:
        return str(exc)
    if name in MODELS or IMPORT_PATH.match(name) or name in _REGISTERED or name in entry_point_models():
        return None
    return (
        f"name must be a built-in model ({', '.join(repr(n) for n in MODELS)}), torchvision:<arch> (e.g. "
        "'torchvision:resnet18'), an import path like "
        f"'package.module:build', or a name registered with @hpo.register_model or the {ENTRY_POINT_GROUP!r} "
        f"entry-point group, got {name!r}"
    )


def is_user_model(name: str) -> bool:
    """Whether ``name`` is the user's own model (import path, registered name), built with its own [model.space]."""
    return name not in MODELS and not name.startswith(TORCHVISION_PREFIX)
