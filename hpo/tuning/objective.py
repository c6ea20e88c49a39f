"""The Optuna objective: params → model → fit → every epoch reported, and perhaps pruned.

:class:`Objective` holds what every trial of a worker shares (the study file, the data on the
device, the storage guard); each call runs one :class:`TrialRun`.  This is the only module between
Optuna and training: :mod:`hpo.training` sees plain hyperparameters and a per-epoch callback.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from hpo.studyfile.samplers import may_prune_at
from hpo.studyfile.space import (
    PARAMETERS,
    Distribution,
    Fixed,
    FloatRange,
    Hyperparameters,
    IntRange,
    ModelSpace,
    SearchSpace,
    Value,
)
from hpo.studyfile.spec import BEFORE_TRAINING, StudySpec
from hpo.training.config import EpochResult
from hpo.training.device import device_name, precision_for
from hpo.training.fit import Checkpoint, fit, load_checkpoint
from hpo.training.measure import measure_costs
from hpo.training.models import count_parameters
from hpo.training.recipe import best_epoch, score, seeded_model, train_config, trial_seed
from hpo.training.splits import SearchData
from hpo.tuning.budget import (
    FINISHED_STATES,
    duplicate,
    finished_configurations,
    lineage_tips,
    original_number,
    surplus,
)
from hpo.tuning.notes import Pruned
from hpo.tuning.outage import StorageGuard
from hpo.tuning.pareto import (
    CONSTRAINTS_ATTR,
    CONSTRAINTS_ON_TRIALS,
    CURVE_ATTR,
    CURVE_TRIAL_ATTR,
    TWIN_OF_ATTR,
    constraint_values,
    violations,
)
from hpo.tuning.promotion import PAUSED_ATTR, PROMOTED_ATTR, Promotion
from hpo.tuning.retry import FAILURES_ATTR
from hpo.tuning.study import open_curves_study

logger = logging.getLogger(__name__)

# Called after every epoch of every trial, for progress displays: (trial number, epoch result).
EpochListener = Callable[[int, EpochResult], None]
# Called when the pruner stops a trial, with the storage reachable: e.g. hpo.tuning.notes.write_pruning_note.
PruneListener = Callable[[optuna.Trial, Pruned], None]

# Seconds between writes of a running trial's progress user attrs (val_accuracy, seconds_per_epoch,
# images_per_second). Each attr is one storage write, and writing them every epoch was most of a worker's
# storage time (bench/storage.py); they are also written when the trial ends.
PROGRESS_WRITE_S = 30.0


class TrialFailed(Exception):
    """Ends a trial as FAIL with a ``fail_reason`` user attr; the worker goes on with the next trial."""


class TrialAbandoned(Exception):
    """The trial was ended under this worker (reaped as stale, or failed by hand in the dashboard).

    Not this worker's error: it stops training that trial and goes on; a reaped trial's retry
    resumes from the checkpoint, which is kept.
    """


def stored_trial(trial: optuna.Trial, study_id: int) -> optuna.trial.FrozenTrial:
    """The stored state of a live trial, through the storage's public lookups (Trial has no getter)."""
    return _trial_by_number(trial.storage, study_id, trial.number)


def _trial_by_number(storage: optuna.storages.BaseStorage, study_id: int, number: int) -> optuna.trial.FrozenTrial:
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))


def _sample(trial: optuna.Trial, name: str, dist: Distribution) -> Value:
    if isinstance(dist, Fixed):
        return dist.value
    if isinstance(dist, FloatRange):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntRange):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_categorical(name, dist.choices)  # type: ignore[arg-type]


def suggest(trial: optuna.Trial, space: SearchSpace, model_space: ModelSpace | None = None) -> Hyperparameters:
    """Sample one configuration; a conditional hyperparameter is sampled only when it applies.

    A user model's [model.space] hyperparameters are sampled under their own names too, so they are
    stored in ``trial.params`` like every other one.
    """
    values: dict[str, Value] = {}
    for name, dist in space.entries:
        condition = PARAMETERS[name].only_when
        applies = condition is None or values[condition[0]] in condition[1]
        values[name] = _sample(trial, name, dist) if applies else PARAMETERS[name].default
    model_params = {name: _sample(trial, name, dist) for name, dist in (model_space.entries if model_space else ())}
    return Hyperparameters(**values, model_params=model_params)  # type: ignore[arg-type]


class EpochRecorder:
    """What a trial writes to the storage, held back while the storage is away.

    Training does not wait for the storage: an epoch's value and attributes are queued, sent at the
    next epoch boundary that finds the storage reachable, and at the latest before the trial ends,
    so an outage loses no epoch.  A write refused because the trial is already finished means it
    was ended under this worker: ``TrialAbandoned``.
    """

    def __init__(self, trial: optuna.Trial, guard: StorageGuard, *, curve_trial: optuna.Trial | None = None) -> None:
        self.trial = trial
        self.guard = guard
        # Where epochs are reported: the trial itself, or in a multi-objective study its twin in the curves study.
        self.curve_trial = curve_trial or trial
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
                self.curve_trial.report(value, epoch)
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
        on_progress: Callable[[float], None] | None = None,
        takeover_after: float | None = None,
        silent_for: Callable[[], float] | None = None,
        on_final_checkpoint: Callable[[optuna.Trial, Path], None] | None = None,
    ) -> None:
        self.spec = spec
        # Sees a trial's last checkpoint once it is trained or pruned, while it still runs: Optuna attaches
        # artifacts to running trials only (hpo.run --upload-checkpoints).
        self.on_final_checkpoint = on_final_checkpoint
        # Seconds without a heartbeat after which another worker may have reaped this worker's trial (its grace
        # period less one heartbeat interval): past them, a worker cut off or frozen stops training the trial.
        self.takeover_after = takeover_after
        # Seconds the trial has gone without a heartbeat (default: since the storage became unreachable).
        self.silent_for = silent_for if silent_for is not None else guard.down_for
        # Called with each epoch's seconds: the worker's ProgressClock, which keeps a stuck trial from beating.
        self.on_progress = on_progress
        self.data = data
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        self.guard = guard
        self.budget = budget
        self.on_epoch = on_epoch
        self.on_pruned = on_pruned
        # The autocast precision [train] precision means on this device; stored with every trial as "precision".
        self.precision = precision_for(spec.train.precision, device)
        logger.info(
            "training in %s on %s ([train] precision = %r)", self.precision, device_name(device), spec.train.precision
        )
        # [pruner] type = "promotion_halving": hpo pauses trials at the rungs instead of asking Optuna's pruner.
        self.promotion = Promotion.of(spec)
        self._study_id: int | None = None
        self._checkpoints: dict[int, Path] = {}  # trial number → its checkpoint, until the trial ends
        self._curves: optuna.Study | None = None  # multi-objective: the curves study (open_curves_study)

    def checkpoint_path(self, number: int, started: datetime.datetime | None) -> Path:
        """Where trial ``number`` (the first of a retry chain), started at ``started``, and its retries keep
        their last epoch.

        Keyed by the original trial's start time as well as its number: a study deleted and created
        again under the same name numbers its trials from 0 again, and must not resume from the old
        study's weights.
        """
        assert started is not None  # set by Optuna when the trial was asked for
        stamp = started.strftime("%Y%m%dT%H%M%S%f")
        return self.checkpoint_dir / self.spec.study.name / f"trial-{number}-{stamp}.pt"

    def worker_facts(self) -> dict[str, object]:
        """What every trial of this worker shares, for the worker's claim (user attr ``worker``): written once
        per trial with the host and pid, not as attrs of their own (each attr is one storage write)."""
        return {"device": device_name(self.device), "precision": self.precision}

    def study_id(self, trial: optuna.Trial) -> int:
        if self._study_id is None:  # fixed for the study's life: looked up once
            self._study_id = trial.storage.get_study_id_from_name(trial.study.study_name)
        return self._study_id

    def _start(self, trial: optuna.Trial) -> tuple[int, Path, Hyperparameters]:
        """Storage reads and writes before training: the budget check, the retried trial, the parameters."""
        # Two workers that started the last place in the same instant: the later one fails before it trains.
        too_many = surplus(trial, self.budget) if self.budget is not None else None
        if too_many is not None:
            trial.set_user_attr("fail_reason", too_many)
            raise TrialFailed("surplus")
        # A retried trial (its worker died) or a resumed one (promoted from a pause) keeps the seed and the checkpoint
        # of the first trial of its lineage. Only those (Requeue gives them FAILURES_ATTR, a promotion PROMOTED_ATTR)
        # need the stored trial and its original: a new one has what it needs.
        number, started = trial.number, trial.datetime_start
        if FAILURES_ATTR in trial.user_attrs or PROMOTED_ATTR in trial.user_attrs:
            stored = stored_trial(trial, self.study_id(trial))
            twice = duplicate(stored, trial.study.get_trials(deepcopy=False)) if PROMOTED_ATTR in trial.user_attrs else None
            if twice is not None:  # two workers promoted the same paused trial at once: the later one does not train
                trial.set_user_attr("fail_reason", twice)
                raise TrialFailed("duplicate")
            number = original_number(stored)
            if number != trial.number:
                started = _trial_by_number(trial.storage, self.study_id(trial), number).datetime_start
        path = self.checkpoint_path(number, started)
        self._checkpoints[trial.number] = path
        seed = trial_seed(self.spec.study.seed, number)
        if trial.user_attrs.get("seed") != seed:  # a retry inherits it: no second write
            trial.set_user_attr("seed", seed)  # at once: a killed run's retry shows it
        return number, path, suggest(trial, self.spec.space, self.spec.model.space)

    def on_trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After the worker told the result: a finished trial's checkpoint is no longer needed.

        A failed one's is kept, since its retry resumes from it, and a paused one's, which a promotion resumes.
        """
        path = self._checkpoints.pop(trial.number, None)
        if path is not None and trial.state in FINISHED_STATES and PAUSED_ATTR not in trial.user_attrs:
            path.unlink(missing_ok=True)

    def drop_paused_checkpoints(self, study: optuna.Study, budget: int) -> int:
        """Promotion halving, once the budget is met and no paused trial is due: those paused stay paused (nothing
        runs that could promote them), so their checkpoints are deleted; how many were.  Kept otherwise (a run that
        timed out goes on later).  Should a larger budget promote one after all, it trains again from its seed."""
        if self.promotion is None:
            return 0
        trials = study.get_trials(deepcopy=False)
        if finished_configurations(trials) < budget or self.promotion.next_promotion(trials) is not None:
            return 0
        by_number = {t.number: t for t in trials}
        dropped = 0
        for tip in lineage_tips(trials):
            if tip.state == optuna.trial.TrialState.PRUNED and PAUSED_ATTR in tip.user_attrs:
                first = by_number[original_number(tip)]
                path = self.checkpoint_path(first.number, first.datetime_start)
                if path.is_file():
                    path.unlink()
                    dropped += 1
        return dropped

    def _curve_trial(self, trial: optuna.Trial) -> optuna.Trial:
        """A multi-objective trial's twin in the curves study, linked both ways by user attrs."""
        if self._curves is None:
            self._curves = open_curves_study(self.spec, trial.storage)
        with warnings.catch_warnings():
            # Optuna's heartbeat thread belongs to study.optimize; the worker's Heartbeat beats for the trial, not its twin.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            twin = self._curves.ask()
        twin.set_user_attr(TWIN_OF_ATTR, trial.number)
        trial.set_user_attr(CURVE_TRIAL_ATTR, twin.number)
        return twin

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        number, path, hp = self.guard.call(f"start trial {trial.number}", lambda: self._start(trial))
        twin = None
        if self.spec.study.multi_objective:
            twin = self.guard.call(f"start the curve of trial {trial.number}", lambda: self._curve_trial(trial))
        run = TrialRun(self, trial, number, path, hp, curve_trial=twin)
        if self.on_final_checkpoint is None:
            return run.run()
        try:
            value = run.run()
        except optuna.TrialPruned:
            if path.is_file():
                self.on_final_checkpoint(trial, path)
            raise
        if path.is_file():
            self.on_final_checkpoint(trial, path)
        return value


class TrialRun:
    """One trial: its model and seed, the epochs trained so far, what it reports, and the pruning decision.

    ``number`` is the trial whose seed and checkpoint this one uses: its own, or for a retry the
    first trial of its retry chain, which it resumes after that trial's last checkpointed epoch.
    """

    def __init__(
        self, objective: Objective, trial: optuna.Trial, number: int, checkpoint: Path, hp: Hyperparameters, *,
        curve_trial: optuna.Trial | None = None,
    ) -> None:
        self.objective = objective
        self.trial = trial
        # Multi-objective: the twin in the curves study that reports the learning curve and is pruned; else None.
        self.curve_trial = curve_trial
        self.costs: dict[str, float] = {}  # objectives measured before training (hpo.training.measure), by name
        self.number = number
        self.metric = objective.spec.study.metric
        self.seed = trial_seed(objective.spec.study.seed, number)
        self.hp = hp
        self.checkpoint = checkpoint
        self.resume: Checkpoint | None = load_checkpoint(self.checkpoint) if number != trial.number else None
        self.recorder = EpochRecorder(trial, objective.guard, curve_trial=curve_trial)
        self.history: list[EpochResult] = []
        self.progress_written = time.monotonic()  # when the progress attrs were last queued

    def run(self) -> float | list[float]:
        """Train and report every epoch; the trial's value (its best epoch's), or in a multi-objective study its
        values (the objectives' order), or TrialPruned / TrialFailed.  A twin ends as its trial does."""
        try:
            values = self._train()
        except optuna.TrialPruned:
            self._end_curve(optuna.trial.TrialState.PRUNED)
            raise
        except BaseException:
            self._end_curve(optuna.trial.TrialState.FAIL)
            raise
        self._end_curve(optuna.trial.TrialState.COMPLETE)
        return values

    def _end_curve(self, state: optuna.trial.TrialState) -> None:
        """Tell the twin its trial's end; not waiting on the storage (a twin left running stops no one)."""
        twin = self.curve_trial
        if twin is None:
            return
        value = None
        if state == optuna.trial.TrialState.COMPLETE:
            value = score(best_epoch(self.history, self.metric), self.metric)
        study = twin.study
        try:
            self.objective.guard.attempt(
                f"end the curve of trial {self.trial.number}",
                lambda: study.tell(twin.number, value, state=state, skip_if_finished=True),
            )
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a reaper ended the twin of a trial it found ended (hpo.tuning.heartbeat.Reaper)

    def _train(self) -> float | list[float]:
        objective = self.objective
        model = seeded_model(objective.spec, self.hp, objective.data, self.seed)
        self.recorder.set(params=count_parameters(model))  # the model's size; sent with the next flush
        self._measure_before_training(model)
        self._resumed()
        config = train_config(objective.spec, self.hp, seed=self.seed, device=objective.device)
        try:
            fit(
                model, objective.data, config, self.on_epoch_end, checkpoint=self.checkpoint, resume=self.resume,
                before_checkpoint=self.before_checkpoint,
            )
        except torch.cuda.OutOfMemoryError:
            del model
            torch.cuda.empty_cache()
            self.checkpoint.unlink(missing_ok=True)
            raise self._out_of_memory() from None
        self.recorder.set(**self.progress())
        values = self._values()
        self.recorder.flush(wait=True)
        return values

    def _measure_before_training(self, model: torch.nn.Module) -> None:
        """Measure the objectives training does not change; a trial over a constraint on one ends here, pruned
        and recorded infeasible, without training."""
        study = self.objective.spec.study
        wanted = [n for n in BEFORE_TRAINING if n in study.objectives or n in study.constraints]
        if not wanted:
            return
        self.costs = measure_costs(model, wanted, image_shape=self.objective.data.image_shape, device=self.objective.device)
        self.recorder.set(**self.costs)
        broken = violations(study, self.costs)
        if broken:
            raise self._pruned(f"infeasible before training: {', '.join(broken)}")

    def measured(self) -> dict[str, float]:
        """Every objective known so far: the costs, the best epoch's metrics and the training seconds."""
        measured = dict(self.costs)
        finite = [e for e in self.history if math.isfinite(score(e, self.metric))]
        if finite:
            best = best_epoch(finite, self.metric)
            measured.update(val_loss=best.val_loss, val_accuracy=best.val_accuracy)
        measured["train_seconds"] = sum(e.train_seconds for e in self.history)  # s, training passes only
        return measured

    def _values(self) -> float | list[float]:
        """The trial's value, or its values in the objectives' order; the constraints queued for the storage."""
        study = self.objective.spec.study
        value = score(best_epoch(self.history, self.metric), self.metric)
        measured = self.measured()
        if study.constraints:
            self._constrain(constraint_values(study, measured))
        if not study.multi_objective:
            return value
        self.recorder.set(train_seconds=measured["train_seconds"])
        return [value if name == self.metric else measured[name] for name in study.objectives]

    def _resumed(self) -> None:
        """Report the epochs of the checkpoint this retry resumes from, and write what is queued."""
        if self.resume is not None:
            self.history.extend(self.resume.epochs)
            self.recorder.set(resumed_from_epoch=self.resume.epoch)
            logger.info("trial %d resumes trial %d after epoch %d", self.trial.number, self.number, self.resume.epoch)
            for result in self.resume.epochs:
                self.recorder.report(result.epoch, score(result, self.metric))
            self._record_curve()
        self.recorder.flush(wait=True)

    def progress(self) -> dict[str, object]:
        """The trial's progress user attrs (one storage write each: queued every PROGRESS_WRITE_S and at the end)."""
        finite = [e for e in self.history if math.isfinite(score(e, self.metric))]
        if not finite:
            return {}
        best = best_epoch(finite, self.metric)
        # The epochs trained and the best epoch are the trial's reported curve (hpo.results.report shows them).
        return {
            "val_accuracy": best.val_accuracy,
            "seconds_per_epoch": sum(e.seconds for e in finite) / len(finite),
            "images_per_second": sum(e.images_per_second for e in finite) / len(finite),
        }

    def before_checkpoint(self, result: EpochResult) -> None:
        """Without a heartbeat for longer than the trial's grace period (cut off from the storage, or the process
        frozen by Ctrl-Z, a Slurm suspend or a paused VM), a worker does not know whether another worker has
        reaped its trial and is resuming it from the checkpoint file: it waits for the storage (up to
        --storage-patience) before it writes that file or trains on, and stops if the trial is no longer its own.
        In an outage of everyone nobody reaps, so the trial goes on once the storage is back."""
        limit = self.objective.takeover_after
        silent = self.objective.silent_for()
        if limit is None or silent <= limit:
            return
        logger.warning(
            "trial %d: no heartbeat for %.0f s, longer than its grace period allows (%.0f s; cut off or frozen); "
            "checking with the storage before writing epoch %d's checkpoint", self.trial.number, silent, limit,
            result.epoch,
        )
        trial, objective = self.trial, self.objective
        # The study's id too is looked up through the guard: it may be this worker's first storage read of it.
        stored = objective.guard.call(
            f"check that trial {trial.number} is still this worker's", lambda: stored_trial(trial, objective.study_id(trial))
        )
        if stored.state != optuna.trial.TrialState.RUNNING:
            raise TrialAbandoned(
                f"trial {trial.number} was ended ({stored.state.name}) while this worker was cut off or frozen; stopped training "
                f"it after epoch {result.epoch - 1} without writing epoch {result.epoch}'s checkpoint"
            )

    def on_epoch_end(self, result: EpochResult) -> None:
        """fit's callback: record the epoch, report it when the storage can be reached, and prune if told to."""
        self.history.append(result)
        if self.objective.on_progress is not None:
            self.objective.on_progress(result.seconds)
        if self.objective.on_epoch is not None:
            self.objective.on_epoch(self.trial.number, result)
        if not (math.isfinite(result.val_loss) and math.isfinite(result.train_loss)):
            raise self._pruned(f"diverged: non-finite loss at epoch {result.epoch}")
        if time.monotonic() - self.progress_written >= PROGRESS_WRITE_S:
            self.recorder.set(**self.progress())
            self.progress_written = time.monotonic()
        self.recorder.report(result.epoch, score(result, self.metric))
        self._record_curve()
        if not self.recorder.flush(wait=False):
            return  # the storage is away: train on, report these epochs once it is back
        if result.epoch >= self.objective.spec.train.max_epochs:
            return  # trained to the end: a verdict now saves nothing and would turn a finished result into PRUNED
        if self.objective.promotion is not None:
            self._judge_rung(self.objective.promotion, result)
            return
        if not may_prune_at(self.objective.spec.pruner, result.epoch):
            return  # the pruner would answer "no" without looking: not worth its read of every trial
        # The pruner may read the trials Optuna cached for this trial, so success proves nothing.
        reachable, prune = self.objective.guard.attempt(
            f"decide on pruning trial {self.trial.number}", (self.curve_trial or self.trial).should_prune,
            reads_storage=False,
        )
        if reachable and prune:
            raise self._pruned_by_pruner(result)

    def _judge_rung(self, promotion: Promotion, result: EpochResult) -> None:
        """At a rung: train on when in its top, else pause (PRUNED, checkpoint kept) until promoted."""
        if result.epoch not in promotion.rungs:
            return
        trial = self.trial
        reachable, trials = self.objective.guard.attempt(
            f"rank trial {trial.number} at its rung", lambda: trial.study.get_trials(deepcopy=False)
        )
        if not reachable or trials is None or promotion.goes_on(trials, self.number, result.epoch):
            return  # in the top (or the storage away: train on, as when a pruner cannot be asked)
        place = f"not in the top 1/{promotion.reduction_factor} of the trials at epoch {result.epoch} yet"
        self.recorder.set(**{PAUSED_ATTR: result.epoch})
        raise self._pruned(f"paused at epoch {result.epoch}: {place}; resumed from its checkpoint if promoted")

    def _constrain(self, values: list[float]) -> None:
        """Record the constraint values: a user attr (queued), and on Optuna 5 the trial's own constraints."""
        self.recorder.set(**{CONSTRAINTS_ATTR: values})
        if not CONSTRAINTS_ON_TRIALS:
            return
        trial, names = self.trial, list(self.objective.spec.study.constraints)

        def send() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a write retried after an outage finds the first ones set
                for name, value in zip(names, values):
                    trial.set_constraint(name, value)

        self.objective.guard.call(f"record the constraints of trial {trial.number}", send)

    def _record_curve(self) -> None:
        """Multi-objective: the learning curve as the trial's user attr, for the dashboard and the report."""
        if self.curve_trial is not None:
            self.recorder.set(**{CURVE_ATTR: [score(e, self.metric) for e in self.history]})

    def _pruned_by_pruner(self, result: EpochResult) -> optuna.TrialPruned:
        value = score(result, self.metric)
        on_pruned = self.objective.on_pruned
        if on_pruned is not None:
            event = Pruned(
                epoch=result.epoch, value=value, best=score(best_epoch(self.history, self.metric), self.metric),
                metric=self.metric, pruner=self.objective.spec.pruner,
            )
            # Multi-objective: the note goes to the twin, in the study whose trials the pruner compared.
            pruned = self.curve_trial or self.trial
            self.objective.guard.call(f"note why trial {self.trial.number} was pruned", lambda: on_pruned(pruned, event))
        return self._pruned(f"pruned at epoch {result.epoch} with {self.metric} {value:.4f}")

    def _pruned(self, reason: str) -> optuna.TrialPruned:
        self.recorder.set(pruned_reason=reason, **self.progress())
        study = self.objective.spec.study
        if study.constraints:  # the samplers that read constraints look at pruned trials too
            self._constrain(constraint_values(study, self.measured()))
        self.recorder.flush(wait=True)
        return optuna.TrialPruned(reason)

    def _out_of_memory(self) -> TrialFailed:
        trial, guard = self.trial, self.objective.guard
        # Optuna >= 5 has constraints: the point is recorded as infeasible.
        if hasattr(trial, "set_constraint"):
            guard.call(f"record trial {trial.number}", lambda: trial.set_constraint("cuda_oom", 1.0))
        guard.call(f"record why trial {trial.number} failed", lambda: trial.set_user_attr("fail_reason", "cuda_oom"))
        return TrialFailed("cuda_oom")
