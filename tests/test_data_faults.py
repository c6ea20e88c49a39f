"""Damaged datasets: one DataError naming the file, or a few unreadable images skipped with a warning.

Every case is built from real files: generated JPEGs (conftest.synthetic_jpegs) and damaged copies of a generated
archive of them (conftest.image_archive), so that the cases run on a fresh clone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import image_folder
from hpo.errors import DataError
from hpo.studyfile.spec import DataSection
from hpo.training.datasets import load_dataset
from hpo.training.imagefolder import MAX_BAD_IMAGE_FRACTION
from hpo.training.splits import Dataset


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A decode cache of this test's own, so that what it holds can be checked."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("HPO_CACHE_DIR", str(folder))
    return folder


def _load(source: Path) -> Dataset:
    return load_dataset(DataSection(dataset="image_folder", data_dir=str(source)))


def _cached(cache: Path) -> list[Path]:
    return sorted(cache.glob("*")) if cache.is_dir() else []


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "hpo.training.imagefolder"]


def test_a_corrupt_jpeg_among_many_is_skipped_with_a_warning_that_counts_it(
    tmp_path: Path, jpegs: list[bytes], cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=100)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    assert 1 <= MAX_BAD_IMAGE_FRACTION * 203, "1 bad image of 203 is within the documented share"
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        dataset = _load(root)
    assert len(dataset.train_labels) == 200 and len(dataset.test_labels) == 2, "every readable image is kept"
    (message,) = _warnings(caplog)
    assert f"skipped 1 unreadable of 203 images in {root}" in message and "train/cat/broken.jpg" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        again = _load(root)
    assert len(_cached(cache)) == 1 and len(again.train_labels) == 200
    assert len(_warnings(caplog)) == 1, "a load from the cache says again that images are missing"


def test_a_repaired_image_inside_a_class_folder_is_decoded_again(
    tmp_path: Path, jpegs: list[bytes], cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=100)
    broken = root / "train" / "cat" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    assert len(_load(root).train_labels) == 200
    broken.write_bytes(jpegs[-1])  # the top folder's own mtime does not change
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        repaired = _load(root)
    assert len(repaired.train_labels) == 201 and not _warnings(caplog)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda jpeg: b"this is not a JPEG", id="garbage"),
        pytest.param(lambda jpeg: jpeg[: len(jpeg) // 3], id="truncated-jpeg"),
        pytest.param(lambda jpeg: b"", id="empty"),
        pytest.param(lambda jpeg: b"\x89PNG\r\n\x1a\n" + jpeg[8:], id="png-header-on-jpeg-data"),
    ],
)
def test_more_bad_images_than_the_share_are_refused_naming_the_first_and_the_count(
    tmp_path: Path, jpegs: list[bytes], cache: Path, content
) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=5)
    (root / "train" / "dog" / "bad.jpg").write_bytes(content(jpegs[-1]))
    with pytest.raises(DataError, match=rf"^data_dir: 1 of 13 images in {root} are unreadable .*first train/dog/bad\.jpg: "):
        _load(root)
    assert not _cached(cache), "nothing is cached from a refused decode"


def test_a_truncated_archive_is_named(tmp_path: Path, image_archive: Path, cache: Path) -> None:
    cut = tmp_path / "cifar10-cut.tar.gz"
    with image_archive.open("rb") as whole:
        cut.write_bytes(whole.read(200_000))  # bytes; the archive is 1.6 MB
    with pytest.raises(DataError, match=rf"^data_dir: cannot read archive {cut} after \d+ images: .*truncated or corrupt"):
        load_dataset(DataSection(data_dir=str(cut)))
    assert not _cached(cache)


def test_an_archive_with_damaged_compressed_data_is_named(tmp_path: Path, image_archive: Path, cache: Path) -> None:
    data = bytearray(image_archive.read_bytes()[:400_000])
    data[150_000:150_400] = bytes(400)  # zeros over compressed data: the gzip stream breaks there
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^data_dir: cannot read archive {damaged} after \d+ images"):
        load_dataset(DataSection(data_dir=str(damaged)))
    assert not _cached(cache)


def test_a_file_that_is_no_archive_is_named(tmp_path: Path, jpegs: list[bytes], cache: Path) -> None:
    fake = tmp_path / "photos.tar.gz"
    fake.write_bytes(jpegs[0])
    with pytest.raises(DataError, match=rf"^data_dir: cannot read archive {fake}: not a .tar or .tar.gz archive$"):
        load_dataset(DataSection(data_dir=str(fake)))


def test_a_single_class_is_refused(tmp_path: Path, jpegs: list[bytes], cache: Path) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=5, classes=("cat",))
    with pytest.raises(DataError, match=r"has 1 class in train/<class>/ \(only 'cat'\); a classifier needs at least 2"):
        _load(root)
    assert not _cached(cache)


def test_test_classes_unknown_to_training_are_named(tmp_path: Path, jpegs: list[bytes], cache: Path) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=5)
    (root / "test" / "zebra").mkdir()
    (root / "test" / "zebra" / "0.jpg").write_bytes(jpegs[-1])
    with pytest.raises(DataError, match=rf"{root} has test classes with no training images: zebra$"):
        _load(root)


@pytest.mark.parametrize("stray", ["train/cat/notes.txt", "train/0001.jpg"])
def test_a_folder_without_class_images_is_named(tmp_path: Path, jpegs: list[bytes], stray: str) -> None:
    path = tmp_path / "set" / stray
    path.parent.mkdir(parents=True)
    path.write_bytes(jpegs[0])  # no image in a train/<class>/ folder
    with pytest.raises(DataError, match=rf"^data_dir: no images under {tmp_path / 'set'} in train/<class>/$"):
        _load(tmp_path / "set")


def test_a_cache_that_cannot_be_written_is_a_warning(
    tmp_path: Path, jpegs: list[bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("HPO_CACHE_DIR", str(not_a_folder / "cache"))
    root = image_folder(tmp_path / "set", jpegs, per_class=5)
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        dataset = _load(root)
    assert len(dataset.train_labels) == 10
    (message,) = _warnings(caplog)
    assert message.startswith(f"cannot write the decode cache {not_a_folder / 'cache'}")


def test_a_damaged_cache_is_decoded_again(
    tmp_path: Path, jpegs: list[bytes], cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder(tmp_path / "set", jpegs, per_class=5)
    first = _load(root)
    (cached,) = _cached(cache)
    cached.write_bytes(cached.read_bytes()[:1000])  # as a disk fault would leave it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        again = _load(root)
    assert again.train_labels.tolist() == first.train_labels.tolist()
    (message,) = _warnings(caplog)
    assert message.startswith(f"ignoring unreadable cache {cached}")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpo.training.imagefolder"):
        _load(root)
    assert not _warnings(caplog), "the cache was written again"
