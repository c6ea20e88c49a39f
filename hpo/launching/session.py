"""A search session: checks → study → data on the device once → trials here, or in launched workers → the study.

:func:`search` is the Python entry point; ``python -m hpo.run`` is a shell over :func:`run_search`.
Every problem a user can fix raises an HpoError before anything is written to the storage.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.errors import UsageError
from hpo.launching.run_args import DEFAULT_STALL_S, RunRequest, SearchSettings, worker_argv
from hpo.studyfile.spec import Overrides, StudySpec, find_study, load_spec
from hpo.tuning.outage import DEFAULT_PATIENCE_S

if TYPE_CHECKING:  # imported lazily below: a bad setting should fail fast, before torch loads
    import optuna
    import torch

    from hpo.training.arrays import ArrayData
    from hpo.training.memory import Placement
    from hpo.training.splits import Dataset
    from hpo.tuning.artifacts import Artifacts
    from hpo.tuning.heartbeat import ProgressClock
    from hpo.tuning.objective import EpochListener, Objective
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.worker import TrialCallback

logger = logging.getLogger(__name__)

# SQLite lets one writer at a time; past this many local workers use PostgreSQL or MySQL.
SQLITE_MAX_WORKERS = 8


class WorkersFailed(Exception):
    """Some launched worker processes exited with an error; ``exit_code`` is the highest of their codes."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"a worker process exited with code {exit_code}")
        self.exit_code = exit_code


@dataclass(frozen=True)
class Listeners:
    """What a caller sees of a running search (in-process workers only; launched ones report through the launcher)."""

    # Called once the study is open and before any trial: (the study file with its overrides, budget, finished so far).
    on_start: Callable[[StudySpec, int, int], None] | None = None
    on_epoch: EpochListener | None = None
    on_trial_end: Sequence[TrialCallback] = field(default_factory=tuple)
    show_launcher_progress: bool = False


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    spec: StudySpec  # the study file with the request's overrides applied
    storage_shown: str  # the URL with any password as ***
    ran: int  # trials this call added to the study
    exit_code: int  # 0, or the launcher's: the highest exit code of a failed worker


@dataclass(frozen=True)
class _Checked:
    """What the checks found, before anything is written: where, on what, with which data."""

    spec: StudySpec
    grace_period: int  # seconds
    storage_url: str
    storage_source: str
    gpus: tuple[str, ...] | None  # GPUs to start workers on (() for CPU workers); None: train in this process
    device: torch.device | None  # this process's device, when it trains itself
    dataset: Dataset | None  # None when workers are launched: they read the decode cache
    checkpoint_dir: Path
    artifacts: Artifacts | None = None  # where finished trials' checkpoints are uploaded (--upload-checkpoints)
    trackers: Sequence[TrialCallback] = ()  # the experiment trackers [tracking] switches on


def parse_gpus(text: str, available: int) -> tuple[str, ...]:
    """``--gpus all`` or ``--gpus 0,2,3`` → GPU ids; () means CPU workers (all, on a machine without GPUs)."""
    if text == "all":
        return tuple(str(i) for i in range(available))
    ids = text.split(",")
    if not all(i.strip().isdigit() for i in ids):
        raise UsageError(f"argument --gpus: must be 'all' or a list like 0,2,3, got {text!r}")
    missing = [i.strip() for i in ids if int(i) >= available]
    if missing:
        raise UsageError(f"argument --gpus: GPU {missing[0]} does not exist here ({available} GPUs), got {text!r}")
    return tuple(dict.fromkeys(i.strip() for i in ids))


def _launch_plan(overrides: Overrides, settings: SearchSettings, storage_url: str) -> tuple[str, ...] | None:
    """The GPUs to start workers on (() for CPU workers), or None to run in this process."""
    from hpo.tuning.storage import sqlite_path

    if not settings.launching:
        return None
    if settings.worker_index is not None:
        raise UsageError("argument --gpus/--workers-per-gpu: not allowed together with --worker-index")
    if overrides.device is not None:
        raise UsageError("argument --device: not allowed with --gpus/--workers-per-gpu (each worker gets its own)")
    import torch

    gpus = parse_gpus(settings.gpus or "all", torch.cuda.device_count())
    workers = max(1, len(gpus)) * settings.workers_per_gpu
    if sqlite_path(storage_url) is not None and workers > SQLITE_MAX_WORKERS:
        raise UsageError(
            f"argument --workers-per-gpu: {workers} workers on SQLite; at most {SQLITE_MAX_WORKERS} "
            "(use a PostgreSQL or MySQL --storage for more)"
        )
    return gpus


def _check_in_python(request: RunRequest, file_spec: StudySpec | None, data: ArrayData | None) -> None:
    """What only Python callers can get wrong: a spec or arrays in memory that launched workers would never see."""
    if data is not None:
        from hpo.training.arrays import ArrayData

        if not isinstance(data, ArrayData):
            raise UsageError(f"argument data: must be an hpo.ArrayData, got {type(data).__name__}")
    if request.settings.launching:
        # Launched workers read the study file and its dataset themselves.
        if file_spec is not None:
            raise UsageError("argument --gpus/--workers-per-gpu: not allowed with a study spec given in Python")
        if data is not None:
            raise UsageError(
                "argument data: not allowed with gpus/workers_per_gpu: launched workers read the study file's "
                "[data] dataset, not arrays in this process (save them as an image folder and give data_dir)"
            )
    if data is not None and request.overrides.data_dir is not None:
        raise UsageError("argument data_dir: not allowed with data (the arrays replace the study file's dataset)")


def _placement(gpus: tuple[str, ...] | None, device: torch.device | None, settings: SearchSettings) -> Placement:
    """Where the data will be held: by this process on its device, or by every launched worker on its GPU."""
    import torch

    from hpo.training.memory import Placement

    if gpus is None:
        assert device is not None
        return Placement(devices=(device,))
    devices = tuple(torch.device("cuda", int(i)) for i in gpus)
    per_device = settings.workers_per_gpu
    return Placement(devices=devices, processes=max(1, len(gpus)) * per_device, per_device=per_device)


def _load(spec: StudySpec, data: ArrayData | None, placement: Placement) -> Dataset:
    """The arrays given in Python, else the study file's dataset (launching: decoded and cached once, before the workers start)."""
    from hpo.training.recipe import model_image_size

    size = model_image_size(spec)
    if data is not None:
        from hpo.training.arrays import array_dataset

        return array_dataset(data, spec.data, placement=placement, default_image_size=size)
    from hpo.training.datasets import load_dataset

    return load_dataset(spec.data, placement=placement, default_image_size=size)


def _check(request: RunRequest, file_spec: StudySpec | None, data: ArrayData | None = None) -> _Checked:
    """Every check, cheapest first, so that bad input never leaves anything in the storage."""
    from hpo.folders import writable_folder
    from hpo.training.device import resolve_device
    from hpo.training.recipe import prepare_model
    from hpo.tuning.artifacts import checkpoint_artifacts
    from hpo.tuning.storage import check_storage, default_checkpoint_dir, resolve_storage
    from hpo.tuning.trackers import tracker_callbacks

    overrides, settings = request.overrides, request.settings
    _check_in_python(request, file_spec, data)
    spec = overrides.apply(file_spec if file_spec is not None else load_spec(find_study(request.study)))
    grace_period = settings.effective_grace_period()
    storage_url, storage_source = resolve_storage(settings.storage)
    # A server still starting (a pod beside its database) is waited for, as an outage is.
    check_storage(storage_url, storage_source, patience=settings.storage_patience)
    artifacts = checkpoint_artifacts(settings.artifacts, settings.upload_checkpoints, storage_url)
    trackers = tracker_callbacks(spec)
    gpus = _launch_plan(overrides, settings, storage_url)
    device = None
    if gpus is None:
        device = resolve_device(spec.train.device, "--device" if overrides.device else f"{spec.path}: [train] device")
    # A pretrained model's weights are fetched once here, and its data normalized as they expect.
    dataset = prepare_model(spec, _load(spec, data, _placement(gpus, device, settings)))
    checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else default_checkpoint_dir(storage_url)
    writable_folder(checkpoint_dir, "--checkpoint-dir" if settings.checkpoint_dir else "default checkpoint folder")
    return _Checked(
        spec=spec, grace_period=grace_period, storage_url=storage_url, storage_source=storage_source, gpus=gpus,
        device=device, dataset=None if gpus is not None else dataset, checkpoint_dir=checkpoint_dir,
        artifacts=artifacts, trackers=trackers,
    )


def run_search(
    request: RunRequest, listeners: Listeners = Listeners(), *, spec: StudySpec | None = None,
    data: ArrayData | None = None,
) -> SearchResult:
    """Run (or resume) the study until it holds ``n_trials`` finished trials, here or in launched workers.

    ``spec``: the study file already read (and perhaps changed in code, as bench/search.py does)
    instead of reading ``request.study``; ``data``: images in memory instead of the study file's
    dataset (recorded in the study, so that hpo.retrain asks for them again).  Both: in-process trials only.
    """
    from hpo.tuning.storage import open_storage, redact
    from hpo.tuning.study import count_finished, open_study

    checked = _check(request, spec, data)
    settings = request.settings
    storage = open_storage(
        checked.storage_url, checked.storage_source, heartbeat_interval=settings.heartbeat_interval,
        grace_period=checked.grace_period,
    )
    study = open_study(
        checked.spec, storage, worker_index=settings.worker_index or 0, overrides=request.overrides,
        accept_changed=settings.accept_changed_overrides,
    )
    if data is not None:
        from hpo.training.arrays import ARRAY_DATA_ATTR, array_summary

        assert checked.dataset is not None
        study.set_user_attr(ARRAY_DATA_ATTR, array_summary(checked.dataset))
    storage_shown = redact(checked.storage_url)
    done = count_finished(study)
    before = len(study.trials)
    code = 0
    if done >= settings.n_trials:
        logger.info("the study already has %d finished trials (budget %d): nothing to run", done, settings.n_trials)
    elif checked.gpus is not None:
        code = _launch(request, checked, study, show_progress=listeners.show_launcher_progress)
    else:
        _run_here(request, checked, study, storage, done=done, listeners=listeners, storage_shown=storage_shown)
    return SearchResult(
        study=study, spec=checked.spec, storage_shown=storage_shown, ran=len(study.trials) - before, exit_code=code
    )


def _launch(request: RunRequest, checked: _Checked, study: optuna.Study, *, show_progress: bool) -> int:
    """Start the worker processes and wait for them; the launcher's exit code."""
    from hpo.launching.local import launch, plan_workers

    assert checked.gpus is not None
    argv = functools.partial(
        worker_argv, request, study_path=checked.spec.path, checkpoint_dir=checked.checkpoint_dir
    )
    plan = plan_workers(gpus=checked.gpus, per_gpu=request.settings.workers_per_gpu, argv=argv)
    return launch(
        plan, storage_url=checked.storage_url, study=study, budget=request.settings.n_trials, show_progress=show_progress
    )


def _run_here(
    request: RunRequest, checked: _Checked, study: optuna.Study, storage: optuna.storages.RDBStorage, *, done: int,
    listeners: Listeners, storage_shown: str,
) -> None:
    """Train trials in this process until the budget is met."""
    from hpo.tuning.heartbeat import ProgressClock
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.worker import run_worker

    settings = request.settings
    assert checked.device is not None and checked.dataset is not None
    guard = StorageGuard(shown=storage_shown, patience=settings.storage_patience)
    clock = ProgressClock()
    objective = _objective(checked, settings, guard=guard, listeners=listeners, clock=clock)
    if checked.artifacts is not None:
        objective.on_final_checkpoint = checked.artifacts.keep_checkpoint
    logger.info(
        "running up to %d more trials on %s (budget %d, %d finished)",
        settings.n_trials - done, checked.device, settings.n_trials, done,
    )
    if listeners.on_start is not None:
        listeners.on_start(checked.spec, settings.n_trials, done)
    run_worker(
        study, objective, storage=storage, guard=guard, budget=settings.n_trials, timeout=settings.timeout,
        heartbeat_interval=settings.heartbeat_interval, grace_period=checked.grace_period,
        callbacks=[objective.on_trial_end, *checked.trackers, *listeners.on_trial_end], clock=clock,
        stall_timeout=settings.stall_timeout, facts=objective.worker_facts(), promotion=objective.promotion,
    )
    dropped = guard.call("look for paused trials left", lambda: objective.drop_paused_checkpoints(study, settings.n_trials))
    if dropped:
        logger.info("budget met: deleted the checkpoints of %d trials left paused at a rung", dropped)


def _objective(
    checked: _Checked, settings: SearchSettings, *, guard: StorageGuard, listeners: Listeners, clock: ProgressClock
) -> Objective:
    """The objective of this process's trials, holding the search data on the device for all of them."""
    from hpo.training.splits import carve_validation
    from hpo.tuning.notes import write_pruning_note
    from hpo.tuning.objective import Objective

    spec, dataset, device = checked.spec, checked.dataset, checked.device
    assert dataset is not None and device is not None
    search_data = carve_validation(dataset, spec.data)
    logger.info(
        "%s: %d training and %d validation images of %s (test set held out), %d classes",
        spec.study.name, len(search_data.train), len(search_data.val), dataset.source, search_data.num_classes,
    )
    return Objective(
        spec=spec, data=search_data.to(device), device=device, checkpoint_dir=checked.checkpoint_dir, guard=guard,
        budget=settings.n_trials, on_epoch=listeners.on_epoch, on_pruned=write_pruning_note, on_progress=clock.touch,
        takeover_after=max(1.0, checked.grace_period - settings.heartbeat_interval),
        silent_for=lambda: max(guard.down_for(), clock.silence()),
    )


def _with_model(study: str | Path, model: Callable[..., torch.nn.Module]) -> StudySpec:
    """The study file, training ``model`` (a builder passed from Python) instead of its [model] name."""
    from hpo.studyfile.spec import with_model
    from hpo.training.user_models import reference

    return with_model(load_spec(find_study(str(study))), reference(model))


def search(
    study: str | Path,
    *,
    n_trials: int,
    storage: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    study_name: str | None = None,
    max_epochs: int | None = None,
    timeout: float | None = None,
    checkpoint_dir: str | None = None,
    gpus: str | None = None,
    workers_per_gpu: int = 1,
    heartbeat_interval: int = 10,
    grace_period: int | None = None,
    storage_patience: float = DEFAULT_PATIENCE_S,
    stall_timeout: float = DEFAULT_STALL_S, accept_changed_overrides: bool = False,
    on_epoch: EpochListener | None = None,
    model: Callable[..., torch.nn.Module] | None = None,
    data: ArrayData | None = None,
) -> optuna.Study:
    """Run or resume the search that study file ``study`` (a name in studies/ or a path) describes.

    The keyword arguments are hpo.run's flags of the same names.  Returns the ``optuna.Study``
    once it holds ``n_trials`` finished trials (or ``timeout`` passed); raises an HpoError for a
    problem with the input (before anything is written), StorageUnavailable when the storage stays
    away for longer than ``storage_patience`` seconds, and WorkersFailed when a launched worker failed.
    ``on_epoch(trial_number, epoch_result)`` sees every epoch of every trial run in this process.
    ``model``: your own builder, ``build(in_channels, num_classes, image_size, **params) -> nn.Module``,
    instead of the study file's ``[model] name`` (its ``[model.space]`` still gives the params); trials
    run in this process.  ``data``: an :class:`hpo.ArrayData` of images in memory, trained on instead of the
    study file's ``[data] dataset`` (in this process only: not with ``gpus`` or ``workers_per_gpu``).
    """
    if n_trials < 1:
        raise UsageError(f"argument --n-trials: must be a positive integer, got {n_trials!r}")
    request = RunRequest(
        study=str(study),
        overrides=Overrides(study_name=study_name, seed=seed, data_dir=data_dir, device=device, max_epochs=max_epochs),
        settings=SearchSettings(
            n_trials=n_trials, storage=storage, timeout=timeout, checkpoint_dir=checkpoint_dir, gpus=gpus,
            workers_per_gpu=workers_per_gpu, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            storage_patience=storage_patience, stall_timeout=stall_timeout, accept_changed_overrides=accept_changed_overrides,
        ),
    )
    spec = None if model is None else _with_model(study, model)
    result = run_search(request, Listeners(on_epoch=on_epoch), spec=spec, data=data)
    if result.exit_code != 0:
        raise WorkersFailed(result.exit_code)
    return result.study
