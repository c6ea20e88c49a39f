"""Datasets by name, read from the first source that has them, at the study's image size and channels.

``hpo.studyfile.names.DATASETS`` names the datasets a study file may ask for.  A dataset is read
from one of these sources, first match wins:

1. ``data_dir`` is a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive or a folder holding ``train/<class>/*``
   and ``test/<class>/*`` images (torchvision's ImageFolder layout; decoded and cached by
   :mod:`hpo.training.imagefolder`);
2. for a torchvision dataset: ``data_dir`` holds torchvision's files of it (e.g. ``cifar-10-batches-py``);
3. for ``cifar10`` only: the archive named by the environment variable ``HPO_DATA_ARCHIVE``;
4. for a torchvision dataset: a download into ``data_dir`` (skipped when ``HPO_OFFLINE=1``).

Images are then resized to ``[data] image_size`` and converted to ``[data] channels`` when those
differ from the source's, and the normalization statistics are the published ones or computed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F

from hpo.errors import DataError, first_line
from hpo.studyfile.names import DATASETS, DatasetInfo
from hpo.studyfile.spec import DataSection
from hpo.training.imagefolder import is_archive, is_image_folder, load_image_folder
from hpo.training.splits import Dataset

logger = logging.getLogger(__name__)

# What torchvision raises on files it finds but cannot read (missing, truncated, wrong checksum).
_TORCHVISION_ERRORS = (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError)


def load_dataset(section: DataSection) -> Dataset:
    """Load the study's dataset, or raise DataError saying where it looked and how to provide it."""
    info = DATASETS[section.dataset]
    image_size = section.image_size or info.image_size
    data_dir = Path(section.data_dir).expanduser()
    if is_archive(data_dir) or is_image_folder(data_dir):
        return _shaped(load_image_folder(section.dataset, data_dir, image_size, label="data_dir"), section, info)
    if info.torchvision_class is None:
        raise DataError(
            f"data_dir: {data_dir} is neither a folder with train/<class>/ images nor a .tar.gz of one"
        )
    try:
        return _shaped(_load_torchvision(section.dataset, info, data_dir, download=False), section, info)
    except _TORCHVISION_ERRORS as exc:
        # Files found but unreadable are named; a download below may still repair them.
        files = _torchvision_folder(info, data_dir)
        if files.exists():
            reason = first_line(exc)
            detail = "" if reason.startswith("Dataset not found") else f": {reason}"
            looked = [f"{data_dir} (torchvision's {info.torchvision_class} files in {files} are incomplete or corrupt{detail}; delete them)"]
        else:
            looked = [f"{data_dir} (no train/ folder, no torchvision {info.torchvision_class} files)"]
    if section.dataset == "cifar10":
        archive = os.environ.get("HPO_DATA_ARCHIVE")
        if archive:
            if not is_archive(Path(archive)):
                raise DataError(f"HPO_DATA_ARCHIVE: no .tar.gz archive at {archive}")
            loaded = load_image_folder(section.dataset, Path(archive), image_size, label="HPO_DATA_ARCHIVE")
            return _shaped(loaded, section, info)
        looked.append("$HPO_DATA_ARCHIVE (unset)")
    if os.environ.get("HPO_OFFLINE") == "1":
        looked.append("download skipped (HPO_OFFLINE=1)")
    else:
        try:
            return _shaped(_load_torchvision(section.dataset, info, data_dir, download=True), section, info)
        except (*_TORCHVISION_ERRORS, tarfile.TarError) as exc:  # urllib errors are OSErrors
            looked.append(f"download failed ({first_line(exc)})")
    hint = " or set HPO_DATA_ARCHIVE" if section.dataset == "cifar10" else ""
    raise DataError(
        f"dataset {section.dataset} not found: looked in "
        + "; ".join(looked)
        + f". Give --data-dir PATH (a folder of train/<class>/ images, a .tar.gz of one, or torchvision's files){hint}"
    )


def _torchvision_folder(info: DatasetInfo, root: Path) -> Path:
    """Where torchvision keeps a dataset's files under ``root``: CIFAR's ``base_folder``, else MNIST's ``<Class>/raw``."""
    import torchvision

    assert info.torchvision_class is not None
    base = getattr(getattr(torchvision.datasets, info.torchvision_class), "base_folder", None)
    return root / base if isinstance(base, str) else root / info.torchvision_class / "raw"


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, exact, from a 256-bin histogram per channel (no float copy)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = torch.bincount(images[..., channel].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * levels).sum() / n
        variance = (counts * (levels - mean) ** 2).sum() / max(1.0, float(n) - 1)
        means.append(float(mean))
        stds.append(float(variance.sqrt()))
    return tuple(means), tuple(stds)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 (N, size, size, C), bilinear with antialiasing, in chunks."""
    if images.shape[1:3] == (size, size) or len(images) == 0:
        return images
    out = torch.empty((len(images), size, size, images.shape[-1]), dtype=torch.uint8)
    for start in range(0, len(images), 4096):  # images per chunk: bounds the float copy
        chunk = images[start : start + 4096].permute(0, 3, 1, 2).float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, H, W, C) with C in {1, 3} → ``channels``: gray repeated, or RGB to luma as PIL's "L" does."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return images.expand(*images.shape[:-1], 3).contiguous()
    # ITU-R 601-2 weights per mille, rounded to nearest; float32 holds these integer sums exactly.
    weights = torch.tensor([[299.0], [587.0], [114.0]])
    return ((images.float() @ weights + 500) / 1000).floor().to(torch.uint8)


def _is_gray(images: torch.Tensor) -> bool:
    return images.shape[-1] == 1 or bool(
        torch.equal(images[..., 0], images[..., 1]) and torch.equal(images[..., 0], images[..., 2])
    )


def _shaped(raw: Dataset, section: DataSection, info: DatasetInfo) -> Dataset:
    """The dataset at the study's image size and channels, with its normalization statistics."""
    size = section.image_size or info.image_size
    channels = section.channels or info.channels or (1 if _is_gray(raw.train_images) else 3)
    train = _to_channels(_resize(raw.train_images, size), channels)
    test = _to_channels(_resize(raw.test_images, size), channels)
    if info.mean is not None and info.std is not None and channels == info.channels:
        mean, std = info.mean, info.std
    else:
        mean, std = _stats(train)
    return dataclasses.replace(raw, train_images=train, test_images=test, mean=mean, std=std)


def _load_torchvision(name: str, info: DatasetInfo, root: Path, *, download: bool) -> Dataset:
    import torchvision

    assert info.torchvision_class is not None
    cls = getattr(torchvision.datasets, info.torchvision_class)
    logger.info("reading %s through torchvision in %s", name, root)
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=False)

    def images(part: object) -> torch.Tensor:
        array = torch.as_tensor(part.data)  # type: ignore[attr-defined]
        return array if array.ndim == 4 else array.unsqueeze(-1)  # MNIST's (N, H, W) gets its channel

    return Dataset(
        name=name,
        source=str(root),
        classes=tuple(train.classes),
        train_images=images(train),
        train_labels=torch.as_tensor(train.targets, dtype=torch.int64),
        test_images=images(test),
        test_labels=torch.as_tensor(test.targets, dtype=torch.int64),
        mean=(),
        std=(),
    )

