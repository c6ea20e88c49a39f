"""How the study storage holds up as workers multiply, and as the study grows.

M simulated workers are processes running hpo's real worker loop (``hpo.tuning.worker.run_worker``) with hpo's
real ``Objective`` (suggest, user attrs, report, should_prune, the budget check) around a stand-in for
``hpo.training.fit.fit`` that sleeps ``--epoch-seconds`` per epoch instead of training. Each worker times the
calls its main thread makes into Optuna's RDB storage, per trial; heartbeats run in their own thread and
are not counted there.

Mode ``workers`` prints, per backend and M: finished trials per second, storage time per trial (p50, p99),
hpo's time per trial outside the stand-in training (mean), the most database connections the server
showed for the bench database while the workers ran, and errors (workers that died, trials that failed
other than as a budget surplus).

Mode ``growth`` fills a study with 0, 1k, 10k finished trials (``study.add_trials``) and then times one
worker's trials on it: storage time and time outside training per trial as the study grows.

    python bench/storage.py workers --backends sqlite postgresql mariadb --workers 1 8 32
    python bench/storage.py growth --backends sqlite postgresql mariadb --sizes 0 1000 10000

Server URLs come from --postgres-url / --mysql-url (default: HPO_TEST_POSTGRES_URL / HPO_TEST_MYSQL_URL);
the bench creates its own database ``hpo_bench`` on each server and drops its studies after each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hpo.tuning.objective  # noqa: E402
from hpo.studyfile.samplers import MedianPrunerSpec, RandomSamplerSpec  # noqa: E402
from hpo.studyfile.spec import StudySpec, find_study, load_spec  # noqa: E402
from hpo.training.config import EpochResult  # noqa: E402
from hpo.tuning.objective import Objective  # noqa: E402
from hpo.tuning.outage import StorageGuard  # noqa: E402
from hpo.tuning.storage import open_storage  # noqa: E402
from hpo.tuning.study import open_study  # noqa: E402
from hpo.tuning.worker import run_worker  # noqa: E402

BENCH_DATABASE = "hpo_bench"
# --profile: print worker 0's storage calls per trial, by method.
PROFILE = False
# Seconds between samples of the server's connection count.
CONNECTION_POLL_S = 0.2


@dataclass(frozen=True)
class TrialTiming:
    storage_s: float  # main-thread time inside storage calls during this trial's loop iteration
    outside_s: float  # wall time of the iteration minus the stand-in training's sleep
    epoch_end_s: float = 0.0  # of outside_s, the time in the per-epoch callback (report, should_prune, flush)
    epochs: int = 0  # epochs this run of the trial trained


@dataclass(frozen=True)
class WorkerReport:
    timings: tuple[TrialTiming, ...]
    error: str | None
    calls: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # storage method -> [calls, seconds]
    join_s: float = math.nan  # from opening the storage to the first trial's training, less the wait for "go"


@dataclass(frozen=True)
class Row:
    backend: str
    workers: int
    trials_per_s: float
    storage_p50_ms: float
    storage_p99_ms: float
    outside_mean_ms: float
    connections: int | None
    errors: int
    surplus: int
    calls_per_trial: float  # worker 0's storage calls per trial (main thread, outermost)
    # Time outside training split into per-trial and per-epoch parts, each worker's first trial (its join) left out:
    per_trial_ms: float = math.nan  # mean per trial, less the per-epoch callbacks
    per_epoch_ms: float = math.nan  # mean per epoch trained, in the per-epoch callback
    epochs_per_trial: float = math.nan  # epochs trained per trial in this run
    join_s: float = math.nan  # the slowest worker's join (WorkerReport.join_s)


def bench_spec(*, epochs: int) -> StudySpec:
    """The quick study's space, model and median pruner, with a random sampler (the sampler's own cost is Optuna's)."""
    spec = load_spec(find_study("quick"))
    return dataclasses.replace(
        spec,
        sampler=RandomSamplerSpec(),
        pruner=MedianPrunerSpec(n_startup_trials=4, n_warmup_steps=1),
        train=dataclasses.replace(spec.train, max_epochs=epochs, device="cpu"),
    )


class EpochClock:
    """When each training started, and the seconds and epochs inside the per-epoch callback since the last take."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.seconds = 0.0
        self.epochs = 0

    def take(self) -> tuple[float, int]:
        taken = (self.seconds, self.epochs)
        self.seconds, self.epochs = 0.0, 0
        return taken


def _stand_in_fit(epoch_seconds: float, clock: EpochClock) -> Callable[..., None]:
    """hpo.training.fit.fit's signature and callbacks, with a sleep for each epoch's training."""

    def fit(model: Any, data: Any, config: Any, on_epoch_end: Callable[[EpochResult], None], **kwargs: Any) -> None:
        clock.started.append(time.perf_counter())
        rng = random.Random(config.seed)
        start = 0 if kwargs.get("resume") is None else kwargs["resume"].epoch
        for epoch in range(start + 1, config.max_epochs + 1):
            time.sleep(epoch_seconds)
            loss = 2.0 / epoch + rng.random() * 0.2
            clock.epochs += 1
            begun = time.perf_counter()
            try:
                on_epoch_end(EpochResult(
                    epoch=epoch, train_loss=loss, val_loss=loss, val_accuracy=1 - loss / 2.5,
                    train_seconds=epoch_seconds, seconds=epoch_seconds, images_per_second=1000.0,
                ))
            finally:  # a pruned epoch raises TrialPruned from the callback
                clock.seconds += time.perf_counter() - begun

    return fit


class StorageClock:
    """Wraps every method of one RDBStorage instance to add up the main thread's time inside them."""

    def __init__(self, storage: optuna.storages.RDBStorage) -> None:
        self.seconds = 0.0
        self.calls: dict[str, list[float]] = {}  # method name -> [calls, seconds], outermost calls only
        self._depth = 0  # storage methods call each other: only the outermost call is counted
        self._main = threading.get_ident()
        for name in dir(storage):
            if name.startswith("__") or name in ("engine", "scoped_session", "url"):
                continue
            method = getattr(storage, name)
            if callable(method) and not isinstance(method, type):
                setattr(storage, name, self._timed(name, method))

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._main or self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._depth -= 1
                elapsed = time.perf_counter() - start
                self.seconds += elapsed
                tally = self.calls.setdefault(name, [0, 0.0])
                tally[0] += 1
                tally[1] += elapsed

        return timed


def _worker(
    index: int, url: str, study_name: str, budget: int, epochs: int, epoch_seconds: float,
    go: Any, reports: Any,
) -> None:
    """One simulated worker process: hpo's worker loop and Objective, training replaced by a sleep."""
    timings: list[TrialTiming] = []
    opened = time.perf_counter()
    epoch_clock = EpochClock()
    try:
        hpo.tuning.objective.fit = _stand_in_fit(epoch_seconds, epoch_clock)
        spec = dataclasses.replace(bench_spec(epochs=epochs), study=dataclasses.replace(bench_spec(epochs=epochs).study, name=study_name))
        storage = open_storage(url, "bench", heartbeat_interval=10)
        clock = StorageClock(storage)
        study = open_study(spec, storage, worker_index=index)
        data = SimpleNamespace(image_shape=(3, 32, 32), num_classes=10)  # all the stand-in objective reads
        with tempfile.TemporaryDirectory() as checkpoints:
            guard = StorageGuard(shown="bench")
            objective = Objective(spec=spec, data=data, device=__import__("torch").device("cpu"),  # type: ignore[arg-type]
                                  checkpoint_dir=Path(checkpoints), guard=guard, budget=budget)
            marks = {"wall": 0.0, "storage": 0.0}

            def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                now = time.perf_counter()
                in_epochs, trained = epoch_clock.take()
                timings.append(TrialTiming(
                    storage_s=clock.seconds - marks["storage"], outside_s=now - marks["wall"] - trained * epoch_seconds,
                    epoch_end_s=in_epochs, epochs=trained,
                ))
                marks["wall"], marks["storage"] = now, clock.seconds

            waited = time.perf_counter()
            go.wait()
            marks["wall"], marks["storage"] = time.perf_counter(), clock.seconds
            waited = marks["wall"] - waited
            # bench/overhead.py runs this with an older hpo too, whose worker has no claim facts.
            facts = {"facts": objective.worker_facts()} if hasattr(objective, "worker_facts") else {}
            run_worker(
                study, objective, storage=storage, guard=guard, budget=budget, timeout=None, heartbeat_interval=10,
                grace_period=30, callbacks=[objective.on_trial_end, on_trial_end], **facts,
            )
        join = epoch_clock.started[0] - opened - waited if epoch_clock.started else math.nan
        reports.put((index, WorkerReport(timings=tuple(timings), error=None, calls=clock.calls, join_s=join)))
    except BaseException as exc:  # reported to the parent, which counts it as an error
        reports.put((index, WorkerReport(timings=tuple(timings), error=f"{type(exc).__name__}: {exc}")))


def _server_connections(url: str) -> Callable[[], int] | None:
    """A function reading how many connections the server holds to the bench database, or None for SQLite."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return None
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool)
    if backend == "postgresql":
        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db")
    else:
        query = sqlalchemy.text("SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = :db")

    def count() -> int:
        with engine.connect() as connection:
            # This reading connection is one of them.
            return int(connection.execute(query, {"db": parsed.database}).scalar_one()) - 1

    return count


@contextmanager
def _peak(count: Callable[[], int] | None) -> Iterator[list[int]]:
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(CONNECTION_POLL_S):
            try:
                peak[0] = max(peak[0], count())  # type: ignore[misc]
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # the server refused the monitor (too many connections): the peak is already there

    thread = threading.Thread(target=poll, daemon=True)
    if count is not None:
        thread.start()
    try:
        yield peak
    finally:
        done.set()
        if count is not None:
            thread.join()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_workers(
    backend: str, url: str, *, workers: int, trials_per_worker: int, epochs: int, epoch_seconds: float,
    study_name: str | None = None, count_connections: bool = True,
) -> Row:
    """M worker processes on one fresh study (or ``study_name``, already filled) with a budget of M x trials.

    ``count_connections``: poll the server's connection count (a new connection every CONNECTION_POLL_S, which
    costs the server and the 2 cores time the workers then lack: bench/overhead.py turns it off)."""
    name = study_name or f"bench-{backend}-{workers}-{os.getpid()}-{time.monotonic_ns()}"
    spec = bench_spec(epochs=epochs)
    # Created here, before the workers start: their own start race is not what is measured.
    setup = open_storage(url, "bench")
    study = open_study(dataclasses.replace(spec, study=dataclasses.replace(spec.study, name=name)), setup)
    finished_before = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    budget = finished_before + workers * trials_per_worker
    context = multiprocessing.get_context("fork")  # children share the imported modules' memory
    go = context.Event()
    reports = context.Queue()
    processes = [
        context.Process(target=_worker, args=(i, url, name, budget, epochs, epoch_seconds, go, reports), daemon=True)
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    collected: dict[int, WorkerReport] = {}
    counter = _server_connections(url) if count_connections else None
    with _peak(counter) as peak:
        time.sleep(1.0)  # let every process open its storage before the clock starts
        started = time.perf_counter()
        go.set()
        while len(collected) < workers:
            index, report = reports.get(timeout=3600)
            collected[index] = report
        wall = time.perf_counter() - started
    for process in processes:
        process.join(timeout=30)
    trials = study.get_trials(deepcopy=False)
    surplus = sum(t.state == optuna.trial.TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith("surplus") for t in trials)
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials) - surplus
    finished = sum(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in trials) - finished_before
    timings = [t for r in collected.values() for t in r.timings]
    errors = failed + sum(r.error is not None for r in collected.values())
    for index, report in sorted(collected.items()):
        if report.error:
            print(f"  worker {index}: {report.error}", file=sys.stderr)
    if PROFILE and collected[0].calls:
        n = max(1, len(collected[0].timings))
        top = sorted(collected[0].calls.items(), key=lambda item: -item[1][1])
        print("  worker 0, storage calls per trial: " + ", ".join(f"{k} {c / n:.1f}x {1000 * s / n:.1f} ms" for k, (c, s) in top), file=sys.stderr)
    if study_name is None:
        optuna.delete_study(study_name=name, storage=setup)
    setup.remove_session()
    return Row(
        backend=backend, workers=workers, trials_per_s=finished / wall,
        storage_p50_ms=1000 * _percentile([t.storage_s for t in timings], 0.5),
        storage_p99_ms=1000 * _percentile([t.storage_s for t in timings], 0.99),
        outside_mean_ms=1000 * statistics.fmean(t.outside_s for t in timings) if timings else float("nan"),
        connections=peak[0] if counter is not None else None,
        errors=errors, surplus=surplus,
        calls_per_trial=sum(c for c, _ in collected[0].calls.values()) / max(1, len(collected[0].timings)),
        **split_outside([t for r in collected.values() for t in r.timings[1:]]),
        join_s=max(r.join_s for r in collected.values()),
    )


def split_outside(timings: list[TrialTiming]) -> dict[str, float]:
    """Row's per_trial_ms, per_epoch_ms and epochs_per_trial from the trials' timings."""
    epochs = sum(t.epochs for t in timings)
    if not timings or not epochs:
        return {}
    return {
        "per_trial_ms": 1000 * statistics.fmean(t.outside_s - t.epoch_end_s for t in timings),
        "per_epoch_ms": 1000 * sum(t.epoch_end_s for t in timings) / epochs,
        "epochs_per_trial": epochs / len(timings),
    }


def fill(study: optuna.Study, n: int, *, epochs: int, seed: int) -> None:
    """Add ``n`` finished trials shaped like hpo's: params of the study's space, one value per epoch, user attrs."""
    rng = random.Random(seed)
    spec = bench_spec(epochs=epochs)
    # The distributions hpo's space suggests, taken from one real trial of the same space.
    template = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    from hpo.tuning.objective import suggest

    template.optimize(lambda t: (suggest(t, spec.space), 0.0)[1], n_trials=1)
    distributions = template.trials[0].distributions
    trials = []
    for _ in range(n):
        params = {k: _draw(d, rng) for k, d in distributions.items()}
        values = {e: 2.0 / e + rng.random() * 0.2 for e in range(1, epochs + 1)}
        trials.append(optuna.trial.create_trial(
            params=params, distributions=distributions, value=min(values.values()), intermediate_values=values,
            # What a trial of this hpo stores (hpo.tuning.records); hpo 0.2's trials had six more attrs each.
            user_attrs={"worker": {"host": "bench", "pid": 1, "device": "cpu", "precision": "fp32", "trial": 0},
                        "seed": rng.randrange(2**31), "params": 100_000, "val_accuracy": 0.5, "seconds_per_epoch": 1.0,
                        "images_per_second": 1000.0},
        ))
    study.add_trials(trials)


def _draw(distribution: optuna.distributions.BaseDistribution, rng: random.Random) -> Any:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return rng.choice(distribution.choices)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return rng.randint(distribution.low, distribution.high)
    assert isinstance(distribution, optuna.distributions.FloatDistribution)
    if distribution.log:
        return math.exp(rng.uniform(math.log(distribution.low), math.log(distribution.high)))
    return rng.uniform(distribution.low, distribution.high)


def _ensure_database(url: str) -> str:
    """The server's URL with the bench database, created when missing."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return url
    admin = sqlalchemy.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as connection:
        if parsed.get_backend_name() == "postgresql":
            exists = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": BENCH_DATABASE}).first()
            if not exists:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {BENCH_DATABASE}"))
        else:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE IF NOT EXISTS {BENCH_DATABASE}"))
    return parsed.set(database=BENCH_DATABASE).render_as_string(hide_password=False)


def _urls(args: argparse.Namespace, folder: Path) -> dict[str, str]:
    urls = {"sqlite": f"sqlite:///{args.sqlite_path or folder / 'bench.db'}", "postgresql": args.postgres_url, "mariadb": args.mysql_url}
    chosen = {}
    for backend in args.backends:
        if not urls[backend]:
            print(f"skipping {backend}: no server URL (--postgres-url / --mysql-url)", file=sys.stderr)
            continue
        chosen[backend] = _ensure_database(urls[backend])
    return chosen


def _print_rows(rows: list[Row]) -> None:
    print(f"{'backend':<11}{'M':>4}{'trials/s':>10}{'storage p50':>13}{'p99':>11}{'outside':>10}{'conns':>7}{'conns/M':>9}{'errors':>8}{'surplus':>9}{'calls':>7}")
    for r in rows:
        conns = "-" if r.connections is None else str(r.connections)
        per = "-" if r.connections is None else f"{r.connections / r.workers:.2f}"
        print(f"{r.backend:<11}{r.workers:>4}{r.trials_per_s:>10.2f}{r.storage_p50_ms:>10.1f} ms {r.storage_p99_ms:>7.1f} ms"
              f"{r.outside_mean_ms:>7.0f} ms{conns:>7}{per:>9}{r.errors:>8}{r.surplus:>9}{r.calls_per_trial:>7.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("workers", "growth"))
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgresql", "mariadb"), default=["sqlite", "postgresql", "mariadb"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32], help="workers mode: values of M")
    parser.add_argument("--trials-per-worker", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (each reported, pruned on)")
    parser.add_argument("--epoch-seconds", type=float, default=0.05, help="the stand-in training's sleep per epoch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 1000, 10000], help="growth mode: finished trials already in the study")
    parser.add_argument("--growth-trials", type=int, default=20, help="growth mode: trials timed at each size")
    parser.add_argument("--keep", action="store_true", help="growth mode: keep (and reuse) one filled study per backend")
    parser.add_argument("--sqlite-path", help="SQLite file (default: a temporary one)")
    parser.add_argument("--postgres-url", default=os.environ.get("HPO_TEST_POSTGRES_URL"))
    parser.add_argument("--mysql-url", default=os.environ.get("HPO_TEST_MYSQL_URL"))
    parser.add_argument("--profile", action="store_true", help="print worker 0's storage calls per trial, by method")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # surplus trials are counted, not logged
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory() as folder:
        urls = _urls(args, Path(folder))
        print(f"{os.cpu_count()} CPUs; {args.epochs} epochs of {args.epoch_seconds} s per trial; optuna {optuna.__version__}")
        if args.mode == "workers":
            rows = []
            for backend, url in urls.items():
                for m in args.workers:
                    rows.append(run_workers(backend, url, workers=m, trials_per_worker=args.trials_per_worker,
                                            epochs=args.epochs, epoch_seconds=args.epoch_seconds))
                    _print_rows(rows[-1:]) if len(rows) > 1 else _print_rows(rows)
            print()
            _print_rows(rows)
            return 0
        print(f"{'backend':<11}{'finished trials':>16}{'storage p50':>13}{'p99':>11}{'outside mean':>14}{'calls':>8}")
        for backend, url in urls.items():
            # --keep: one study per backend that stays, so that another version of hpo can be timed on the
            # very same filled study right after (the fill is the slow part).
            name = f"growth-{backend}" if args.keep else f"growth-{backend}-{os.getpid()}"
            spec = bench_spec(epochs=args.epochs)
            storage = open_storage(url, "bench")
            study = open_study(dataclasses.replace(spec, study=dataclasses.replace(spec.study, name=name)), storage)
            have = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
            try:
                for size in sorted(args.sizes):
                    if have > size + args.growth_trials * 4:
                        print(f"{backend:<11}{size:>16}  skipped: the kept study already has {have}", flush=True)
                        continue
                    fill(study, max(0, size - have), epochs=args.epochs, seed=size)
                    row = run_workers(backend, url, workers=1, trials_per_worker=args.growth_trials, epochs=args.epochs,
                                      epoch_seconds=args.epoch_seconds, study_name=name)
                    have = max(have, size) + args.growth_trials
                    print(f"{backend:<11}{size:>16}{row.storage_p50_ms:>10.1f} ms {row.storage_p99_ms:>7.1f} ms"
                          f"{row.outside_mean_ms:>11.0f} ms{row.calls_per_trial:>8.1f}", flush=True)
            finally:
                if not args.keep:
                    optuna.delete_study(study_name=name, storage=storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
