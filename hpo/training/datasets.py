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
The memory check (:mod:`hpo.training.memory`) runs before an image folder is decoded and again
before any dataset is resized or converted; resizing, conversion and statistics work in chunks of
at most ``CHUNK_BYTES`` of floats, so that no step copies a whole dataset as floats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from hpo.errors import DataError, first_line
from hpo.studyfile.names import DATASETS, DatasetInfo
from hpo.studyfile.spec import DataSection
from hpo.training.imagefolder import ImageCount, is_archive, is_image_folder, load_image_folder
from hpo.training.memory import HOST_ONLY, WORKING_BYTES, Footprint, Placement, check_memory, searched_images
from hpo.training.splits import Dataset

logger = logging.getLogger(__name__)

# What torchvision raises on files it finds but cannot read (missing, truncated, wrong checksum).
_TORCHVISION_ERRORS = (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError)

# Bytes of float working copy per chunk of resizing, conversion and statistics: a quarter of what the memory
# check allows for working copies (input and output chunks, and their uint8 results, live at once).
CHUNK_BYTES = WORKING_BYTES // 4


def load_dataset(
    section: DataSection, *, placement: Placement = HOST_ONLY, default_image_size: int | None = None
) -> Dataset:
    """Load the study's dataset, or raise DataError saying where it looked and how to provide it.

    ``default_image_size``: the side images get when the study file gives no ``[data] image_size`` —
    what the model asks for (a pretrained model's native size); None keeps the dataset's own (CIFAR
    32, MNIST 28, image folders 32).  ``placement``: where the data will be held, for the memory check.
    """
    if section.image_size is None and default_image_size is not None:
        section = dataclasses.replace(section, image_size=default_image_size)
    info = DATASETS[section.dataset]
    data_dir = Path(section.data_dir).expanduser()
    if is_archive(data_dir) or is_image_folder(data_dir):
        return _from_image_folder(section, info, data_dir, label="data_dir", placement=placement)
    if info.torchvision_class is None:
        raise DataError(
            f"data_dir: {data_dir} is neither a folder with train/<class>/ images nor a .tar.gz of one"
        )
    try:
        raw = _load_torchvision(section.dataset, info, data_dir, download=False)
        return shaped(raw, section, info, placement=placement, label="data_dir")
    except _TORCHVISION_ERRORS as exc:
        looked = [_not_read(info, data_dir, exc)]
    if section.dataset == "cifar10":
        archive = os.environ.get("HPO_DATA_ARCHIVE")
        if archive:
            if not is_archive(Path(archive)):
                raise DataError(f"HPO_DATA_ARCHIVE: no .tar.gz archive at {archive}")
            return _from_image_folder(section, info, Path(archive), label="HPO_DATA_ARCHIVE", placement=placement)
        looked.append("$HPO_DATA_ARCHIVE (unset)")
    if os.environ.get("HPO_OFFLINE") == "1":
        looked.append("download skipped (HPO_OFFLINE=1)")
    else:
        try:
            with download_lock(data_dir):
                raw = _load_torchvision(section.dataset, info, data_dir, download=True)
            return shaped(raw, section, info, placement=placement, label="data_dir")
        except (*_TORCHVISION_ERRORS, tarfile.TarError) as exc:  # urllib errors are OSErrors
            looked.append(f"download failed ({first_line(exc)})")
    hint = " or set HPO_DATA_ARCHIVE" if section.dataset == "cifar10" else ""
    raise DataError(
        f"dataset {section.dataset} not found: looked in "
        + "; ".join(looked)
        + f". Give --data-dir PATH (a folder of train/<class>/ images, a .tar.gz of one, or torchvision's files){hint}"
    )


def _not_read(info: DatasetInfo, data_dir: Path, exc: BaseException) -> str:
    """Why torchvision's files were not read from ``data_dir``; files found but unreadable are named (a download may
    still repair them)."""
    files = _torchvision_folder(info, data_dir)
    if not files.exists():
        return f"{data_dir} (no train/ folder, no torchvision {info.torchvision_class} files)"
    reason = first_line(exc)
    detail = "" if reason.startswith("Dataset not found") else f": {reason}"
    return f"{data_dir} (torchvision's {info.torchvision_class} files in {files} are incomplete or corrupt{detail}; delete them)"


def _from_image_folder(section: DataSection, info: DatasetInfo, source: Path, *, label: str, placement: Placement) -> Dataset:
    size = section.image_size or info.image_size
    check = _before_decoding(section, info, source, label=label, placement=placement)
    raw = load_image_folder(section.dataset, source, size, label=label, before_decoding=check)
    return shaped(raw, section, info, placement=placement, label=label)


def _before_decoding(
    section: DataSection, info: DatasetInfo, source: Path, *, label: str, placement: Placement
) -> Callable[[ImageCount], None]:
    """The memory check of an image folder, given its image count before anything is decoded."""
    size = section.image_size or info.image_size
    channels = section.channels or info.channels or 3  # a folder's colour is found after decoding: 3 at most

    def check(count: ImageCount) -> None:
        total = count.train + count.test
        footprint = Footprint(
            new_images=total, new_channels=3, searched=searched_images(count.train, section), channels=channels,
            image_size=size,
        )
        check_memory(footprint, placement, what=f"{label}: {total} images in {source}")

    return check


def _torchvision_folder(info: DatasetInfo, root: Path) -> Path:
    """Where torchvision keeps a dataset's files under ``root``: CIFAR's ``base_folder``, else MNIST's ``<Class>/raw``."""
    import torchvision

    assert info.torchvision_class is not None
    base = getattr(getattr(torchvision.datasets, info.torchvision_class), "base_folder", None)
    return root / base if isinstance(base, str) else root / info.torchvision_class / "raw"


def _chunk(images: torch.Tensor, size: int | None = None) -> int:
    """Images per chunk, so that a chunk's float copy (and its float result at ``size``) stays within CHUNK_BYTES."""
    _, height, width, channels = images.shape
    side = size or 0
    per_image = 4 * channels * (height * width + side * side)  # float32 bytes
    return max(1, CHUNK_BYTES // max(1, per_image))


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, exact, from a 256-bin histogram per channel (no float copy)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    step = _chunk(images)
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = torch.zeros(256, dtype=torch.float64)
        for start in range(0, len(images), step):  # a chunk at a time: one channel of it is copied to count it
            counts += torch.bincount(images[start : start + step, ..., channel].reshape(-1), minlength=256)
        n = counts.sum()
        mean = (counts * levels).sum() / n
        variance = (counts * (levels - mean) ** 2).sum() / max(1.0, float(n) - 1)
        means.append(float(mean))
        stds.append(float(variance.sqrt()))
    return tuple(means), tuple(stds)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) → uint8 (N, size, size, C), bilinear with antialiasing, in chunks.

    The images are square by now (torchvision's datasets are, image folders are decoded square and
    ArrayData must be), so no aspect ratio changes.
    """
    if images.shape[1:3] == (size, size) or len(images) == 0:
        return images
    out = torch.empty((len(images), size, size, images.shape[-1]), dtype=torch.uint8)
    step = _chunk(images, size)
    for start in range(0, len(images), step):  # images per chunk: bounds the float copy
        chunk = images[start : start + step].permute(0, 3, 1, 2).float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + step] = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, H, W, C) with C in {1, 3} → ``channels``: gray repeated, or RGB to luma as PIL's "L" does."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return images.expand(*images.shape[:-1], 3).contiguous()
    # ITU-R 601-2 weights per mille, rounded to nearest; float32 holds these integer sums exactly.
    weights = torch.tensor([[299.0], [587.0], [114.0]])
    out = torch.empty((*images.shape[:-1], 1), dtype=torch.uint8)
    step = _chunk(images)
    for start in range(0, len(images), step):
        out[start : start + step] = ((images[start : start + step].float() @ weights + 500) / 1000).floor().to(torch.uint8)
    return out


def _is_gray(images: torch.Tensor) -> bool:
    if images.shape[-1] == 1:
        return True
    step = _chunk(images)
    return all(
        torch.equal(chunk[..., 0], chunk[..., 1]) and torch.equal(chunk[..., 0], chunk[..., 2])
        for chunk in images.split(step)
    )


def _check_shaping(raw: Dataset, section: DataSection, size: int, channels: int, *, placement: Placement, label: str) -> None:
    """The memory check before a loaded dataset is resized or converted, and its parts copied for the search."""
    reshaped = tuple(raw.train_images.shape[1:]) != (size, size, channels)
    total = len(raw.train_images) + len(raw.test_images)
    footprint = Footprint(
        new_images=total if reshaped else 0, new_channels=channels,
        searched=searched_images(len(raw.train_images), section), channels=channels, image_size=size,
    )
    check_memory(footprint, placement, what=f"{label}: {total} images from {raw.source}")


def shaped(raw: Dataset, section: DataSection, info: DatasetInfo, *, placement: Placement, label: str) -> Dataset:
    """The dataset at the study's image size and channels, with its normalization statistics."""
    size = section.image_size or info.image_size
    channels = section.channels or info.channels or (1 if _is_gray(raw.train_images) else 3)
    _check_shaping(raw, section, size, channels, placement=placement, label=label)
    train = _to_channels(_resize(raw.train_images, size), channels)
    test = _to_channels(_resize(raw.test_images, size), channels)
    if info.mean is not None and info.std is not None and channels == info.channels:
        mean, std = info.mean, info.std
    else:
        mean, std = _stats(train)
    return dataclasses.replace(raw, train_images=train, test_images=test, mean=mean, std=std)


@contextlib.contextmanager
def download_lock(root: Path) -> Iterator[None]:
    """One download into ``root`` at a time, among the processes of every worker that shares the folder.

    Workers started together on an empty data volume would otherwise all download into one folder
    at once, each overwriting the others' half-written files.  The first holds the lock while it
    downloads; the others wait, then find the files complete (torchvision checks them) and download
    nothing.  An flock on a file in the folder: local and NFSv4 filesystems honour it.
    """
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".hpo-download.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's download into %s", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_torchvision(name: str, info: DatasetInfo, root: Path, *, download: bool) -> Dataset:
    import torchvision

    assert info.torchvision_class is not None
    cls = getattr(torchvision.datasets, info.torchvision_class)
    if download:  # said once: the first try, without downloading, finds no files and says nothing
        logger.info("downloading %s through torchvision into %s (what is missing)", name, root)
    train = cls(str(root), train=True, download=download)
    test = cls(str(root), train=False, download=False)
    logger.info("read %s through torchvision from %s", name, root)

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

