"""Storage URL → Optuna storage; study file → sampler, pruner and the study itself."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import sqlite3
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from hpo.errors import StorageError
from hpo.space import grid
from hpo.spec import (
    CmaEsSamplerSpec,
    GpSamplerSpec,
    GridSamplerSpec,
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    NopPrunerSpec,
    PatientPrunerSpec,
    PercentilePrunerSpec,
    QmcSamplerSpec,
    RandomSamplerSpec,
    StudySpec,
    SuccessiveHalvingPrunerSpec,
    ThresholdPrunerSpec,
    TpeSamplerSpec,
)

logger = logging.getLogger(__name__)

# One file holds many studies, which is what optuna-dashboard expects to be pointed at.
DEFAULT_STORAGE = "sqlite:///hpo.db"
# Seconds a client waits for a database connection before giving up with a clear error.
CONNECT_TIMEOUT_S = 10
# Trials finished for the budget: a pruned trial is a finished search decision too.
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Times a trial whose worker died is re-queued before it is given up.
MAX_RETRY = 3


def resolve_storage(flag: str | None) -> tuple[str, str]:
    """(url, where it came from): ``--storage``, else ``$HPO_STORAGE``, else the SQLite default."""
    if flag:
        return flag, "--storage"
    if os.environ.get("HPO_STORAGE"):
        return os.environ["HPO_STORAGE"], "HPO_STORAGE"
    return DEFAULT_STORAGE, "default storage"


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "<unparseable URL>"


def _parse(url: str, source: str) -> URL:
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise StorageError(f"{source}: cannot parse storage URL {url!r} (expected e.g. sqlite:///hpo.db)") from exc
    try:
        parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError as exc:
        raise StorageError(f"{source}: unknown database in storage URL {redact(url)!r}") from exc
    except ImportError as exc:
        raise StorageError(f"{source}: the driver for {redact(url)!r} is not installed ({exc.name})") from exc
    return parsed


def engine_kwargs(url: URL) -> dict[str, Any]:
    """Engine settings per backend: a long busy timeout for SQLite, checked and recycled pools elsewhere."""
    if url.get_backend_name() == "sqlite":
        # Seconds a writer waits for a lock instead of failing with "database is locked".
        return {"connect_args": {"timeout": 60}}
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a connection dropped while idle is replaced, not used
        "pool_recycle": 300,  # seconds; below the usual server and proxy idle timeouts
        "pool_size": 2,  # one worker process uses one connection at a time
        "max_overflow": 2,
    }
    driver = url.get_driver_name()
    if driver in ("psycopg2", "pymysql", "mysqldb"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def check_storage(url: str, source: str) -> None:
    """Fail early, writing nothing, if the URL is malformed or its database can't be reached."""
    parsed = _parse(url, source)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).expanduser().resolve().parent.is_dir():
            raise StorageError(f"{source}: folder of SQLite file {database!r} does not exist")
        return
    engine = sqlalchemy.create_engine(parsed, **engine_kwargs(parsed))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()
        raise StorageError(
            f"{source}: cannot connect to {redact(url)}: {reason[0] if reason else type(exc).__name__}"
        ) from exc
    finally:
        engine.dispose()


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


# Optuna >= 4.9 names the callback RetryHeartbeatStaleTrialCallback; older versions RetryFailedTrialCallback.
_NEW_RETRY = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")


def retry_callback() -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Re-queues a failed trial: same params, its intermediate values inherited, MAX_RETRY times at most."""
    cls = optuna.storages.RetryHeartbeatStaleTrialCallback if _NEW_RETRY else optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=MAX_RETRY, inherit_intermediate_values=True)


def open_storage(
    url: str, source: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with our engine settings and, given an interval, heartbeats.

    With heartbeats, a trial whose worker stops beating for ``grace_period`` seconds is marked FAIL
    and re-queued (up to MAX_RETRY times) with its intermediate values.
    """
    parsed = _parse(url, source)
    path = sqlite_path(url)
    if path is not None:
        # Write-ahead logging: readers never block the writer, so local workers rarely wait on a
        # lock. The mode is stored in the file, so setting it once per open is enough.
        connection = sqlite3.connect(path, timeout=60)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period if grace_period is not None else 3 * heartbeat_interval,
            ("heartbeat_stale_trial_callback" if _NEW_RETRY else "failed_trial_callback"): retry_callback(),
        }
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(parsed), **heartbeat)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(f"{source}: cannot open {redact(url)}: {str(exc).splitlines()[0]}") from exc


class Reaper(threading.Thread):
    """Marks trials of dead workers FAIL (and so re-queues them) every ``interval`` seconds.

    Optuna reaps stale trials only when a worker starts a new trial; this thread does it even
    while every live worker is busy with a long trial.
    """

    def __init__(self, *, study: optuna.Study, interval: float) -> None:
        super().__init__(name="hpo-reaper", daemon=True)
        self.study = study
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                optuna.storages.fail_stale_trials(self.study)
            except Exception:  # a dropped connection must not kill the thread; next round retries
                logger.warning("reaping stale trials failed; retrying in %.0f s", self.interval, exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()


# Each spec dataclass's fields are its Optuna class's keyword arguments, named the same.
_SAMPLER_CLASSES: dict[type, type[optuna.samplers.BaseSampler]] = {
    TpeSamplerSpec: optuna.samplers.TPESampler,
    RandomSamplerSpec: optuna.samplers.RandomSampler,
    GridSamplerSpec: optuna.samplers.GridSampler,
    CmaEsSamplerSpec: optuna.samplers.CmaEsSampler,
    GpSamplerSpec: optuna.samplers.GPSampler,
    QmcSamplerSpec: optuna.samplers.QMCSampler,
}
_PRUNER_CLASSES: dict[type, type[optuna.pruners.BasePruner]] = {
    MedianPrunerSpec: optuna.pruners.MedianPruner,
    PercentilePrunerSpec: optuna.pruners.PercentilePruner,
    SuccessiveHalvingPrunerSpec: optuna.pruners.SuccessiveHalvingPruner,
    HyperbandPrunerSpec: optuna.pruners.HyperbandPruner,
    PatientPrunerSpec: optuna.pruners.PatientPruner,
    ThresholdPrunerSpec: optuna.pruners.ThresholdPruner,
    NopPrunerSpec: optuna.pruners.NopPruner,
}


def create_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    options: dict[str, Any] = dataclasses.asdict(spec.sampler)
    if isinstance(spec.sampler, GridSamplerSpec):
        # Stops the study by itself once every grid point has been tried.
        options["search_space"] = grid(spec.space)
    return _SAMPLER_CLASSES[type(spec.sampler)](**options, seed=seed)


def create_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    pruner = spec.pruner
    options: dict[str, Any] = dataclasses.asdict(pruner)
    if isinstance(pruner, SuccessiveHalvingPrunerSpec) and pruner.min_resource is None:
        options["min_resource"] = "auto"  # estimated from the first finished trial
    if isinstance(pruner, HyperbandPrunerSpec) and pruner.max_resource is None:
        options["max_resource"] = spec.train.max_epochs
    if isinstance(pruner, PatientPrunerSpec):
        options["wrapped_pruner"] = None  # patience alone decides
    return _PRUNER_CLASSES[type(pruner)](**options)


def _existing(storage: optuna.storages.BaseStorage, name: str) -> optuna.study.StudySummary | None:
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return summary
    return None


def sampler_seed(study_seed: int, *, worker_index: int, trials_so_far: int) -> int:
    """This process's sampler seed: reproducible, yet different for every worker, host and resumed run.

    With one seed for all, a resumed run or a second machine would propose the very same points
    again (the random sampler, and TPE's random start-up trials).  Trials' own training seeds do
    not depend on this; they come from the study seed and the trial number.
    """
    key = f"{study_seed}|{worker_index}|{trials_so_far}|{socket.gethostname()}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def check_existing_storage(url: str, source: str) -> None:
    """Like check_storage, and a SQLite file must exist: readers never create an empty database."""
    check_storage(url, source)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StorageError(f"{source}: no SQLite file '{path}' here (run python -m hpo.run first, or give --storage)")


def load_existing_study(url: str, source: str, name: str, *, flag: str) -> optuna.Study:
    """The study of that name, for reading results; never creates a database or a study."""
    check_existing_storage(url, source)
    storage = open_storage(url, source)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise StorageError(
            f"{flag}: no study {name!r} in {redact(url)} (studies there: {', '.join(sorted(names)) or 'none'})"
        )
    return optuna.load_study(study_name=name, storage=storage)


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, *, worker_index: int = 0) -> optuna.Study:
    """Create the study, or resume it when one of that name already exists."""
    direction = spec.study.direction
    assert direction is not None
    found = _existing(storage, spec.study.name)
    if found is not None and found.direction.name.lower() != direction:
        raise StorageError(
            f"{spec.path}: [study] study {spec.study.name!r} already exists with direction "
            f"{found.direction.name.lower()!r}, not {direction!r}; choose another name (--study-name)"
        )
    seed = sampler_seed(
        spec.study.seed, worker_index=worker_index, trials_so_far=0 if found is None else found.n_trials
    )
    study = optuna.create_study(
        storage=storage,
        study_name=spec.study.name,
        direction=direction,
        sampler=create_sampler(spec, seed),
        pruner=create_pruner(spec),
        load_if_exists=True,
    )
    study.set_metric_names([spec.study.metric])
    return study


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def default_checkpoint_dir(url: str) -> Path:
    """Beside a SQLite file (``hpo.db`` → ``hpo-checkpoints/``), else ``./hpo-checkpoints``."""
    path = sqlite_path(url)
    if path is not None:
        return path.with_name(f"{path.stem}-checkpoints")
    return Path("hpo-checkpoints")
