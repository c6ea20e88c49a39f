"""Datasets decoded once, split at random, augmented correctly on the device: CIFAR-10 from the shared archive (slow:
all 60,000 images), the rest on the generated image archive (conftest.image_archive), which a fresh clone has too."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hpo.errors import DataError
from hpo.studyfile.names import DATASETS
from hpo.studyfile.space import Hyperparameters
from hpo.studyfile.spec import DataSection
from hpo.training.batches import Normalizer, augment, train_batches
from hpo.training.datasets import load_dataset
from hpo.training.imagefolder import cache_dir
from hpo.training.splits import carve_validation


@pytest.fixture(scope="module")
def cifar(archive: Path):
    return load_dataset(DataSection(data_dir=str(archive)))


@pytest.fixture(scope="module")
def images(image_archive: Path):
    """1,700 training and 100 test images, 10 classes, class-sorted as CIFAR-10's archive is."""
    return load_dataset(DataSection(data_dir=str(image_archive)))


@pytest.mark.slow
def test_archive_gives_all_of_cifar10_as_uint8(cifar) -> None:
    assert cifar.train_images.shape == (50000, 32, 32, 3) and cifar.train_images.dtype == torch.uint8
    assert cifar.test_images.shape == (10000, 32, 32, 3)
    assert cifar.classes[:3] == ("airplane", "automobile", "bird") and len(cifar.classes) == 10
    assert torch.bincount(cifar.train_labels).tolist() == [5000] * 10
    # The published CIFAR-10 statistics (the README beside the archive says JPEG keeps them to 3 decimals).
    assert cifar.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=2e-3)


def test_second_load_reads_the_cache(image_archive: Path, images) -> None:
    assert list(cache_dir().glob("cifar10-32px-*.pt")), "the decoded arrays are cached"
    again = load_dataset(DataSection(data_dir=str(image_archive)))
    assert torch.equal(again.train_images, images.train_images)


def test_validation_split_is_random_seeded_and_disjoint(images) -> None:
    assert torch.equal(images.train_labels, torch.arange(10).repeat_interleave(170)), "class-sorted, as CIFAR-10's"
    section = DataSection(val_fraction=0.1, split_seed=0)
    data = carve_validation(images, section)
    assert len(data.train) == 1530 and len(data.val) == 170
    # Drawn at random from a class-sorted archive: every class is in the validation part.
    assert torch.bincount(data.val.labels, minlength=10).min() >= 8
    again = carve_validation(images, section)
    assert torch.equal(again.val.labels, data.val.labels), "same split_seed, same split"
    other = carve_validation(images, dataclasses.replace(section, split_seed=1))
    assert not torch.equal(other.val.labels, data.val.labels)


def test_subsets_are_drawn_from_their_own_part(images) -> None:
    full = carve_validation(images, DataSection())
    small = carve_validation(images, DataSection(train_subset=200, val_subset=20))
    assert len(small.train) == 200 and len(small.val) == 20
    assert torch.equal(small.val.images, full.val.images[:20]), "the subset never leaks training images into validation"
    assert torch.bincount(small.train.labels, minlength=10).min() >= 8


def test_missing_data_offline_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPO_DATA_ARCHIVE", raising=False)
    with pytest.raises(DataError, match=rf"looked in {tmp_path}.*HPO_DATA_ARCHIVE \(unset\).*HPO_OFFLINE=1.*--data-dir"):
        load_dataset(DataSection(data_dir=str(tmp_path)))


@pytest.mark.parametrize("dataset", ["cifar100", "mnist", "fashion_mnist"])
def test_other_datasets_missing_offline_say_where_they_looked(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(DataError, match=rf"dataset {dataset} not found: looked in {tmp_path} .*HPO_OFFLINE=1.*--data-dir") as caught:
        load_dataset(DataSection(dataset=dataset, data_dir=str(tmp_path)))  # type: ignore[arg-type]
    assert "HPO_DATA_ARCHIVE" not in str(caught.value), "the archive variable is for cifar10 only"


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_is_a_per_image_crop_and_flip_of_the_padded_image(channels: int) -> None:
    images = torch.randint(0, 256, (16, 8, 8, channels), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0), Hyperparameters(crop_padding=4, flip=True))
    assert out.shape == images.shape and out.dtype == torch.uint8
    pad = 4
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(
                out[i], (lambda c: c.flip(1) if flip else c)(padded[i, dy : dy + 8, dx : dx + 8])
            )
        ]
        assert matches, f"image {i} is not a crop/flip of its padded original"
        offsets.add(matches[0])
    assert len(offsets) > 4, "each image gets its own crop, not one per batch"


def test_augmentation_strength_is_configurable() -> None:
    images = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment(images, generator, Hyperparameters(crop_padding=0, flip=False)), images)
    flipped = augment(images, generator, Hyperparameters(crop_padding=0, flip=True))
    same = [torch.equal(flipped[i], images[i]) for i in range(32)]
    mirrored = [torch.equal(flipped[i], images[i].flip(1)) for i in range(32)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    cropped = augment(images, generator, Hyperparameters(crop_padding=2, flip=False))
    assert not torch.equal(cropped, images)
    # With at most 2 px of padding, the centre 4x4 of every image survives somewhere unflipped.
    assert all(
        any(torch.equal(cropped[i, y : y + 4, x : x + 4], images[i, 2:6, 2:6]) for y in range(5) for x in range(5))
        for i in range(32)
    )


def test_batches_cover_an_epoch_and_normalize_to_channels_last(images) -> None:
    data = carve_validation(images, DataSection(train_subset=300, val_subset=50))
    batches = list(train_batches(data.train, batch_size=64, generator=torch.Generator().manual_seed(0), augmentation=None))
    assert len(batches) == 4 and all(len(labels) == 64 for _, labels in batches)
    labels = torch.cat([labels for _, labels in batches])
    assert len(set(labels.tolist())) == 10
    normalize = Normalizer(mean=data.mean, std=data.std, device=torch.device("cpu"))
    x = normalize(batches[0][0])
    assert x.shape == (64, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3


def test_image_folder_of_any_size_and_classes(tmp_path: Path) -> None:
    from PIL import Image

    for split, per_class in (("train", 3), ("test", 1)):
        for name, colour in (("forest", (0, 128, 0)), ("sea", (0, 0, 255))):
            folder = tmp_path / "set" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                # Gray pixels, stored as grayscale or as RGB.
                Image.new("RGB" if i else "L", (40 + i, 30), (colour[2],) * 3 if i else colour[2]).save(folder / f"{i}.png")
    dataset = load_dataset(DataSection(dataset="image_folder", data_dir=str(tmp_path / "set"), image_size=16))
    assert dataset.classes == ("forest", "sea")
    # Every image is gray (the RGB ones too): one channel, detected.
    assert dataset.train_images.shape == (6, 16, 16, 1) and dataset.test_images.shape == (2, 16, 16, 1)
    assert dataset.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.mean == pytest.approx((dataset.train_images.float().mean().item() / 255,))
    rgb = load_dataset(DataSection(dataset="image_folder", data_dir=str(tmp_path / "set"), image_size=16, channels=3))
    assert rgb.train_images.shape == (6, 16, 16, 3) and len(rgb.mean) == 3


def test_image_folder_colour_is_detected(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for name, colour in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (20, 20), colour).save(folder / f"{name}.png")
    dataset = load_dataset(DataSection(dataset="image_folder", data_dir=str(tmp_path)))
    assert dataset.image_shape == (3, 32, 32), "colour images keep 3 channels; the default size is 32 px"
    assert dataset.std[0] > 0.3


def test_a_named_dataset_from_a_folder_gets_its_shape_and_statistics(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for digit in ("0", "1"):
            folder = tmp_path / split / digit
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (30, 90, 150)).save(folder / "a.png")
    dataset = load_dataset(DataSection(dataset="mnist", data_dir=str(tmp_path)))
    assert dataset.image_shape == (1, 28, 28), "MNIST's own size and channel count"
    assert dataset.mean == DATASETS["mnist"].mean and dataset.std == DATASETS["mnist"].std
    # RGB to gray with PIL's weights: 0.299 * 30 + 0.587 * 90 + 0.114 * 150 = 78.9, rounded.
    assert dataset.train_images.unique().tolist() == [79]


def _idx(path: Path, array: torch.Tensor) -> None:
    """Write an uncompressed MNIST idx file (big-endian dims after a uint8 type code)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def _mnist_files(root: Path) -> torch.Tensor:
    """torchvision's four MNIST files under ``root/MNIST/raw``: 20 random training images, 5 test; the training images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    _idx(raw / "train-images-idx3-ubyte", train)
    _idx(raw / "train-labels-idx1-ubyte", torch.arange(20, dtype=torch.uint8) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", train[:5])
    _idx(raw / "t10k-labels-idx1-ubyte", torch.arange(5, dtype=torch.uint8))
    return train


def test_torchvision_files_are_read_resized_and_converted(tmp_path: Path) -> None:
    train = _mnist_files(tmp_path)
    dataset = load_dataset(DataSection(dataset="mnist", data_dir=str(tmp_path)))
    assert dataset.image_shape == (1, 28, 28) and len(dataset.classes) == 10
    assert torch.equal(dataset.train_images[..., 0], train) and dataset.train_labels.tolist()[:11] == [*range(10), 0]
    assert dataset.mean == DATASETS["mnist"].mean
    big = load_dataset(DataSection(dataset="mnist", data_dir=str(tmp_path), image_size=32, channels=3))
    assert big.train_images.shape == (20, 32, 32, 3) and big.test_images.shape == (5, 32, 32, 3)
    assert torch.equal(big.train_images[..., 0], big.train_images[..., 2]), "gray repeated into RGB"
    assert len(big.mean) == 3 and big.mean[0] == pytest.approx(train.float().mean().item() / 255, abs=0.01)


def test_image_folder_without_train_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data_dir: {tmp_path} is neither a folder with train/<class>/"):
        load_dataset(DataSection(dataset="image_folder", data_dir=str(tmp_path)))


def test_torchvision_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    _mnist_files(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated, as an interrupted copy leaves it
    looked = rf"dataset mnist not found: looked in {tmp_path} \(torchvision's MNIST files in {raw} are incomplete or corrupt: "
    with pytest.raises(DataError, match=looked + r".*; delete them\)"):
        load_dataset(DataSection(dataset="mnist", data_dir=str(tmp_path)))
    images.unlink()
    with pytest.raises(DataError, match=rf"torchvision's MNIST files in {raw} are incomplete or corrupt; delete them"):
        load_dataset(DataSection(dataset="mnist", data_dir=str(tmp_path)))
