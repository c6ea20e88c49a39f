"""Images already in memory (a notebook's numpy arrays or torch tensors) as a search's dataset: :class:`ArrayData`.

Accepted, for ``train_images`` and ``test_images``: a numpy array or a torch tensor (on any device;
copied to the host) of shape (N, H, W, C) or (N, C, H, W) with C = 1 or 3 (the last axis is taken as
channels when it is 1 or 3), or (N, H, W) for gray images; square (H == W), at least 8 px; dtype uint8
(0..255) or float (16, 32 or 64 bit) in [0, 1], which is scaled by 255 and rounded.  Labels: 1-D
integers, one per image, in 0..K-1, where K is ``len(classes)``, or the largest label + 1 when
``classes`` is not given.  The test split is optional (``hpo.retrain`` needs one).  Anything else is a
DataError in one line naming the argument and the bad value.

The arrays replace ``[data] dataset`` and ``data_dir``; the rest of ``[data]`` applies as for any
dataset: ``val_fraction``, the subsets, ``split_seed``, ``image_size`` (a resize) and ``channels``
(a conversion).  The normalization statistics are computed from the training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hpo.errors import DataError
from hpo.studyfile.names import DatasetInfo
from hpo.studyfile.spec import DataSection
from hpo.training.datasets import CHUNK_BYTES, shaped
from hpo.training.memory import HOST_ONLY, SMALLEST_SIZE, Placement
from hpo.training.splits import Dataset

# The study user attr that marks a study searched on arrays: what hpo.retrain checks the arrays it gets against.
ARRAY_DATA_ATTR = "array_data"
# Dataset.name of arrays (stored in a retrained model's checkpoint as its dataset).
ARRAYS_NAME = "arrays"


@dataclass(frozen=True, eq=False)  # no __eq__: comparing arrays element-wise is not what == on this should mean
class ArrayData:
    """Images and labels in memory, given to ``hpo.search`` / ``hpo.retrain`` instead of the study file's dataset."""

    train_images: Any  # numpy.ndarray or torch.Tensor, see the module's docstring
    train_labels: Any
    test_images: Any = None
    test_labels: Any = None
    classes: Sequence[str] | None = None  # class names by label; default "0", "1", ...


def _tensor(name: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    import numpy as np

    if not isinstance(value, np.ndarray):
        raise DataError(f"ArrayData: {name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if value.dtype.kind not in "uifb":  # unsigned, signed, float, bool: what torch holds
        raise DataError(f"ArrayData: {name} has dtype {value.dtype}; give uint8 or float images and integer labels")
    # torch.from_numpy shares the memory, but refuses negative strides and warns on read-only arrays.
    if not value.flags.c_contiguous or not value.flags.writeable:
        value = np.array(value, order="C")
    return torch.from_numpy(value)


def _nhwc(name: str, images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) view of (N, H, W, C), (N, C, H, W) or (N, H, W) images; DataError for any other shape."""
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.permute(0, 2, 3, 1)
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[-1] not in (1, 3):
        raise DataError(f"ArrayData: {name} must have shape (N, H, W, C) or (N, C, H, W) with C = 1 or 3, got {shape}")
    if shape[0] == 0:
        raise DataError(f"ArrayData: {name} holds no images, got shape {shape}")
    if shape[1] != shape[2]:
        raise DataError(
            f"ArrayData: {name} must be square (H == W), got {shape[1]} x {shape[2]}: crop or resize them first"
        )
    if shape[1] < SMALLEST_SIZE:
        raise DataError(f"ArrayData: {name} must be at least {SMALLEST_SIZE} px, got {shape[1]} x {shape[2]}")
    return images


def _uint8(name: str, images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; float images in [0, 1] scaled by 255 and rounded, a chunk at a time."""
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.dtype.is_floating_point:
        raise DataError(f"ArrayData: {name} must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}")
    low, high = images.min().item(), images.max().item()  # NaN propagates, and fails the test below
    if not 0.0 <= low <= high <= 1.0:
        raise DataError(
            f"ArrayData: {name} are float, so they must be in [0, 1], got values from {low:g} to {high:g} "
            "(give the pixels before any normalization)"
        )
    out = torch.empty(images.shape, dtype=torch.uint8)
    step = max(1, CHUNK_BYTES // (4 * images[0].numel()))
    for start in range(0, len(images), step):
        out[start : start + step] = (images[start : start + step].float() * 255).round()
    return out


def _labels(name: str, value: object, count: int) -> torch.Tensor:
    labels = _tensor(name, value)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"ArrayData: {name} must be 1-D with one label per image ({count}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"ArrayData: {name} must be integers (class indices), got dtype {labels.dtype}")
    labels = labels.to(torch.int64)
    if labels.min().item() < 0:
        raise DataError(f"ArrayData: {name} must be class indices >= 0, got {labels.min().item()}")
    return labels


def _class_names(data: ArrayData, largest: int) -> tuple[str, ...]:
    """The classes: as given (each label must index one), else "0".."largest"."""
    if data.classes is None:
        return tuple(str(i) for i in range(largest + 1))
    classes = tuple(str(c) for c in data.classes)
    if len(set(classes)) != len(classes):
        raise DataError(f"ArrayData: classes repeat a name, got {list(classes)}")
    if largest >= len(classes):
        names = f"{len(classes)} name" + ("s" if len(classes) > 1 else "")
        raise DataError(
            f"ArrayData: a label is {largest}, but classes has {names} (labels must be 0..{len(classes) - 1})"
        )
    return classes


def _images_and_labels(data: ArrayData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), uint8 (N, H, W, C) and int64, checked."""
    train = _uint8("train_images", _nhwc("train_images", _tensor("train_images", data.train_images)))
    train_labels = _labels("train_labels", data.train_labels, len(train))
    if (data.test_images is None) != (data.test_labels is None):
        raise DataError("ArrayData: give test_images and test_labels together, or neither")
    if data.test_images is None:
        no_images = torch.empty((0, *train.shape[1:]), dtype=torch.uint8)
        return train, train_labels, no_images, torch.empty(0, dtype=torch.int64)
    test = _uint8("test_images", _nhwc("test_images", _tensor("test_images", data.test_images)))
    if test.shape[1:] != train.shape[1:]:
        raise DataError(
            f"ArrayData: test_images must have the training images' shape {tuple(train.shape[1:])} (H, W, C), "
            f"got {tuple(test.shape[1:])}"
        )
    return train, train_labels, test, _labels("test_labels", data.test_labels, len(test))


def array_dataset(
    data: ArrayData, section: DataSection, *, placement: Placement = HOST_ONLY, default_image_size: int | None = None
) -> Dataset:
    """The arrays as a Dataset at the study's ``[data] image_size`` (else ``default_image_size``, else their own)
    and ``channels``, with computed statistics; DataError in one line for input that does not fit the rules above."""
    train, train_labels, test, test_labels = _images_and_labels(data)
    largest = int(max(train_labels.max().item(), test_labels.max().item() if len(test_labels) else 0))
    classes = _class_names(data, largest)
    if len(train_labels.unique()) < 2:
        only = train_labels[0].item()
        raise DataError(f"ArrayData: train_labels hold 1 class ({only}); a classifier needs at least 2")
    raw = Dataset(
        name=ARRAYS_NAME, source="arrays in memory", classes=classes,
        train_images=train, train_labels=train_labels, test_images=test, test_labels=test_labels, mean=(), std=(),
    )
    size = section.image_size or default_image_size or train.shape[1]
    info = DatasetInfo(torchvision_class=None, channels=None, image_size=size)
    return shaped(raw, section, info, placement=placement, label="ArrayData")


def array_summary(dataset: Dataset) -> dict[str, object]:
    """What a study records of the arrays it searched on, so that retraining can check it gets the same ones."""
    return {
        "train_images": len(dataset.train_labels), "test_images": len(dataset.test_labels),
        "image_shape": list(dataset.image_shape), "classes": list(dataset.classes),
    }
