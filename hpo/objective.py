"""The Optuna objective: suggest → build → fit → report every epoch → prune.

This is the only training-side module that imports Optuna; ``hpo.train`` sees a plain callback.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from hpo.dashboard import note_pruned
from hpo.data import SearchData
from hpo.models import build_model, count_parameters
from hpo.space import Hyperparameters, suggest
from hpo.spec import StudySpec
from hpo.train import EpochResult, TrainConfig, fit, load_checkpoint

logger = logging.getLogger(__name__)

# Called after every epoch of every trial, for progress displays: (trial number, epoch result).
EpochListener = Callable[[int, EpochResult], None]

# Trial states that hold a place in the study's budget.
_BUDGETED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


class TrialFailed(Exception):
    """Ends a trial as FAIL with a ``fail_reason`` user attr; the worker goes on with the next trial."""


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored state of a live trial (Optuna's Trial exposes no public getter for it)."""
    return trial.storage.get_trial(trial._trial_id)


def original_number(trial: optuna.Trial) -> int:
    """The number of the trial this one retries (the first of a retry chain), or its own number."""
    failed = frozen(trial).system_attrs.get("failed_trial")
    return int(failed) if failed is not None else trial.number


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
        compile=spec.train.compile,
        precision=spec.train.precision,
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


def score(result: EpochResult, metric: str) -> float:
    """The epoch's value of the study's metric: what is reported, pruned on and returned."""
    return result.val_loss if metric == "val_loss" else result.val_accuracy


def seeded_model(spec: StudySpec, hp: Hyperparameters, data: SearchData, seed: int) -> torch.nn.Module:
    """The trial's model with its initial weights drawn from ``seed``; replay depends on this being the one way."""
    torch.manual_seed(seed)
    channels, height, _ = data.image_shape
    return build_model(spec.model.name, hp, in_channels=channels, num_classes=data.num_classes, image_size=height)


class Objective:
    """Callable passed to ``study.optimize``; holds the device-resident data shared by all trials."""

    def __init__(
        self,
        *,
        spec: StudySpec,
        data: SearchData,
        device: torch.device,
        checkpoint_dir: Path,
        budget: int | None = None,
        on_epoch: EpochListener | None = None,
    ) -> None:
        self.spec = spec
        self.data = data
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.budget = budget
        self.on_epoch = on_epoch
        self.host = socket.gethostname()

    def checkpoint_path(self, number: int) -> Path:
        return self.checkpoint_dir / self.spec.study.name / f"trial-{number}.pt"

    def _fail(self, trial: optuna.Trial, reason: str) -> TrialFailed:
        trial.set_user_attr("fail_reason", reason)
        return TrialFailed(reason)

    def _check_budget(self, trial: optuna.Trial) -> None:
        """Fail a trial that two workers started at once past the budget, before it trains."""
        if self.budget is None:
            return
        ahead = sum(
            t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=_BUDGETED)
        )
        if ahead >= self.budget:
            raise self._fail(trial, f"surplus: {ahead} trials already hold the budget of {self.budget}")

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_budget(trial)
        metric = self.spec.study.metric
        # A retried trial (its worker died) keeps the seed and the checkpoint of the trial it retries.
        number = original_number(trial)
        seed = trial_seed(self.spec.study.seed, number)
        checkpoint = self.checkpoint_path(number)
        hp = suggest(trial, self.spec.space)
        model = seeded_model(self.spec, hp, self.data, seed)
        for key, value in {
            "seed": seed,
            "params": count_parameters(model),
            "device": device_name(self.device),
            "host": self.host,
            "pid": os.getpid(),
        }.items():
            trial.set_user_attr(key, value)

        sign = 1.0 if metric == "val_loss" else -1.0  # lower sign * score is better
        history: list[EpochResult] = []
        resume = load_checkpoint(checkpoint) if number != trial.number else None
        if resume is not None:
            history.extend(resume.epochs)
            trial.set_user_attr("resumed_from_epoch", resume.epoch)
            logger.info("trial %d resumes trial %d after epoch %d", trial.number, number, resume.epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # epochs already inherited from the failed trial
                for result in resume.epochs:
                    trial.report(score(result, metric), result.epoch)

        def on_epoch_end(result: EpochResult) -> None:
            history.append(result)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, result)
            if not (math.isfinite(result.val_loss) and math.isfinite(result.train_loss)):
                trial.set_user_attr("pruned_reason", f"diverged: non-finite loss at epoch {result.epoch}")
                raise optuna.TrialPruned(f"diverged at epoch {result.epoch}")
            best = min(history, key=lambda e: sign * score(e, metric))
            for key, value in {
                "epochs": result.epoch,
                "best_epoch": best.epoch,
                "val_accuracy": best.val_accuracy,
                "seconds_per_epoch": sum(e.seconds for e in history) / len(history),
                "images_per_second": sum(e.images_per_second for e in history) / len(history),
            }.items():
                trial.set_user_attr(key, value)
            trial.report(score(result, metric), result.epoch)
            if trial.should_prune():
                reason = f"pruned at epoch {result.epoch} with {metric} {score(result, metric):.4f}"
                trial.set_user_attr("pruned_reason", reason)
                note_pruned(trial, epoch=result.epoch, value=score(result, metric), best=score(best, metric), metric=metric)
                raise optuna.TrialPruned(reason)

        config = train_config(self.spec, hp, seed=seed, device=self.device)
        try:
            fit(model, self.data, config, on_epoch_end, checkpoint=checkpoint, resume=resume)
        except torch.cuda.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            if hasattr(trial, "set_constraint"):  # Optuna >= 5: the point is infeasible
                trial.set_constraint("cuda_oom", 1.0)
            checkpoint.unlink(missing_ok=True)
            raise self._fail(trial, "cuda_oom") from None
        except optuna.TrialPruned:
            checkpoint.unlink(missing_ok=True)
            raise
        checkpoint.unlink(missing_ok=True)  # kept only while a trial may still be resumed
        return score(min(history, key=lambda e: sign * score(e, metric)), metric)
