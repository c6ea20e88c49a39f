"""The Optuna objective: suggest → build → fit → report every epoch → prune.

This is the only training-side module that imports Optuna; ``hpo.train`` sees a plain callback.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from hpo.data import SearchData
from hpo.models import build_model, count_parameters
from hpo.notes import Pruned
from hpo.outage import StorageGuard
from hpo.space import Hyperparameters, suggest
from hpo.spec import StudySpec
from hpo.study import FINISHED_STATES
from hpo.train import EpochResult, TrainConfig, fit, load_checkpoint

logger = logging.getLogger(__name__)

# Called after every epoch of every trial, for progress displays: (trial number, epoch result).
EpochListener = Callable[[int, EpochResult], None]
# Called when the pruner stops a trial, with the storage reachable: e.g. hpo.notes.write_pruning_note.
PruneListener = Callable[[optuna.Trial, Pruned], None]

# Seconds between writes of a running trial's progress user attrs (epochs, best_epoch, val_accuracy,
# seconds_per_epoch, images_per_second). Each attr is one storage write, and writing all five every
# epoch was most of a worker's storage time (bench/storage.py); they are also written when the trial ends.
PROGRESS_WRITE_S = 30.0

# Trial states that hold a place in the study's budget.
_BUDGETED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


class TrialFailed(Exception):
    """Ends a trial as FAIL with a ``fail_reason`` user attr; the worker goes on with the next trial."""


class TrialAbandoned(Exception):
    """The trial was ended under this worker (reaped as stale, or failed by hand in the dashboard).

    Not this worker's error: it stops training that trial and goes on; a reaped trial's retry
    resumes from the checkpoint, which is kept.
    """


def stored_trial(trial: optuna.Trial, study_id: int) -> optuna.trial.FrozenTrial:
    """The stored state of a live trial, through the storage's public lookups (Trial has no getter)."""
    storage = trial.storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))


def original_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial this one retries (the first of a retry chain), or its own number."""
    failed = trial.system_attrs.get("failed_trial")
    return int(failed) if failed is not None else trial.number


def trial_seed(study_seed: int, trial_number: int) -> int:
    """A distinct, reproducible seed per trial; stored as the trial's ``seed`` user attr."""
    return (study_seed * 1_000_003 + trial_number) % 2**31


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def train_config(spec: StudySpec, hp: Hyperparameters, *, seed: int, device: torch.device) -> TrainConfig:
    train = spec.train
    return TrainConfig(
        hp=hp, max_epochs=train.max_epochs, augment=train.augment, seed=seed, device=device, compile=train.compile,
        precision=train.precision,
    )


def score(result: EpochResult, metric: str) -> float:
    """The epoch's value of the study's metric: what is reported, pruned on and returned."""
    return result.val_loss if metric == "val_loss" else result.val_accuracy


def seeded_model(spec: StudySpec, hp: Hyperparameters, data: SearchData, seed: int) -> torch.nn.Module:
    """The trial's model with its initial weights drawn from ``seed``; replay depends on this being the one way."""
    torch.manual_seed(seed)
    channels, height, _ = data.image_shape
    return build_model(spec.model.name, hp, in_channels=channels, num_classes=data.num_classes, image_size=height)


class EpochRecorder:
    """What a trial writes to the storage, held back while the storage is away.

    Training does not wait for the storage: an epoch's value and attributes are queued, sent at the
    next epoch boundary that finds the storage reachable, and at the latest before the trial ends,
    so an outage loses no epoch.  A write refused because the trial is already finished means it
    was ended under this worker: ``TrialAbandoned``.
    """

    def __init__(self, trial: optuna.Trial, guard: StorageGuard) -> None:
        self.trial = trial
        self.guard = guard
        self._attrs: dict[str, object] = {}  # latest value per key; older ones need not be sent
        self._values: list[tuple[int, float]] = []  # (epoch, value) not yet reported

    def set(self, **attrs: object) -> None:
        self._attrs.update(attrs)

    def report(self, epoch: int, value: float) -> None:
        self._values.append((epoch, value))

    @property
    def pending(self) -> bool:
        return bool(self._attrs or self._values)

    def _send_one(self) -> None:
        if self._attrs:
            key, value = next(iter(self._attrs.items()))
            self.trial.set_user_attr(key, value)
            del self._attrs[key]
        else:
            epoch, value = self._values[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an epoch inherited from the trial this one retries
                self.trial.report(value, epoch)
            del self._values[0]

    def flush(self, *, wait: bool) -> bool:
        """Send what is queued; True once it is all stored.  ``wait``: through an outage (or
        StorageUnavailable), else stop at the first failed write and keep the rest for later."""
        what = f"record trial {self.trial.number}"
        if not wait and self.guard.down:
            return False  # the heartbeat thread is probing; training need not wait on a connect timeout
        try:
            while self.pending:
                if wait:
                    self.guard.call(what, self._send_one)
                elif not self.guard.attempt(what, self._send_one)[0]:
                    return False
        except optuna.exceptions.UpdateFinishedTrialError:
            raise TrialAbandoned(f"trial {self.trial.number} was ended while this worker trained it") from None
        return True


class Objective:
    """Callable that runs one trial for the worker; holds the device-resident data shared by all trials."""

    def __init__(
        self,
        *,
        spec: StudySpec,
        data: SearchData,
        device: torch.device,
        checkpoint_dir: Path,
        guard: StorageGuard,
        budget: int | None = None,
        on_epoch: EpochListener | None = None,
        on_pruned: PruneListener | None = None,
    ) -> None:
        self.spec = spec
        self.data = data
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.guard = guard
        self.budget = budget
        self.on_epoch = on_epoch
        self.on_pruned = on_pruned
        self.host = socket.gethostname()
        self._study_id: int | None = None

    def checkpoint_path(self, number: int) -> Path:
        return self.checkpoint_dir / self.spec.study.name / f"trial-{number}.pt"

    def _fail(self, trial: optuna.Trial, reason: str) -> TrialFailed:
        self.guard.call(f"record why trial {trial.number} failed", lambda: trial.set_user_attr("fail_reason", reason))
        return TrialFailed(reason)

    def _start(self, trial: optuna.Trial) -> tuple[int, Hyperparameters]:
        """Storage reads and writes before training: the budget check, the retried trial, the parameters."""
        # Two workers that started the last place in the same instant: the later one fails before it trains.
        # Trial numbers are dense from 0, so below the budget no surplus can be ahead of this trial, and
        # the read of every trial is skipped.
        if self.budget is not None and trial.number >= self.budget:
            ahead = sum(
                t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=_BUDGETED)
            )
            if ahead >= self.budget:
                trial.set_user_attr("fail_reason", f"surplus: {ahead} trials already hold the budget of {self.budget}")
                raise TrialFailed("surplus")
        # A retried trial (its worker died) keeps the seed and the checkpoint of the trial it retries.
        if self._study_id is None:  # fixed for the study's life: looked up once
            self._study_id = trial.storage.get_study_id_from_name(trial.study.study_name)
        number = original_number(stored_trial(trial, self._study_id))
        return number, suggest(trial, self.spec.space)

    def on_trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After the worker told the result: a finished trial's checkpoint is no longer needed.

        A failed one's is kept, since its retry resumes from it.
        """
        if trial.state in FINISHED_STATES:
            self.checkpoint_path(original_number(trial)).unlink(missing_ok=True)

    def __call__(self, trial: optuna.Trial) -> float:
        metric = self.spec.study.metric
        number, hp = self.guard.call(f"start trial {trial.number}", lambda: self._start(trial))
        seed = trial_seed(self.spec.study.seed, number)
        checkpoint = self.checkpoint_path(number)
        model = seeded_model(self.spec, hp, self.data, seed)
        recorder = EpochRecorder(trial, self.guard)
        recorder.set(seed=seed, params=count_parameters(model), device=device_name(self.device), host=self.host, pid=os.getpid())

        sign = 1.0 if metric == "val_loss" else -1.0  # lower sign * score is better
        history: list[EpochResult] = []
        resume = load_checkpoint(checkpoint) if number != trial.number else None
        if resume is not None:
            history.extend(resume.epochs)
            recorder.set(resumed_from_epoch=resume.epoch)
            logger.info("trial %d resumes trial %d after epoch %d", trial.number, number, resume.epoch)
            for result in resume.epochs:
                recorder.report(result.epoch, score(result, metric))
        recorder.flush(wait=True)

        def pruned(reason: str) -> optuna.TrialPruned:
            recorder.set(pruned_reason=reason, **progress())
            recorder.flush(wait=True)
            return optuna.TrialPruned(reason)

        progress_written = [time.monotonic()]  # when the progress attrs were last queued

        def progress() -> dict[str, object]:
            """The trial's progress user attrs (one storage write each: queued every PROGRESS_WRITE_S and at the end)."""
            finite = [e for e in history if math.isfinite(score(e, metric))]
            if not finite:
                return {}
            best = min(finite, key=lambda e: sign * score(e, metric))
            return {
                "epochs": finite[-1].epoch,
                "best_epoch": best.epoch,
                "val_accuracy": best.val_accuracy,
                "seconds_per_epoch": sum(e.seconds for e in finite) / len(finite),
                "images_per_second": sum(e.images_per_second for e in finite) / len(finite),
            }

        def on_epoch_end(result: EpochResult) -> None:
            history.append(result)
            if self.on_epoch is not None:
                self.on_epoch(trial.number, result)
            if not (math.isfinite(result.val_loss) and math.isfinite(result.train_loss)):
                raise pruned(f"diverged: non-finite loss at epoch {result.epoch}")
            if time.monotonic() - progress_written[0] >= PROGRESS_WRITE_S:
                recorder.set(**progress())
                progress_written[0] = time.monotonic()
            recorder.report(result.epoch, score(result, metric))
            if not recorder.flush(wait=False):
                return  # the storage is away: train on, report these epochs once it is back
            # The pruner may read the trials Optuna cached for this trial, so success proves nothing.
            reachable, prune = self.guard.attempt(
                f"decide on pruning trial {trial.number}", trial.should_prune, reads_storage=False
            )
            if reachable and prune:
                value = score(result, metric)
                best = min(history, key=lambda e: sign * score(e, metric))
                if self.on_pruned is not None:
                    event = Pruned(
                        epoch=result.epoch, value=value, best=score(best, metric), metric=metric, pruner=self.spec.pruner
                    )
                    self.guard.call(f"note why trial {trial.number} was pruned", lambda: self.on_pruned(trial, event))
                raise pruned(f"pruned at epoch {result.epoch} with {metric} {value:.4f}")

        config = train_config(self.spec, hp, seed=seed, device=self.device)
        try:
            fit(model, self.data, config, on_epoch_end, checkpoint=checkpoint, resume=resume)
        except torch.cuda.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            checkpoint.unlink(missing_ok=True)
            if hasattr(trial, "set_constraint"):  # Optuna >= 5: the point is infeasible
                self.guard.call(f"record trial {trial.number}", lambda: trial.set_constraint("cuda_oom", 1.0))
            raise self._fail(trial, "cuda_oom") from None
        recorder.set(**progress())
        recorder.flush(wait=True)
        return score(min(history, key=lambda e: sign * score(e, metric)), metric)
