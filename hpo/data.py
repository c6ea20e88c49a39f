"""Datasets as uint8 tensors, decoded once and cached; the validation split; batches on the device.

A dataset is read from one of these sources, first match wins:

1. ``data_dir`` is a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive or a folder holding ``train/<class>/*``
   and ``test/<class>/*`` images (torchvision's ImageFolder layout);
2. for ``cifar10``: ``data_dir`` holds torchvision's ``cifar-10-batches-py``;
3. for ``cifar10``: the archive named by the environment variable ``HPO_DATA_ARCHIVE``;
4. for ``cifar10``: a torchvision download into ``data_dir`` (skipped when ``HPO_OFFLINE=1``).

Decoded image folders are cached as uint8 tensors under ``$HPO_CACHE_DIR`` (default
``~/.cache/hpo``), keyed by the source's path, size and modification time, so later trials and
later runs never decode again.  Everything after loading works on tensors: the split is a seeded
permutation, and batches are cut, cropped, flipped and normalized on the training device.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from hpo.errors import DataError
from hpo.spec import DataSection

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Bump when the cache layout changes, so that stale caches are ignored rather than misread.
_CACHE_VERSION = 1
# Zero padding in pixels of the random crop, as in torchvision's RandomCrop(32, padding=4).
CROP_PADDING = 4


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory: images uint8 (N, H, W, C), labels int64 (N,)."""

    name: str
    source: str
    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    # Per-channel statistics of the training images in [0, 1] units, for normalization.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width), as a model sees one image."""
        _, height, width, channels = self.train_images.shape
        return (channels, height, width)


@dataclass(frozen=True)
class Split:
    """Images uint8 (N, H, W, C) and labels int64 (N,), on whichever device they were put."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Split:
        return Split(images=self.images.to(device), labels=self.labels.to(device))


@dataclass(frozen=True)
class SearchData:
    """What a search trains and selects on: the training part and the validation part."""

    train: Split
    val: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    image_shape: tuple[int, int, int]

    def to(self, device: torch.device) -> SearchData:
        """Move both parts to ``device`` once; every trial of the process then reuses them."""
        return SearchData(
            train=self.train.to(device),
            val=self.val.to(device),
            mean=self.mean,
            std=self.std,
            num_classes=self.num_classes,
            image_shape=self.image_shape,
        )


def cache_dir() -> Path:
    if os.environ.get("HPO_CACHE_DIR"):
        return Path(os.environ["HPO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpo"


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES)


def _is_image_folder(path: Path) -> bool:
    return (path / "train").is_dir()


def load_dataset(section: DataSection) -> Dataset:
    """Load the study's dataset, or raise DataError saying where it looked and how to provide it."""
    data_dir = Path(section.data_dir).expanduser()
    if _is_archive(data_dir) or _is_image_folder(data_dir):
        return _load_image_folder(section.dataset, data_dir, section.image_size)
    if section.dataset == "image_folder":
        raise DataError(
            f"data_dir: {data_dir} is neither a folder with train/<class>/ images nor a .tar.gz of one"
        )
    looked = [f"{data_dir} (no train/ folder, no cifar-10-batches-py)"]
    if (data_dir / "cifar-10-batches-py").is_dir():
        return _load_torchvision_cifar10(data_dir, download=False)
    archive = os.environ.get("HPO_DATA_ARCHIVE")
    if archive:
        if not _is_archive(Path(archive)):
            raise DataError(f"HPO_DATA_ARCHIVE: no .tar.gz archive at {archive}")
        return _load_image_folder(section.dataset, Path(archive), section.image_size)
    looked.append("$HPO_DATA_ARCHIVE (unset)")
    if os.environ.get("HPO_OFFLINE") == "1":
        looked.append("download skipped (HPO_OFFLINE=1)")
    else:
        try:
            return _load_torchvision_cifar10(data_dir, download=True)
        except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
            looked.append(f"download failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    raise DataError(
        "dataset cifar10 not found: looked in "
        + "; ".join(looked)
        + ". Give --data-dir PATH (a folder or cifar10-jpg.tar.gz) or set HPO_DATA_ARCHIVE"
    )


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in float64 so 50,000 images sum exactly enough."""
    flat = images.reshape(-1, images.shape[-1]).to(torch.float64) / 255.0
    return tuple(flat.mean(0).tolist()), tuple(flat.std(0).tolist())


def _load_torchvision_cifar10(root: Path, *, download: bool) -> Dataset:
    import torchvision

    logger.info("reading CIFAR-10 through torchvision in %s", root)
    train = torchvision.datasets.CIFAR10(str(root), train=True, download=download)
    test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    train_images = torch.from_numpy(train.data)
    mean, std = _stats(train_images)
    return Dataset(
        name="cifar10",
        source=str(root),
        classes=tuple(train.classes),
        train_images=train_images,
        train_labels=torch.tensor(train.targets, dtype=torch.int64),
        test_images=torch.from_numpy(test.data),
        test_labels=torch.tensor(test.targets, dtype=torch.int64),
        mean=mean,
        std=std,
    )


def _cache_path(name: str, source: Path, image_size: int) -> Path:
    stat = source.stat()
    key = f"{_CACHE_VERSION}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{image_size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{image_size}px-{digest}.pt"


def _load_image_folder(name: str, source: Path, image_size: int) -> Dataset:
    cached = _cache_path(name, source, image_size)
    if cached.is_file():
        logger.info("reading cached %s arrays from %s", name, cached)
        blob = torch.load(cached, weights_only=True)
    else:
        logger.info("decoding %s from %s (once; cached in %s)", name, source, cached.parent)
        blob = _decode_image_folder(source, image_size)
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent worker never reads a half-written cache.
        partial = cached.with_suffix(f".{os.getpid()}.partial")
        torch.save(blob, partial)
        partial.replace(cached)
    return Dataset(
        name=name,
        source=str(source),
        classes=tuple(blob["classes"]),
        train_images=blob["train_images"],
        train_labels=blob["train_labels"],
        test_images=blob["test_images"],
        test_labels=blob["test_labels"],
        mean=tuple(blob["mean"]),
        std=tuple(blob["std"]),
    )


def _iter_image_files(source: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, file bytes) of every image under ``source``, archive or folder, sorted."""
    if source.is_file():
        with tarfile.open(source) as tar:
            for member in tar:
                if member.isfile() and PurePosixPath(member.name).suffix.lower() in _IMAGE_SUFFIXES:
                    handle = tar.extractfile(member)
                    assert handle is not None
                    yield PurePosixPath(member.name.removeprefix("./")), handle.read()
        return
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
            yield PurePosixPath(path.relative_to(source).as_posix()), path.read_bytes()


def _decode_image_folder(source: Path, image_size: int) -> dict[str, object]:
    from PIL import Image

    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    class_names: dict[str, list[str]] = {"train": [], "test": []}
    for relative, payload in _iter_image_files(source):
        parts = relative.parts
        if len(parts) != 3 or parts[0] not in images:
            continue  # not split/class/file: README files and the like
        with Image.open(io.BytesIO(payload)) as image:
            rgb = image.convert("RGB")
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            images[parts[0]].append(np.asarray(rgb, dtype=np.uint8))
        class_names[parts[0]].append(parts[1])
    classes = sorted(set(class_names["train"]))
    if not classes:
        raise DataError(f"data_dir: no images under {source} in train/<class>/")
    unknown = sorted(set(class_names["test"]) - set(classes))
    if unknown:
        raise DataError(f"data_dir: {source} has test classes with no training images: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}

    def stack(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (0, image_size, image_size, 3)
        arrays = torch.from_numpy(np.stack(images[split])) if images[split] else torch.empty(shape, dtype=torch.uint8)
        labels = torch.tensor([index[c] for c in class_names[split]], dtype=torch.int64)
        return arrays, labels

    train_images, train_labels = stack("train")
    test_images, test_labels = stack("test")
    mean, std = _stats(train_images)
    return {
        "classes": classes,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "mean": list(mean),
        "std": list(std),
    }


def carve_validation(dataset: Dataset, section: DataSection) -> SearchData:
    """Hold out a seeded random ``val_fraction`` of the training set; optionally subsample both parts.

    The split depends only on ``split_seed``, never on a trial's seed, so every trial of a study
    is selected on the same images.  The test set is not touched.
    """
    n = len(dataset.train_labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(section.split_seed))
    n_val = max(1, round(n * section.val_fraction))
    val_index, train_index = order[:n_val], order[n_val:]
    # The permutation is random, so a prefix of each part is a random subset of it.
    if section.train_subset is not None:
        train_index = train_index[: section.train_subset]
    if section.val_subset is not None:
        val_index = val_index[: section.val_subset]
    if len(train_index) == 0:
        raise DataError(f"data: no training images left after holding out val_fraction={section.val_fraction}")
    return SearchData(
        train=Split(images=dataset.train_images[train_index], labels=dataset.train_labels[train_index]),
        val=Split(images=dataset.train_images[val_index], labels=dataset.train_labels[val_index]),
        mean=dataset.mean,
        std=dataset.std,
        num_classes=len(dataset.classes),
        image_shape=dataset.image_shape,
    )


def retraining_data(dataset: Dataset, section: DataSection) -> SearchData:
    """For the final model: the search's training and validation parts as ``train``, the test set as ``val``.

    The training images are exactly those the search saw (``carve_validation``, subsets included,
    so a quick study retrains quickly); the test set is always whole, since it is evaluated once.
    """
    search = carve_validation(dataset, section)
    return SearchData(
        train=Split(
            images=torch.cat([search.train.images, search.val.images]),
            labels=torch.cat([search.train.labels, search.val.labels]),
        ),
        val=Split(images=dataset.test_images, labels=dataset.test_labels),
        mean=dataset.mean,
        std=dataset.std,
        num_classes=search.num_classes,
        image_shape=search.image_shape,
    )


class Normalizer:
    """uint8 NHWC batches → float NCHW (channels_last memory) with zero mean and unit variance."""

    def __init__(self, *, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        # Folded into one multiply-add per pixel: x * scale + shift, with the 1/255 inside scale.
        std_t = torch.tensor(std, device=device, dtype=torch.float32)
        mean_t = torch.tensor(mean, device=device, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC permuted to NCHW *is* channels_last; the float conversion keeps that layout.
        return images.permute(0, 3, 1, 2).float() * self.scale + self.shift


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero padding ``CROP_PADDING``) and horizontal flip, as one gather.

    ``images`` is a uint8 (B, H, W, C) batch on any device; no host sync happens here.
    """
    batch, height, width, _ = images.shape
    device = images.device
    pad = CROP_PADDING
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # pads W and H of NHWC with zeros
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand((batch, 1), device=device, generator=generator) < 0.5
    rows = dy + torch.arange(height, device=device)
    cols_forward = torch.arange(width, device=device)
    cols = dx + torch.where(flip, width - 1 - cols_forward, cols_forward)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def train_batches(
    split: Split, *, batch_size: int, generator: torch.Generator, augment_images: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled uint8 batches; the last partial batch is dropped (BatchNorm needs > 1)."""
    n = len(split)
    order = torch.randperm(n, device=split.labels.device, generator=generator)
    steps = max(1, n // batch_size)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        images = split.images[index]
        if augment_images:
            images = augment(images, generator)
        yield images, split.labels[index]


def eval_batches(split: Split, *, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]
