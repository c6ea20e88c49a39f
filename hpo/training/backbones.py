"""torchvision's classification models as backbones: ``[model] name = "torchvision:<arch>"``, pretrained or not.

``<arch>`` is any name of ``torchvision.models.list_models(module=torchvision.models)`` (resnet18,
mobilenet_v3_small, efficientnet_b0, convnext_tiny, vit_b_16...).  ``[model] weights`` is

- None: random initialization (torchvision's own);
- ``"DEFAULT"`` or a member name of the arch's weights enum (``"IMAGENET1K_V1"``): torchvision's
  pretrained weights, through its weights API and torch.hub's cache,
  ``$TORCH_HOME/hub/checkpoints/<file name of the weights' URL>`` (downloaded there unless
  ``HPO_OFFLINE=1``; offline and not cached: one line naming the weights and that path);
- a path to a ``.pth``/``.pt`` file holding a state dict of the arch (its classifier head, of any
  class count, is ignored).

The classifier head (the last ``nn.Linear``, or SqueezeNet's 1x1 conv, with one output per class of
the weights) is replaced by a fresh layer with one output per class of the dataset.

**The head protocol.**  A model whose head is new carries the head's module name (``"fc"``,
``"classifier.3"``, ``"heads.head"``) in its attribute ``hpo_head`` (:data:`HEAD_ATTRIBUTE`);
:func:`head_parameter_names` reads it.  Training (:mod:`hpo.training.optimization`) freezes every
other parameter during the first ``freeze_epochs`` and gives them ``lr x backbone_lr_scale``.

A pretrained model sees its inputs normalized with its weights' own mean and std
(:func:`pretrained_input`; a local file: those of the arch's DEFAULT weights) and needs RGB images;
with random weights, a model for 1-channel images gets a first conv of 1 input channel.
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union
from urllib.parse import urlparse

import torch
from torch import nn

from hpo.errors import DataError, SpecError, first_line

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

logger = logging.getLogger(__name__)

# The attribute of a model that names its new classifier head's module (the head protocol above).
HEAD_ATTRIBUTE = "hpo_head"
# torchvision's num_classes default: the head's width in a model built without weights.
_TORCHVISION_CLASSES = 1000
# Builders that return auxiliary logits in training mode unless told not to; the training loop wants one tensor.
_NO_AUX = ("googlenet", "inception_v3")

Weights = Union["WeightsEnum", Path, None]


@dataclass(frozen=True)
class PretrainedInput:
    """What pretrained weights expect of their input (``weights.transforms()``)."""

    weights: str  # "ResNet18_Weights.IMAGENET1K_V1", or the local file's path
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    image_size: int  # side in pixels of the centre crop the weights were evaluated at (224)
    resize_size: int  # side images are resized to before that crop (256)


def classification_models() -> list[str]:
    """Every ``<arch>`` that ``torchvision:<arch>`` may name."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str, where: str) -> None:
    """SpecError unless torchvision has a classification model ``arch``; the message lists a few near names."""
    known = classification_models()
    if arch in known:
        return
    near = difflib.get_close_matches(arch, known, n=4, cutoff=0.5) or ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"]
    raise SpecError(
        f"{where} name: torchvision has no classification model {arch!r}; e.g. {', '.join(near)} "
        f"({len(known)} in all: torchvision.models.list_models(module=torchvision.models))"
    )


def resolve_weights(arch: str, weights: str | None, where: str) -> Weights:
    """``[model] weights`` → a member of the arch's weights enum, a local file, or None; SpecError/DataError in one line."""
    from hpo.studyfile.names import is_weights_file

    if weights is None:
        return None
    if is_weights_file(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DataError(f"{where} weights: no such file {path}")
        return path
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights]
    except KeyError:
        raise SpecError(
            f"{where} weights: torchvision:{arch} has no weights {weights!r}; it has {', '.join(enum.__members__)}"
        ) from None


def weights_label(weights: WeightsEnum) -> str:
    """``ResNet18_Weights.IMAGENET1K_V1``: the enum and the member a DEFAULT stands for."""
    return f"{type(weights).__name__}.{weights.name}"


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the file of ``weights``: $TORCH_HOME/hub/checkpoints/<URL's file name>."""
    return Path(torch.hub.get_dir()).absolute() / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def fetch_weights(weights: WeightsEnum, arch: str, where: str) -> Path:
    """The cached file of ``weights``, downloaded through torchvision when missing; DataError naming the path when that fails."""
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    if os.environ.get("HPO_OFFLINE") == "1":
        reason = "download skipped: HPO_OFFLINE=1"
    else:
        try:
            weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
            return path
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a wrong hash is a RuntimeError
            reason = f"download failed: {first_line(exc)}"
    raise DataError(
        f"{where} weights: {weights_label(weights)} of torchvision:{arch} not found at {path} ({reason}); "
        f"copy {weights.url} there, or set TORCH_HOME to a folder whose hub/checkpoints/ holds it"
    )


def pretrained_input(arch: str, weights: str | None, where: str = "[model]") -> PretrainedInput | None:
    """The normalization and native size that the weights of ``torchvision:<arch>`` expect; None for random weights.

    Cheap: reads torchvision's metadata, not the file.  A local file is taken to expect what the
    arch's DEFAULT weights do.  (Most torchvision weights expect ImageNet's mean and std; a few
    expect others, so they are read from each.)
    """
    check_arch(arch, where)
    return _describe(arch, resolve_weights(arch, weights, where))


def _describe(arch: str, resolved: Weights) -> PretrainedInput | None:
    import torchvision

    if resolved is None:
        return None
    described = torchvision.models.get_model_weights(arch).DEFAULT if isinstance(resolved, Path) else resolved
    transforms = described.transforms()
    return PretrainedInput(
        weights=str(resolved) if isinstance(resolved, Path) else weights_label(resolved),
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        image_size=int(transforms.crop_size[0]),
        resize_size=int(transforms.resize_size[0]),
    )


def prepare_backbone(
    arch: str, weights: str | None, *, image_shape: tuple[int, int, int], num_classes: int, where: str
) -> PretrainedInput | None:
    """Every check of a torchvision model before anything trains or is stored; fetches its weights file once.

    The arch must exist, the weights must be there (or be downloaded now; a local file must load),
    a pretrained model needs 3 channels, and the model must take images of this size: one forward
    pass of one image on the ``meta`` device (shapes only, no memory, no arithmetic).  Each problem
    is one line starting with ``where`` (the study file).
    """
    channels, height, width = image_shape
    check_arch(arch, where)
    resolved = resolve_weights(arch, weights, where)
    pretrained = _describe(arch, resolved)
    if resolved is not None and channels != 3:
        raise SpecError(
            f"{where} weights: pretrained torchvision:{arch} takes RGB images, the data has {channels} channel; "
            "set [data] channels = 3"
        )
    if isinstance(resolved, Path):
        _assemble(arch, resolved, in_channels=channels, num_classes=num_classes, where=where)
    elif resolved is not None:
        fetch_weights(resolved, arch, where)
    model = _on_meta(arch, in_channels=channels, num_classes=num_classes, where=where)
    with torch.device("meta"):
        try:
            logits = model.eval()(torch.empty((1, channels, height, width)))
        except (RuntimeError, ValueError, AssertionError) as exc:  # ViT's size check is an assert
            native = f" (its weights were made at {pretrained.image_size} px)" if pretrained else ""
            raise SpecError(
                f"{where} name: torchvision:{arch} cannot take {height} x {width} px images{native}: {first_line(exc)}; "
                "change [data] image_size"
            ) from None
    if tuple(logits.shape) != (1, num_classes):
        raise SpecError(f"{where} name: torchvision:{arch} gives outputs of shape {tuple(logits.shape)}, not one per class")
    return pretrained


def _on_meta(arch: str, *, in_channels: int, num_classes: int, where: str) -> nn.Module:
    """The architecture on PyTorch's meta device (shapes, no data); built on the CPU first when its constructor
    needs real numbers (RegNet's computes its widths with tensors)."""
    try:
        with torch.device("meta"):
            return _assemble(arch, None, in_channels=in_channels, num_classes=num_classes, where=where)
    except NotImplementedError:
        return _assemble(arch, None, in_channels=in_channels, num_classes=num_classes, where=where).to("meta")


def build_backbone(arch: str, *, weights: str | None, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``torchvision:<arch>`` with ``weights`` loaded and a new head of ``num_classes`` outputs named in ``hpo_head``.

    ``image_size`` is not needed by the architecture (torchvision's classifiers pool globally, or
    check the size themselves); :func:`prepare_backbone` checked that the model takes it.
    """
    where = "[model]"
    check_arch(arch, where)
    resolved = resolve_weights(arch, weights, where)
    if resolved is not None and in_channels != 3:
        raise SpecError(f"{where} weights: pretrained torchvision:{arch} takes RGB images, got {in_channels} channel; set [data] channels = 3")
    return _assemble(arch, resolved, in_channels=in_channels, num_classes=num_classes, where=where)


def _assemble(arch: str, weights: Weights, *, in_channels: int, num_classes: int, where: str) -> nn.Module:
    """Build, load, re-head and (random weights only) re-stem; the head's module name goes in ``hpo_head``."""
    import torchvision

    options: dict[str, object] = {}
    if arch in _NO_AUX:
        # Their builders take aux_logits=False also with weights (the auxiliary heads are dropped after loading).
        options["aux_logits"] = False
        if weights is None:
            options["init_weights"] = True  # torchvision's init, said explicitly (else a FutureWarning)
    if weights is None or isinstance(weights, Path):
        model = torchvision.models.get_model(arch, weights=None, **options)
        head = _find_head(model, arch, _TORCHVISION_CLASSES, where)
        if isinstance(weights, Path):
            _load_file(model, weights, head, arch, where)
    else:
        fetch_weights(weights, arch, where)
        model = torchvision.models.get_model(arch, weights=weights, **options)
        head = _find_head(model, arch, len(weights.meta["categories"]), where)
    _replace_head(model, head, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    setattr(model, HEAD_ATTRIBUTE, head)
    return model


def _find_head(model: nn.Module, arch: str, classes: int, where: str) -> str:
    """The module name of the classifier: the last Linear (or 1x1 conv: SqueezeNet) with ``classes`` outputs."""
    found = None
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) and module.out_features == classes
        pointwise = isinstance(module, nn.Conv2d) and module.out_channels == classes and module.kernel_size == (1, 1)
        if linear or pointwise:
            found = name
    if found is None:
        raise SpecError(f"{where} name: torchvision:{arch} has no classifier layer with {classes} outputs to replace")
    return found


def _replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    """A fresh layer of ``num_classes`` outputs in place of ``head``, with PyTorch's default init (``init`` may change it)."""
    parent_name, _, child = head.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1, bias=old.bias is not None)
    setattr(parent, child, new)


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """The first conv, which takes 3 channels, rebuilt for ``in_channels`` (random weights only)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name), child,
                nn.Conv2d(
                    in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
                    dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode,
                ),
            )
            return


def _load_file(model: nn.Module, path: Path, head: str, arch: str, where: str) -> None:
    """Load a local state dict into ``model``, all of it but the classifier head (which is replaced anyway)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{where} weights: cannot read {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{where} weights: {path} is not a state dict (a dict of tensors, as model.state_dict() gives)")
    body = {key: value for key, value in state.items() if not key.startswith(f"{head}.")}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as exc:  # a shape differs
        raise DataError(f"{where} weights: {path} does not fit torchvision:{arch}: {first_line(exc)}") from None
    missing = [key for key in missing if not key.startswith(f"{head}.")]
    if missing or unexpected:
        example = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise DataError(
            f"{where} weights: {path} is not a state dict of torchvision:{arch} "
            f"({len(missing)} missing and {len(unexpected)} unexpected keys, e.g. {example})"
        )
    logger.info("loaded %d tensors of torchvision:%s from %s (head %s replaced)", len(body), arch, path, head)


def head_parameter_names(model: nn.Module) -> frozenset[str]:
    """The names (as ``model.named_parameters()`` gives them) of the new head's parameters; empty for other models."""
    head = getattr(model, HEAD_ATTRIBUTE, None)
    if head is None:
        return frozenset()
    return frozenset(name for name, _ in model.named_parameters() if name.startswith(f"{head}."))
