"""The training recipe a trial, its re-evaluations, its replay and its retraining all share.

A trial's model is built with its initial weights drawn from its seed, trained with the study
file's ``[train]`` settings and scored by the study's metric; the best epoch is the one with the best
score.  Replay and retraining depend on these being the one way to do each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from hpo.studyfile import names
from hpo.studyfile.space import Hyperparameters
from hpo.studyfile.spec import DIRECTIONS, StudySpec, direction_sign
from hpo.training.config import EpochResult, TrainConfig
from hpo.training.models import build_model
from hpo.training.splits import Dataset, SearchData


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A distinct, reproducible seed per trial; stored as the trial's ``seed`` user attr."""
    return (study_seed * 1_000_003 + trial_number) % 2**31


def train_config(spec: StudySpec, hp: Hyperparameters, *, seed: int, device: torch.device) -> TrainConfig:
    train = spec.train
    return TrainConfig(
        hp=hp, max_epochs=train.max_epochs, augment=train.augment, seed=seed, device=device, compile=train.compile,
        precision=train.precision,
    )


def seeded_model(spec: StudySpec, hp: Hyperparameters, data: SearchData, seed: int) -> torch.nn.Module:
    """The trial's model with its initial weights drawn from ``seed``."""
    torch.manual_seed(seed)
    channels, height, _ = data.image_shape
    return build_model(
        spec.model.name, hp, in_channels=channels, num_classes=data.num_classes, image_size=height,
        weights=spec.model.weights,
    )


def prepare_model(spec: StudySpec, dataset: Dataset) -> Dataset:
    """Check the study's model against its data before anything is stored, and give the data the model's normalization.

    For ``torchvision:<arch>``: the arch, the weights (their file fetched once, here) and the image
    shape are checked, each problem one line naming the study file; a pretrained model sees its
    weights' own mean and std instead of the dataset's.  A user's own model is built once and given a
    dummy batch (:func:`hpo.training.user_models.check_user_model`).  Built-in models: the dataset unchanged.
    """
    from hpo.training.backbones import prepare_backbone

    if names.is_user_model(spec.model.name):
        _check_user_model(spec, dataset)
        return dataset
    arch = names.torchvision_arch(spec.model.name)
    if arch is None:
        return dataset
    pretrained = prepare_backbone(
        arch, spec.model.weights, image_shape=dataset.image_shape, num_classes=len(dataset.classes),
        where=f"{spec.path}: [model]",
    )
    if pretrained is None:
        return dataset
    return dataclasses.replace(dataset, mean=pretrained.mean, std=pretrained.std)


def score(result: EpochResult, metric: str) -> float:
    """The epoch's value of the study's metric: what is reported, pruned on and returned."""
    return result.val_loss if metric == "val_loss" else result.val_accuracy


def best_epoch(epochs: Iterable[EpochResult], metric: str) -> EpochResult:
    """The epoch with the best ``metric`` (the first of equals); ValueError when there is none."""
    sign = direction_sign(DIRECTIONS[metric])
    return min(epochs, key=lambda e: sign * score(e, metric))


def _check_user_model(spec: StudySpec, dataset: Dataset) -> None:
    from hpo.training.user_models import check_user_model

    channels, size, _ = dataset.image_shape
    check_user_model(
        spec.model.name, spec.model.space.probe(), in_channels=channels, num_classes=len(dataset.classes),
        image_size=size, where=f"{spec.path}: [model]",
    )


def model_image_size(spec: StudySpec) -> int | None:
    """The image size the study's model asks for when ``[data] image_size`` is not set: a pretrained model's
    native size (224 px for ImageNet weights, the size its features were learned at); else None (the dataset's own)."""
    arch = names.torchvision_arch(spec.model.name)
    if arch is None or spec.model.weights is None:
        return None
    from hpo.training.backbones import pretrained_input

    pretrained = pretrained_input(arch, spec.model.weights, where=f"{spec.path}: [model]")
    return None if pretrained is None else pretrained.image_size
