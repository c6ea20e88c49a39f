"""Datasets as uint8 tensors, decoded once and cached; the validation split; batches on the device.

``DATASETS`` names the datasets a study file may ask for, each with its torchvision class, channels,
image size and normalization statistics.  A dataset is read from one of these sources, first match wins:

1. ``data_dir`` is a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive or a folder holding ``train/<class>/*``
   and ``test/<class>/*`` images (torchvision's ImageFolder layout);
2. for a torchvision dataset: ``data_dir`` holds torchvision's files of it (e.g. ``cifar-10-batches-py``);
3. for ``cifar10`` only: the archive named by the environment variable ``HPO_DATA_ARCHIVE``;
4. for a torchvision dataset: a download into ``data_dir`` (skipped when ``HPO_OFFLINE=1``).

Images are then resized to ``[data] image_size`` and converted to ``[data] channels`` when those
differ from the source's.

An unreadable archive, a folder without images, fewer than two classes or test classes unknown
to training are a DataError.  Unreadable images are skipped with a warning while they are at most
``MAX_BAD_IMAGE_FRACTION`` of the images; more are a DataError naming the first and the count.

Decoded image folders are cached as uint8 tensors under ``$HPO_CACHE_DIR`` (default
``~/.cache/hpo``), keyed by the source's path, size and modification time (for a folder: of every
file in it), so later trials and later runs never decode again.  Everything after loading works on
tensors: the split is a seeded permutation, and batches are cut, cropped, flipped and normalized on
the training device.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from hpo.errors import DataError
from hpo.space import Hyperparameters
from hpo.spec import DataSection

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Bump when the cache layout changes, so that stale caches are ignored rather than misread.
_CACHE_VERSION = 2
# Share of an image folder's images (train and test together) that may be unreadable and are then
# skipped with a warning; more than this means a broken copy, and the dataset is refused.
MAX_BAD_IMAGE_FRACTION = 0.01
# What reading a damaged archive raises: tarfile's own errors, gzip's end of stream and bad data.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
# What torchvision raises on files it finds but cannot read (missing, truncated, wrong checksum).
_TORCHVISION_ERRORS = (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError)


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


DATASETS: Mapping[str, DatasetInfo] = {
    "cifar10": DatasetInfo("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("CIFAR100", 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": DatasetInfo("MNIST", 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetInfo("FashionMNIST", 1, 28, (0.2860,), (0.3530,)),
    "image_folder": DatasetInfo(None, None, 32),
}


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
    info = DATASETS[section.dataset]
    image_size = section.image_size or info.image_size
    data_dir = Path(section.data_dir).expanduser()
    if _is_archive(data_dir) or _is_image_folder(data_dir):
        return _shaped(_load_image_folder(section.dataset, data_dir, image_size, label="data_dir"), section, info)
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
            reason = _first_line(exc)
            detail = "" if reason.startswith("Dataset not found") else f": {reason}"
            looked = [f"{data_dir} (torchvision's {info.torchvision_class} files in {files} are incomplete or corrupt{detail}; delete them)"]
        else:
            looked = [f"{data_dir} (no train/ folder, no torchvision {info.torchvision_class} files)"]
    if section.dataset == "cifar10":
        archive = os.environ.get("HPO_DATA_ARCHIVE")
        if archive:
            if not _is_archive(Path(archive)):
                raise DataError(f"HPO_DATA_ARCHIVE: no .tar.gz archive at {archive}")
            loaded = _load_image_folder(section.dataset, Path(archive), image_size, label="HPO_DATA_ARCHIVE")
            return _shaped(loaded, section, info)
        looked.append("$HPO_DATA_ARCHIVE (unset)")
    if os.environ.get("HPO_OFFLINE") == "1":
        looked.append("download skipped (HPO_OFFLINE=1)")
    else:
        try:
            return _shaped(_load_torchvision(section.dataset, info, data_dir, download=True), section, info)
        except (*_TORCHVISION_ERRORS, tarfile.TarError) as exc:  # urllib errors are OSErrors
            looked.append(f"download failed ({_first_line(exc)})")
    hint = " or set HPO_DATA_ARCHIVE" if section.dataset == "cifar10" else ""
    raise DataError(
        f"dataset {section.dataset} not found: looked in "
        + "; ".join(looked)
        + f". Give --data-dir PATH (a folder of train/<class>/ images, a .tar.gz of one, or torchvision's files){hint}"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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


def _cache_path(name: str, source: Path, image_size: int) -> Path:
    stat = source.stat()
    key = f"{_CACHE_VERSION}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{image_size}"
    if source.is_dir():
        # A folder's own mtime misses files replaced inside its subfolders (a repaired image, say).
        for path in sorted(source.rglob("*")):
            if path.is_file():
                file_stat = path.stat()
                key += f"|{path.relative_to(source).as_posix()}|{file_stat.st_size}|{file_stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{image_size}px-{digest}.pt"


def _read_cache(path: Path) -> dict[str, object] | None:
    """The cached arrays, or None when there are none or they cannot be read (then they are decoded again)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:  # torch.load's errors on a damaged file
        logger.warning("ignoring unreadable cache %s (%s); decoding again", path, _first_line(exc))
        return None
    logger.info("reading cached arrays from %s", path)
    return blob


def _write_cache(blob: dict[str, object], path: Path) -> None:
    """Write then rename, so that a concurrent worker never reads a half-written cache; a cache that
    cannot be written is a warning (the next run decodes again), never a failed run."""
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, partial)
        partial.replace(path)
    except (OSError, RuntimeError) as exc:  # torch.save's zip writer reports a failed write as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        logger.warning("cannot write the decode cache %s (%s); later runs decode again", path, reason)
        if partial.is_file():
            partial.unlink()


def _load_image_folder(name: str, source: Path, image_size: int, *, label: str) -> Dataset:
    cached = _cache_path(name, source, image_size)
    blob = _read_cache(cached)
    if blob is None:
        logger.info("decoding %s from %s (once; cached in %s)", name, source, cached.parent)
        blob = _decode_image_folder(source, image_size, label=label)
        _write_cache(blob, cached)
    skipped = blob.get("skipped", [])  # caches written before skipping existed have no such key
    if skipped:  # said again on every load: a cached dataset is still missing these images
        assert isinstance(skipped, list)
        logger.warning(
            "%s: skipped %d unreadable of %s images in %s (up to %g%% are skipped), first %s",
            label, len(skipped), blob["found"], source, 100 * MAX_BAD_IMAGE_FRACTION, skipped[0],
        )
    return Dataset(
        name=name,
        source=str(source),
        classes=tuple(blob["classes"]),
        train_images=blob["train_images"],
        train_labels=blob["train_labels"],
        test_images=blob["test_images"],
        test_labels=blob["test_labels"],
        mean=(),  # set by _shaped
        std=(),
    )


def _iter_image_files(source: Path, *, label: str) -> Iterator[tuple[PurePosixPath, bytes | OSError]]:
    """(relative path, file bytes) of every image under ``source``, archive or folder, sorted.

    A folder's file that cannot be read comes with its OSError instead of bytes; a damaged archive
    cannot be read past the damage, so it is a DataError.
    """
    if source.is_file():
        with source.open("rb") as raw:
            yield from _iter_archive(raw, source, label=label)
        return
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
            try:
                content: bytes | OSError = path.read_bytes()
            except OSError as exc:
                content = exc
            yield PurePosixPath(path.relative_to(source).as_posix()), content


def _iter_archive(raw: BinaryIO, source: Path, *, label: str) -> Iterator[tuple[PurePosixPath, bytes]]:
    """The images of a .tar or .tar.gz read from ``raw``, or DataError if the archive is damaged anywhere."""
    gzipped = raw.read(2) == b"\x1f\x8b"  # gzip's magic number
    raw.seek(0)
    stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except _ARCHIVE_ERRORS as exc:
        reason = "not a .tar or .tar.gz archive" if isinstance(exc, tarfile.ReadError) else _first_line(exc)
        raise DataError(f"{label}: cannot read archive {source}: {reason}") from exc
    read = 0  # images read before the damage, for the message
    damage = "truncated or corrupt: copy or create it again"
    try:
        with tar:
            for member in tar:
                if member.isfile() and PurePosixPath(member.name).suffix.lower() in _IMAGE_SUFFIXES:
                    handle = tar.extractfile(member)
                    assert handle is not None
                    payload = handle.read()
                    read += 1
                    yield PurePosixPath(member.name.removeprefix("./")), payload
        # tarfile stops quietly at the first header it cannot parse, as at the end-of-archive zero
        # blocks; so what follows must be that padding (>= 512 zero bytes), and reading it to the
        # end makes gzip check the CRC of everything.
        rest = 0
        while chunk := stream.read(1 << 20):  # bytes per read
            if chunk.count(0) != len(chunk):
                raise DataError(f"{label}: cannot read archive {source} after {read} images: unreadable tar header ({damage})")
            rest += len(chunk)
        if rest < tarfile.BLOCKSIZE:
            raise DataError(f"{label}: archive {source} ends after {read} images without tar's end marker ({damage})")
    except _ARCHIVE_ERRORS as exc:
        raise DataError(f"{label}: cannot read archive {source} after {read} images: {_first_line(exc)} ({damage})") from exc


def _decode_image(payload: bytes | OSError, image_size: int) -> np.ndarray:
    """One file's bytes → uint8 RGB (image_size, image_size, 3); raises what PIL raises on a bad file."""
    from PIL import Image

    if isinstance(payload, OSError):
        raise payload
    with Image.open(io.BytesIO(payload)) as image:
        rgb = image.convert("RGB")  # decodes the whole file: truncated data fails here
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _decode_image_folder(source: Path, image_size: int, *, label: str) -> dict[str, object]:
    from PIL import Image, UnidentifiedImageError

    # What PIL raises on a file that is not an image it can decode (its plugins use all of these).
    unreadable = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    class_names: dict[str, list[str]] = {"train": [], "test": []}
    bad: list[str] = []  # "relative/path: reason" of each unreadable image
    found = {"train": 0, "test": 0}  # image files per split, readable or not
    for relative, payload in _iter_image_files(source, label=label):
        parts = relative.parts
        if len(parts) != 3 or parts[0] not in images:
            continue  # not split/class/file: README files and the like
        found[parts[0]] += 1
        try:
            array = _decode_image(payload, image_size)
        except unreadable as exc:
            reason = "not an image file PIL can identify" if isinstance(exc, UnidentifiedImageError) else _first_line(exc)
            bad.append(f"{relative}: {reason}")
            continue
        images[parts[0]].append(array)
        class_names[parts[0]].append(parts[1])
    if found["train"] == 0:
        raise DataError(f"{label}: no images under {source} in train/<class>/")
    total = found["train"] + found["test"]
    if len(bad) > MAX_BAD_IMAGE_FRACTION * total:
        raise DataError(
            f"{label}: {len(bad)} of {total} images in {source} are unreadable (up to "
            f"{100 * MAX_BAD_IMAGE_FRACTION:g}% are skipped), first {bad[0]}"
        )
    classes = sorted(set(class_names["train"]))
    if len(classes) < 2:  # e.g. every training image in one folder: each trial would learn nothing
        named = f"only {classes[0]!r}" if classes else "none readable"
        raise DataError(
            f"{label}: {source} has {len(classes)} class in train/<class>/ ({named}); a classifier needs at least 2"
        )
    unknown = sorted(set(class_names["test"]) - set(classes))
    if unknown:
        raise DataError(f"{label}: {source} has test classes with no training images: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}

    def stack(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (0, image_size, image_size, 3)
        arrays = torch.from_numpy(np.stack(images[split])) if images[split] else torch.empty(shape, dtype=torch.uint8)
        labels = torch.tensor([index[c] for c in class_names[split]], dtype=torch.int64)
        return arrays, labels

    train_images, train_labels = stack("train")
    test_images, test_labels = stack("test")
    return {
        "classes": classes,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "skipped": bad,
        "found": total,
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


def augment(images: torch.Tensor, generator: torch.Generator, augmentation: Hyperparameters) -> torch.Tensor:
    """Per-image random crop (zero padding of ``crop_padding`` pixels) and horizontal flip (``flip``), as one gather.

    torchvision's RandomCrop(padding) + RandomHorizontalFlip.  ``images`` is a uint8 (B, H, W, C)
    batch with any number of channels on any device; no host sync happens here.
    """
    if augmentation.crop_padding == 0 and not augmentation.flip:
        return images
    batch, height, width, _ = images.shape
    device = images.device
    pad = augmentation.crop_padding
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # pads W and H of NHWC with zeros
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand((batch, 1), device=device, generator=generator) < (0.5 if augmentation.flip else 0.0)
    rows = dy + torch.arange(height, device=device)
    cols_forward = torch.arange(width, device=device)
    cols = dx + torch.where(flip, width - 1 - cols_forward, cols_forward)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def cut_out(inputs: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per image of a normalized float (B, C, H, W) batch (zero is the mean).

    The square's centre is uniform over the image, and the square is clipped at the edges, as in
    DeVries and Taylor's cutout; one multiply, no host sync.
    """
    batch, _, height, width = inputs.shape
    device = inputs.device
    cy = torch.randint(0, height, (batch, 1, 1), device=device, generator=generator)
    cx = torch.randint(0, width, (batch, 1, 1), device=device, generator=generator)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return inputs * (~inside)[:, None].to(inputs.dtype)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``n`` images: full batches only, but at least one."""
    return max(1, n // batch_size)


def train_batches(
    split: Split, *, batch_size: int, generator: torch.Generator, augmentation: Hyperparameters | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled uint8 batches; the last partial batch is dropped (BatchNorm needs > 1)."""
    n = len(split)
    order = torch.randperm(n, device=split.labels.device, generator=generator)
    for step in range(steps_per_epoch(n, batch_size)):
        index = order[step * batch_size : (step + 1) * batch_size]
        images = split.images[index]
        if augmentation is not None:
            images = augment(images, generator, augmentation)
        yield images, split.labels[index]


def eval_batches(split: Split, *, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]
