"""Datasets in memory and the parts a study uses: the training part, the validation part carved from it, the test set.

Everything here is uint8 image tensors (N, H, W, C) and int64 labels; the split is a seeded
permutation that depends only on ``[data] split_seed``, so every trial is selected on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpo.errors import DataError
from hpo.studyfile.spec import DataSection


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

