"""What goes into the training loop (``TrainConfig``) and what comes out of it after every epoch (``EpochResult``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpo.studyfile.space import Hyperparameters


@dataclass(frozen=True)
class TrainConfig:
    hp: Hyperparameters  # the trial's configuration: everything the optimizer, schedule, loss and batches read
    max_epochs: int
    augment: bool  # false: no augmentation whatever hp says
    seed: int
    device: torch.device
    compile: bool = False
    precision: str = "auto"  # auto, bf16, fp16 or fp32: see hpo.training.device.choose_precision


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_accuracy: float  # fraction in [0, 1]
    train_seconds: float  # wall time of the training pass alone
    seconds: float  # wall time of training and evaluation
    images_per_second: float  # training images per second of train_seconds

