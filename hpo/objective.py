"""The Optuna objective: suggest → build → fit → report every epoch → prune.

This is the only training-side module that imports Optuna; ``hpo.train`` sees a plain callback.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable

import optuna
import torch

from hpo.data import SearchData
from hpo.models import build_model, count_parameters
from hpo.space import Hyperparameters, suggest
from hpo.spec import StudySpec
from hpo.train import EpochResult, TrainConfig, fit

logger = logging.getLogger(__name__)

# Called after every epoch of every trial, for progress displays: (trial number, epoch result).
EpochListener = Callable[[int, EpochResult], None]


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A distinct, reproducible seed per trial; stored as the trial's ``seed`` user attr."""
    return (study_seed * 1_000_003 + trial_number) % 2**31


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def train_config(spec: StudySpec, hp: Hyperparameters, *, seed: int, device: torch.device) -> TrainConfig:
    return TrainConfig(
        lr=hp.scaled_lr(),
        batch_size=hp.batch_size,
        weight_decay=hp.weight_decay,
        optimizer=hp.optimizer,
        momentum=hp.momentum,
        max_epochs=spec.train.max_epochs,
        augment=spec.train.augment,
        seed=seed,
        device=device,
        nesterov=hp.nesterov,
        schedule=hp.schedule,
        step_size=hp.step_size,
        gamma=hp.gamma,
        warmup_fraction=hp.warmup_fraction,
        l1=hp.l1,
        label_smoothing=hp.label_smoothing,
        class_weighting=hp.class_weighting,
        crop_padding=hp.crop_padding,
        flip=hp.flip,
    )


class Objective:
    """Callable passed to ``study.optimize``; holds the device-resident data shared by all trials."""

    def __init__(
        self,
        *,
        spec: StudySpec,
        data: SearchData,
        device: torch.device,
        on_epoch: EpochListener | None = None,
    ) -> None:
        self.spec = spec
        self.data = data
        self.device = device
        self.on_epoch = on_epoch
        self.host = socket.gethostname()

    def __call__(self, trial: optuna.Trial) -> float:
        metric = self.spec.study.metric
        seed = trial_seed(self.spec.study.seed, trial.number)
        hp = suggest(trial, self.spec.space)
        torch.manual_seed(seed)  # the model's initial weights
        channels, height, _ = self.data.image_shape
        model = build_model(
            self.spec.model.name, hp, in_channels=channels, num_classes=self.data.num_classes, image_size=height
        )
        for key, value in {
            "seed": seed,
            "params": count_parameters(model),
            "device": device_name(self.device),
            "host": self.host,
        }.items():
            trial.set_user_attr(key, value)

        def score(result: EpochResult) -> float:
            return result.val_loss if metric == "val_loss" else result.val_accuracy

        sign = 1.0 if metric == "val_loss" else -1.0  # lower sign * score is better
        history: list[EpochResult] = []

        def on_epoch_end(result: EpochResult) -> None:
            history.append(result)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, result)
            if not (math.isfinite(result.val_loss) and math.isfinite(result.train_loss)):
                trial.set_user_attr("pruned_reason", f"diverged: non-finite loss at epoch {result.epoch}")
                raise optuna.TrialPruned(f"diverged at epoch {result.epoch}")
            best = min(history, key=lambda e: sign * score(e))
            for key, value in {
                "epochs": result.epoch,
                "best_epoch": best.epoch,
                "val_accuracy": best.val_accuracy,
                "seconds_per_epoch": sum(e.seconds for e in history) / len(history),
                "images_per_second": sum(e.images_per_second for e in history) / len(history),
            }.items():
                trial.set_user_attr(key, value)
            trial.report(score(result), result.epoch)
            if trial.should_prune():
                reason = f"pruned at epoch {result.epoch} with {metric} {score(result):.4f}"
                trial.set_user_attr("pruned_reason", reason)
                raise optuna.TrialPruned(reason)

        fit(model, self.data, train_config(self.spec, hp, seed=seed, device=self.device), on_epoch_end)
        return score(min(history, key=lambda e: sign * score(e)))
