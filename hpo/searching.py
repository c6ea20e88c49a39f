"""Running a search: checks (settings, storage, data) → study → data on the device once → trials → the study.

:func:`search` is the Python entry point; ``python -m hpo.run`` is a shell over :func:`run_search`.
Every problem a user can fix raises an HpoError before anything is written to the storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.errors import UsageError
from hpo.outage import DEFAULT_PATIENCE_S
from hpo.spec import Overrides, StudySpec

if TYPE_CHECKING:  # imported lazily below: a bad setting should fail fast, before torch loads
    import optuna
    import torch

    from hpo.data import Dataset
    from hpo.objective import EpochListener, Objective
    from hpo.outage import StorageGuard

logger = logging.getLogger(__name__)

# SQLite lets one writer at a time; past this many local workers use PostgreSQL or MySQL.
SQLITE_MAX_WORKERS = 8

TrialCallback = Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]


class WorkersFailed(Exception):
    """Some launched worker processes exited with an error; ``exit_code`` is the highest of their codes."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"a worker process exited with code {exit_code}")
        self.exit_code = exit_code


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs; each field is the hpo.run flag of the same name, and errors name that flag."""

    n_trials: int  # the study's budget of finished (complete or pruned) trials
    storage: str | None = None  # SQLAlchemy URL; None: $HPO_STORAGE, else sqlite:///hpo.db
    timeout: float | None = None  # seconds after which no new trial starts
    checkpoint_dir: str | None = None  # None: beside the SQLite file, else ./hpo-checkpoints
    gpus: str | None = None  # "all" or "0,2,3": one worker process per GPU
    workers_per_gpu: int = 1
    heartbeat_interval: int = 10  # seconds
    grace_period: int | None = None  # seconds; None: 3 x heartbeat_interval
    storage_patience: float = DEFAULT_PATIENCE_S  # seconds
    worker_index: int | None = None  # set by the launcher for the processes it starts
    verbose: bool = False  # launched workers log every epoch


@dataclass(frozen=True)
class Listeners:
    """What a caller sees of a running search (in-process workers only; launched ones report through the launcher)."""

    # Called once the study is open and before any trial: (budget, finished trials so far).
    on_start: Callable[[int, int], None] | None = None
    on_epoch: EpochListener | None = None
    on_trial_end: Sequence[TrialCallback] = field(default_factory=tuple)
    show_launcher_progress: bool = False


@dataclass(frozen=True)
class SearchResult:
    study: optuna.Study
    storage_shown: str  # the URL with any password as ***
    ran: int  # trials this call added to the study
    exit_code: int  # 0, or the launcher's: the highest exit code of a failed worker


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


def worker_argv(
    spec: StudySpec, overrides: Overrides, settings: SearchSettings, checkpoint_dir: Path, grace_period: int
) -> list[str]:
    """The hpo.run arguments each launched worker gets (storage travels in HPO_STORAGE instead)."""
    argv = ["--study", str(spec.path.resolve()), "--n-trials", str(settings.n_trials), "--study-name", spec.study.name]
    argv += ["--checkpoint-dir", str(checkpoint_dir.resolve()), "--heartbeat-interval", str(settings.heartbeat_interval)]
    for flag, value in (
        ("--timeout", settings.timeout), ("--data-dir", overrides.data_dir), ("--seed", overrides.seed),
        ("--max-epochs", overrides.max_epochs), ("--grace-period", settings.grace_period),
        ("--storage-patience", settings.storage_patience),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if settings.verbose:
        argv.append("--verbose")
    return argv


def _grace_period(settings: SearchSettings) -> int:
    grace_period = settings.grace_period if settings.grace_period is not None else 3 * settings.heartbeat_interval
    if grace_period <= settings.heartbeat_interval:
        # A live worker beats every interval: a grace period that short would reap its trial under it.
        raise UsageError(
            f"argument --grace-period: must be above --heartbeat-interval ({settings.heartbeat_interval} s), "
            f"got {grace_period}"
        )
    return grace_period


def _launch_plan(overrides: Overrides, settings: SearchSettings, storage_url: str) -> tuple[str, ...] | None:
    """The GPUs to start workers on (() for CPU workers), or None to run in this process."""
    from hpo.study import sqlite_path

    launching = settings.gpus is not None or settings.workers_per_gpu > 1
    if not launching:
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


def run_search(
    file_spec: StudySpec, overrides: Overrides, settings: SearchSettings, listeners: Listeners = Listeners()
) -> SearchResult:
    """Run (or resume) the study until it holds ``settings.n_trials`` finished trials, here or in launched workers."""
    # Checks first, cheapest first, so that bad input never leaves anything in the storage.
    from hpo.device import resolve_device
    from hpo.folders import writable_folder
    from hpo.study import check_storage, count_finished, default_checkpoint_dir, open_storage, open_study, redact, resolve_storage

    spec = overrides.apply(file_spec)
    grace_period = _grace_period(settings)
    storage_url, storage_source = resolve_storage(settings.storage)
    check_storage(storage_url, storage_source)
    gpus = _launch_plan(overrides, settings, storage_url)
    device = None
    if gpus is None:
        device = resolve_device(spec.train.device, "--device" if overrides.device else f"{spec.path}: [train] device")

    from hpo.data import load_dataset

    dataset = load_dataset(spec.data)  # launching: decodes and caches once, before the workers start
    checkpoint_dir = Path(settings.checkpoint_dir) if settings.checkpoint_dir else default_checkpoint_dir(storage_url)
    writable_folder(checkpoint_dir, "--checkpoint-dir" if settings.checkpoint_dir else "default checkpoint folder")
    storage = open_storage(
        storage_url, storage_source, heartbeat_interval=settings.heartbeat_interval, grace_period=grace_period
    )
    study = open_study(spec, storage, worker_index=settings.worker_index or 0)
    storage_shown = redact(storage_url)
    done = count_finished(study)
    if done >= settings.n_trials:
        logger.info("the study already has %d finished trials (budget %d): nothing to run", done, settings.n_trials)
        return SearchResult(study=study, storage_shown=storage_shown, ran=0, exit_code=0)
    before = len(study.trials)
    code = 0
    if gpus is not None:
        del dataset  # the workers load it from the cache; the launcher need not hold it
        code = _launch(
            spec, overrides, settings, gpus=gpus, storage_url=storage_url, study=study, checkpoint_dir=checkpoint_dir,
            grace_period=grace_period, show_progress=listeners.show_launcher_progress,
        )
    else:
        from hpo.outage import StorageGuard
        from hpo.worker import run_worker

        assert device is not None
        guard = StorageGuard(shown=storage_shown, patience=settings.storage_patience)
        objective = _objective(spec, settings, dataset, device=device, checkpoint_dir=checkpoint_dir, guard=guard, listeners=listeners)
        logger.info(
            "running up to %d more trials on %s (budget %d, %d finished)", settings.n_trials - done, device, settings.n_trials, done
        )
        if listeners.on_start is not None:
            listeners.on_start(settings.n_trials, done)
        run_worker(
            study, objective, storage=storage, guard=guard, budget=settings.n_trials, timeout=settings.timeout,
            heartbeat_interval=settings.heartbeat_interval, grace_period=grace_period,
            callbacks=[objective.on_trial_end, *listeners.on_trial_end],
        )
    return SearchResult(study=study, storage_shown=storage_shown, ran=len(study.trials) - before, exit_code=code)


def _launch(
    spec: StudySpec, overrides: Overrides, settings: SearchSettings, *, gpus: tuple[str, ...], storage_url: str,
    study: optuna.Study, checkpoint_dir: Path, grace_period: int, show_progress: bool,
) -> int:
    """Start the worker processes and wait for them; the launcher's exit code."""
    from hpo.launcher import launch, plan_workers

    plan = plan_workers(
        gpus=gpus, per_gpu=settings.workers_per_gpu,
        common_argv=worker_argv(spec, overrides, settings, checkpoint_dir, grace_period),
    )
    return launch(plan, storage_url=storage_url, study=study, budget=settings.n_trials, show_progress=show_progress)


def _objective(
    spec: StudySpec, settings: SearchSettings, dataset: Dataset, *, device: torch.device, checkpoint_dir: Path,
    guard: StorageGuard, listeners: Listeners,
) -> Objective:
    """The objective of this process's trials, holding the search data on ``device`` for all of them."""
    from hpo.data import carve_validation
    from hpo.notes import write_pruning_note
    from hpo.objective import Objective

    search_data = carve_validation(dataset, spec.data)
    logger.info(
        "%s: %d training and %d validation images of %s (test set held out), %d classes",
        spec.study.name, len(search_data.train), len(search_data.val), dataset.source, search_data.num_classes,
    )
    return Objective(
        spec=spec, data=search_data.to(device), device=device, checkpoint_dir=checkpoint_dir, guard=guard,
        budget=settings.n_trials, on_epoch=listeners.on_epoch, on_pruned=write_pruning_note,
    )


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
    on_epoch: EpochListener | None = None,
) -> optuna.Study:
    """Run or resume the search that study file ``study`` (a name in studies/ or a path) describes.

    The keyword arguments are hpo.run's flags of the same names.  Returns the ``optuna.Study``
    once it holds ``n_trials`` finished trials (or ``timeout`` passed); raises an HpoError for a
    problem with the input (before anything is written), StorageUnavailable when the storage stays
    away for longer than ``storage_patience`` seconds, and WorkersFailed when a launched worker failed.
    ``on_epoch(trial_number, epoch_result)`` sees every epoch of every trial run in this process.
    """
    from hpo.spec import find_study, load_spec

    if n_trials < 1:
        raise UsageError(f"argument --n-trials: must be a positive integer, got {n_trials!r}")
    overrides = Overrides(study_name=study_name, seed=seed, data_dir=data_dir, device=device, max_epochs=max_epochs)
    settings = SearchSettings(
        n_trials=n_trials, storage=storage, timeout=timeout, checkpoint_dir=checkpoint_dir, gpus=gpus,
        workers_per_gpu=workers_per_gpu, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        storage_patience=storage_patience,
    )
    result = run_search(load_spec(find_study(str(study))), overrides, settings, Listeners(on_epoch=on_epoch))
    if result.exit_code != 0:
        raise WorkersFailed(result.exit_code)
    return result.study
