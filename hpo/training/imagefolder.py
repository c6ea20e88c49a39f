"""Image folders and archives (torchvision's ImageFolder layout) decoded once into uint8 tensors, and cached.

A source is a folder holding ``train/<class>/*`` and ``test/<class>/*`` images, or a ``.tar.gz`` /
``.tgz`` / ``.tar`` archive of one.  Unreadable images are skipped with a warning while they are at
most ``MAX_BAD_IMAGE_FRACTION`` of the images; more are a DataError naming the first and the count.
A damaged archive, a folder without images, fewer than two classes or test classes unknown to
training are a DataError.

Each image is resized so that its shorter side is ``image_size`` and centre-cropped to a square
(torchvision's Resize(size) + CenterCrop(size), the way pretrained weights were evaluated: the
objects keep their proportions; a photo of 150 x 100 px loses a sixth of its width at either
side).  Before decoding, the image files are counted (a folder's listing; an archive's member
list, which means reading the gzip stream through, about 1.4 s for CIFAR-10's 60,000 JPEGs against
8-12 s of decoding) and ``before_decoding`` sees the count: the memory check.  Each image is then
decoded straight into one preallocated array per split.

Decoded images are cached under ``$HPO_CACHE_DIR`` (default ``~/.cache/hpo``), keyed by the
source's path, size and modification time (for a folder: of every file in it), so later trials and
later runs never decode again.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch

from hpo.errors import DataError, first_line
from hpo.training.splits import Dataset

logger = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# Bump when the cache layout or the decoding changes, so that stale caches are ignored rather than misread.
# 3: non-square images are centre-cropped, no longer stretched.
_CACHE_VERSION = 3


# Share of an image folder's images (train and test together) that may be unreadable and are then
# skipped with a warning; more than this means a broken copy, and the dataset is refused.
MAX_BAD_IMAGE_FRACTION = 0.01


# What reading a damaged archive raises: tarfile's own errors, gzip's end of stream and bad data.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def cache_dir() -> Path:
    if os.environ.get("HPO_CACHE_DIR"):
        return Path(os.environ["HPO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpo"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES)


def is_image_folder(path: Path) -> bool:
    return (path / "train").is_dir()


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
        logger.warning("ignoring unreadable cache %s (%s); decoding again", path, first_line(exc))
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
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        logger.warning("cannot write the decode cache %s (%s); later runs decode again", path, reason)
        if partial.is_file():
            partial.unlink()


@dataclass(frozen=True)
class Decoded:
    """An image folder decoded: what the cache holds (as plain types, which ``weights_only`` loads)."""

    classes: tuple[str, ...]
    train_images: torch.Tensor  # uint8 (N, size, size, 3)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    skipped: tuple[str, ...]  # "relative/path: reason" of each unreadable image
    found: int  # image files, readable or not, train and test together

    def to_blob(self) -> dict[str, object]:
        # Not dataclasses.asdict, which would deep-copy the image tensors.
        blob: dict[str, object] = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        blob["classes"], blob["skipped"] = list(self.classes), list(self.skipped)
        return blob

    @classmethod
    def from_blob(cls, blob: dict[str, object]) -> Decoded:
        values = {field.name: blob.get(field.name) for field in dataclasses.fields(cls)}
        values["classes"] = tuple(blob["classes"])  # type: ignore[arg-type]
        values["skipped"] = tuple(blob.get("skipped", ()))  # type: ignore[arg-type]  # older caches have none
        values["found"] = blob.get("found", 0)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ImageCount:
    """Image files in a folder or archive, readable or not, counted without decoding any."""

    train: int  # under train/<class>/
    test: int  # under test/<class>/


def load_image_folder(
    name: str, source: Path, image_size: int, *, label: str, before_decoding: Callable[[ImageCount], None] | None = None
) -> Dataset:
    """The folder or archive at ``image_size``, from the cache or decoded (and cached).

    ``before_decoding`` sees the image count first and may raise (the memory check); a cached
    dataset is not counted again.
    """
    cached = _cache_path(name, source, image_size)
    blob = _read_cache(cached)
    if blob is not None:
        decoded = Decoded.from_blob(blob)
    else:
        count = count_images(source, label=label)
        if before_decoding is not None:
            before_decoding(count)
        logger.info("decoding %s from %s (once; cached in %s)", name, source, cached.parent)
        decoded = _decode_image_folder(source, image_size, count, label=label)
        _write_cache(decoded.to_blob(), cached)
    if decoded.skipped:  # said again on every load: a cached dataset is still missing these images
        logger.warning(
            "%s: skipped %d unreadable of %s images in %s (up to %g%% are skipped), first %s",
            label, len(decoded.skipped), decoded.found, source, 100 * MAX_BAD_IMAGE_FRACTION, decoded.skipped[0],
        )
    return Dataset(
        name=name,
        source=str(source),
        classes=decoded.classes,
        train_images=decoded.train_images,
        train_labels=decoded.train_labels,
        test_images=decoded.test_images,
        test_labels=decoded.test_labels,
        mean=(),  # set by hpo.training.datasets once the images have their final size and channels
        std=(),
    )


def _split_of(relative: PurePosixPath) -> str | None:
    """The split (train or test) of a split/class/file path; None for other files (a README and the like)."""
    parts = relative.parts
    return parts[0] if len(parts) == 3 and parts[0] in ("train", "test") else None


def count_images(source: Path, *, label: str) -> ImageCount:
    """The image files of each split, from the listing of a folder or of an archive (a damaged one is a DataError)."""
    counts = {"train": 0, "test": 0}
    for relative, _ in _iter_image_files(source, label=label, read=False):
        split = _split_of(relative)
        if split is not None:
            counts[split] += 1
    return ImageCount(train=counts["train"], test=counts["test"])


def _iter_image_files(
    source: Path, *, label: str, read: bool = True
) -> Iterator[tuple[PurePosixPath, bytes | OSError | None]]:
    """(relative path, file bytes) of every image under ``source``, archive or folder, sorted; without
    ``read``, the paths alone (bytes None).

    A folder's file that cannot be read comes with its OSError instead of bytes; a damaged archive
    cannot be read past the damage, so it is a DataError.
    """
    if source.is_file():
        with source.open("rb") as raw:
            yield from _iter_archive(raw, source, label=label, read=read)
        return
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
            content: bytes | OSError | None = None
            if read:
                try:
                    content = path.read_bytes()
                except OSError as exc:
                    content = exc
            yield PurePosixPath(path.relative_to(source).as_posix()), content


def _iter_archive(
    raw: BinaryIO, source: Path, *, label: str, read: bool
) -> Iterator[tuple[PurePosixPath, bytes | None]]:
    """The images of a .tar or .tar.gz read from ``raw``, or DataError if the archive is damaged anywhere."""
    gzipped = raw.read(2) == b"\x1f\x8b"  # gzip's magic number
    raw.seek(0)
    stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except _ARCHIVE_ERRORS as exc:
        reason = "not a .tar or .tar.gz archive" if isinstance(exc, tarfile.ReadError) else first_line(exc)
        raise DataError(f"{label}: cannot read archive {source}: {reason}") from exc
    images = 0  # images read before the damage, for the message
    damage = "truncated or corrupt: copy or create it again"
    try:
        with tar:
            for member in tar:
                if member.isfile() and PurePosixPath(member.name).suffix.lower() in _IMAGE_SUFFIXES:
                    payload = None
                    if read:
                        handle = tar.extractfile(member)
                        assert handle is not None
                        payload = handle.read()
                    images += 1
                    yield PurePosixPath(member.name.removeprefix("./")), payload
        # tarfile stops quietly at the first header it cannot parse, as at the end-of-archive zero
        # blocks; so what follows must be that padding (>= 512 zero bytes), and reading it to the
        # end makes gzip check the CRC of everything.
        rest = 0
        while chunk := stream.read(1 << 20):  # bytes per read
            if chunk.count(0) != len(chunk):
                raise DataError(f"{label}: cannot read archive {source} after {images} images: unreadable tar header ({damage})")
            rest += len(chunk)
        if rest < tarfile.BLOCKSIZE:
            raise DataError(f"{label}: archive {source} ends after {images} images without tar's end marker ({damage})")
    except _ARCHIVE_ERRORS as exc:
        raise DataError(f"{label}: cannot read archive {source} after {images} images: {first_line(exc)} ({damage})") from exc


def _decode_image(payload: bytes | OSError | None, image_size: int) -> np.ndarray:
    """One file's bytes → uint8 RGB (image_size, image_size, 3): the shorter side resized to image_size
    (bilinear, antialiased), the longer one centre-cropped; raises what PIL raises on a bad file."""
    from PIL import Image

    if isinstance(payload, OSError):
        raise payload
    assert payload is not None
    with Image.open(io.BytesIO(payload)) as image:
        width, height = image.size
        scale = image_size / min(width, height)
        # A JPEG much larger than image_size is decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling), as
        # long as its shorter side stays >= image_size: a 12-megapixel photo decodes several times faster.
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        rgb = image.convert("RGB")  # decodes the whole file: truncated data fails here
        width, height = rgb.size
        if (width, height) != (image_size, image_size):
            side = min(width, height)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(rgb, dtype=np.uint8)


@dataclass
class _Decoding:
    """The images decoded so far, into one preallocated array per split, and what could not be read."""

    images: dict[str, np.ndarray]  # uint8 (counted files, size, size, 3) per split; filled from the front
    class_names: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {"train": [], "test": []})
    found: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "test": 0})  # image files per split
    bad: list[str] = dataclasses.field(default_factory=list)  # "relative/path: reason" of each unreadable image

    def add(self, split: str, class_name: str, image: np.ndarray) -> None:
        self.images[split][len(self.class_names[split])] = image
        self.class_names[split].append(class_name)


def _decode_image_folder(source: Path, image_size: int, count: ImageCount, *, label: str) -> Decoded:
    from PIL import Image, UnidentifiedImageError

    # What PIL raises on a file that is not an image it can decode (its plugins use all of these).
    unreadable = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
    # np.empty touches no page: memory is taken as images arrive, and never twice (no list, no stacking copy).
    counted = {"train": count.train, "test": count.test}
    seen = _Decoding(images={split: np.empty((n, image_size, image_size, 3), dtype=np.uint8) for split, n in counted.items()})
    for relative, payload in _iter_image_files(source, label=label):
        split = _split_of(relative)
        if split is None:
            continue
        seen.found[split] += 1
        if seen.found[split] > len(seen.images[split]):
            raise DataError(f"{label}: {source} changed while it was read (more images than counted); run again")
        try:
            array = _decode_image(payload, image_size)
        except unreadable as exc:
            reason = "not an image file PIL can identify" if isinstance(exc, UnidentifiedImageError) else first_line(exc)
            seen.bad.append(f"{relative}: {reason}")
            continue
        seen.add(split, relative.parts[1], array)
    classes = _check_decoded(seen, source, label=label)
    return _stacked(seen, classes)


def _check_decoded(seen: _Decoding, source: Path, *, label: str) -> list[str]:
    """The training classes, sorted, once the decoded folder is usable; else DataError saying why not."""
    if seen.found["train"] == 0:
        raise DataError(f"{label}: no images under {source} in train/<class>/")
    total = seen.found["train"] + seen.found["test"]
    if len(seen.bad) > MAX_BAD_IMAGE_FRACTION * total:
        raise DataError(
            f"{label}: {len(seen.bad)} of {total} images in {source} are unreadable (up to "
            f"{100 * MAX_BAD_IMAGE_FRACTION:g}% are skipped), first {seen.bad[0]}"
        )
    classes = sorted(set(seen.class_names["train"]))
    if len(classes) < 2:  # e.g. every training image in one folder: each trial would learn nothing
        named = f"only {classes[0]!r}" if classes else "none readable"
        raise DataError(
            f"{label}: {source} has {len(classes)} class in train/<class>/ ({named}); a classifier needs at least 2"
        )
    unknown = sorted(set(seen.class_names["test"]) - set(classes))
    if unknown:
        raise DataError(f"{label}: {source} has test classes with no training images: {', '.join(unknown)}")
    return classes


def _stacked(seen: _Decoding, classes: list[str]) -> Decoded:
    index = {name: i for i, name in enumerate(classes)}

    def stack(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        names = seen.class_names[split]
        # Unreadable images leave the end of the array unused, never written (so never in memory); the tensor of
        # the filled front shares the array, and its storage (what torch.save writes) is the front alone.
        arrays = torch.from_numpy(seen.images[split][: len(names)])
        labels = torch.tensor([index[c] for c in names], dtype=torch.int64)
        return arrays, labels

    train_images, train_labels = stack("train")
    test_images, test_labels = stack("test")
    return Decoded(
        classes=tuple(classes), train_images=train_images, train_labels=train_labels, test_images=test_images,
        test_labels=test_labels, skipped=tuple(seen.bad), found=seen.found["train"] + seen.found["test"],
    )
