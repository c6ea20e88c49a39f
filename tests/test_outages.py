"""Workers that ride out the database, each other and a trial ended under them: real servers, real faults.

Outages are real: a throwaway PostgreSQL server stopped and started with pg_ctl, or a TCP proxy in
front of the shared server that is cut and restored.  Every test waits on events (a log line, a
trial state); the one fixed wait is the length of the outage itself.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from conftest import missing, write_study
from faults import TcpProxy, ThrowawayPostgres, Worker, fresh_database, running_with_epochs, server_url, wait_for
from hpo.cli import EXIT_STORAGE_UNAVAILABLE

pytestmark = pytest.mark.slow

# Seconds between heartbeats and without one before a trial is reaped, kept short for the tests.
BEAT = ("--heartbeat-interval", "1", "--grace-period", "3")


@pytest.fixture()
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    problem = ThrowawayPostgres.available()
    if problem:
        missing("postgresql", f"cannot start a throwaway PostgreSQL: {problem}")
    server = ThrowawayPostgres().init()
    server.start()
    yield server
    server.destroy()


@pytest.fixture()
def proxied_postgres() -> Iterator[tuple[TcpProxy, str]]:
    """(proxy, URL through it) for a fresh database on the shared PostgreSQL server."""
    server = server_url("postgresql")
    with fresh_database(server) as url:
        parsed = make_url(url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        proxy.start()
        yield proxy, proxy.url_for(url)
        proxy.close()


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).trials


def _assert_all_done(url: str, name: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly ``budget`` finished trials, distinct numbers, nothing RUNNING or WAITING."""
    trials = _trials(url, name)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "no duplicate trial numbers"
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == budget
    left = [(t.number, t.state.name) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"left RUNNING or WAITING: {left}"
    return trials


def _epochs_recorded(trials: list[optuna.trial.FrozenTrial], max_epochs: int) -> None:
    """Every finished trial has every epoch it trained: 1..n with no gap (none lost to the outage)."""
    assert any(trial.state == TrialState.COMPLETE for trial in trials), "some trial completed, so the check below ran"
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == list(range(1, max_epochs + 1)), (trial.number, trial.intermediate_values)


def _summary(label: str, trials: list[optuna.trial.FrozenTrial], **figures: object) -> None:
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    retried = sum("failed_trial" in t.system_attrs for t in trials)
    shown = ", ".join(f"{k} {v}" for k, v in figures.items())
    print(f"\n{label}: {shown}; trials {states}, retries {retried}")


# --- workers starting together ---------------------------------------------------------------------------


def _join_at_barrier(urls: list[str], study_file: str, barrier: multiprocessing.synchronize.Barrier, queue: multiprocessing.Queue) -> None:
    """One process of the race: for each fresh storage, open it and the study at the same instant as the others."""
    from hpo.studyfile.spec import load_spec
    from hpo.tuning.storage import open_storage
    from hpo.tuning.study import open_study

    spec = load_spec(Path(study_file))
    for url in urls:
        barrier.wait()
        try:
            storage = open_storage(url, "--storage", heartbeat_interval=10, grace_period=30)
            study = open_study(spec, storage, worker_index=0)
            queue.put((url, "ok", study.study_name))
        except BaseException as exc:  # reported to the test, which shows it
            queue.put((url, "error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_workers_opening_a_fresh_storage_in_the_same_instant_all_join_one_study(
    tmp_path: Path, archive: Path, backend: str
) -> None:
    """8 processes released by one barrier create the tables and the study together, on 3 fresh storages in turn."""
    study_file = write_study(tmp_path, archive=archive, name="race")
    processes_n, rounds = 8, 3
    with ExitStack() as stack:
        if backend == "sqlite":
            urls = [f"sqlite:///{tmp_path / f'race-{i}.db'}" for i in range(rounds)]
        else:
            urls = [stack.enter_context(fresh_database(server_url(backend))) for _ in range(rounds)]
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(processes_n)
        queue = context.Queue()
        processes = [
            context.Process(target=_join_at_barrier, args=(urls, str(study_file), barrier, queue)) for _ in range(processes_n)
        ]
        for process in processes:
            process.start()
        results = [queue.get(timeout=120) for _ in range(processes_n * rounds)]
        for process in processes:
            process.join(timeout=30)
        assert [r for r in results if r[1] != "ok"] == [], results
        for url in urls:
            assert optuna.get_all_study_names(url) == ["race"], url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_four_workers_started_together_on_a_fresh_storage_finish_exactly_the_budget(
    tmp_path: Path, archive: Path, backend: str
) -> None:
    study_file = write_study(tmp_path, archive=archive, name="together", max_epochs=1)

    def run(url: str) -> None:
        workers = [Worker("--study", str(study_file), "--n-trials", "8", "--storage", url, "--quiet") for _ in range(4)]
        try:
            codes = [worker.wait(timeout=300) for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
        assert codes == [0, 0, 0, 0], "\n".join(worker.output for worker in workers)
        for worker in workers:
            assert "Traceback" not in worker.output, worker.output
        _assert_all_done(url, "together", 8)

    if backend == "sqlite":
        run(f"sqlite:///{tmp_path / 'fresh.db'}")
    else:
        with fresh_database(server_url(backend)) as url:
            run(url)


# --- the storage going away -------------------------------------------------------------------------------


def _long_trials_study(tmp_path: Path, archive: Path, name: str) -> Path:
    # Epochs of about half a second on 1,500 images: an outage lands in the middle of a trial.
    return write_study(tmp_path, archive=archive, name=name, max_epochs=4, train_subset=1500)


def _two_workers(study_file: Path, url: str, tmp_path: Path) -> list[Worker]:
    common = ("--study", str(study_file), "--n-trials", "4", "--storage", url, "--checkpoint-dir", str(tmp_path / "ckpt"), *BEAT, "--quiet")
    return [Worker(*common) for _ in range(2)]


def _assert_nothing_lost(workers: list[Worker], codes: list[int], url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """Both workers exit 0 without a traceback; the budget is met with every epoch of every trial recorded."""
    outputs = "\n".join(worker.output for worker in workers)
    assert codes == [0, 0], outputs
    assert "Traceback" not in outputs, outputs
    trials = _assert_all_done(url, name, 4)
    _epochs_recorded(trials, 4)
    return trials


def test_a_database_restart_mid_trial_loses_nothing(
    tmp_path: Path, archive: Path, throwaway_postgres: ThrowawayPostgres
) -> None:
    url = throwaway_postgres.url
    study_file = _long_trials_study(tmp_path, archive, "restart")
    workers = _two_workers(study_file, url, tmp_path)
    try:
        wait_for(lambda: running_with_epochs(url, "restart"), 120, "a running trial with a reported epoch")
        down = time.monotonic()
        throwaway_postgres.stop()
        wait_for(lambda: any("unreachable" in w.output for w in workers), 30, "a worker to notice the server is down")
        throwaway_postgres.start()
        outage = time.monotonic() - down
        codes = [worker.wait(timeout=240) for worker in workers]
        recovered = time.monotonic() - down
    finally:
        for worker in workers:
            worker.kill()
    trials = _assert_nothing_lost(workers, codes, url, "restart")
    _summary("restart", trials, outage_s=f"{outage:.1f}", workers_done_after_s=f"{recovered:.1f}")


def test_a_twenty_second_outage_under_two_workers_loses_nothing(
    tmp_path: Path, archive: Path, proxied_postgres: tuple[TcpProxy, str]
) -> None:
    proxy, url = proxied_postgres
    study_file = _long_trials_study(tmp_path, archive, "outage")
    workers = _two_workers(study_file, url, tmp_path)
    try:
        wait_for(lambda: running_with_epochs(url, "outage"), 120, "a running trial with a reported epoch")
        proxy.cut()
        cut_at = time.monotonic()
        for worker in workers:
            worker.wait_for_line("unreachable", timeout=30)
        time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))  # the outage itself: 20 s
        proxy.restore()
        outage = time.monotonic() - cut_at
        for worker in workers:
            worker.wait_for_line("is back after", timeout=60)
        back = time.monotonic() - cut_at - outage
        codes = [worker.wait(timeout=240) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    trials = _assert_nothing_lost(workers, codes, url, "outage")
    for worker in workers:
        assert sum("unreachable" in line for line in worker.lines) == 1, "one warning when the storage goes away"
        assert sum("is back after" in line for line in worker.lines) == 1, "one line when it is back"
    _summary("20 s outage", trials, outage_s=f"{outage:.1f}", both_workers_back_within_s=f"{back:.1f}")


def test_an_outage_past_the_patience_exits_75_and_the_next_worker_resumes_the_trial(
    tmp_path: Path, archive: Path, proxied_postgres: tuple[TcpProxy, str]
) -> None:
    proxy, url = proxied_postgres
    study_file = _long_trials_study(tmp_path, archive, "patience")
    checkpoints = ("--checkpoint-dir", str(tmp_path / "ckpt"))
    worker = Worker("--study", str(study_file), "--n-trials", "2", "--storage", url, *checkpoints, *BEAT, "--storage-patience", "5", "--quiet")
    try:
        victim = wait_for(lambda: running_with_epochs(url, "patience"), 120, "a running trial with a reported epoch")
        assert isinstance(victim, optuna.trial.FrozenTrial)
        proxy.cut()
        code = worker.wait(timeout=120)
    finally:
        worker.kill()
        proxy.restore()
    assert code == EXIT_STORAGE_UNAVAILABLE, worker.output
    assert "Traceback" not in worker.output, worker.output
    errors = [line for line in worker.lines if "error:" in line]
    assert len(errors) == 1 and "unreachable for 5 s (--storage-patience)" in errors[0], worker.output
    # The trial stays RUNNING until the next worker reaps it (no heartbeat), re-queues and resumes it.
    later = Worker("--study", str(study_file), "--n-trials", "2", "--storage", url, *checkpoints, *BEAT, "--quiet")
    try:
        assert later.wait(timeout=240) == 0, later.output
    finally:
        later.kill()
    trials = _assert_all_done(url, "patience", 2)
    dead = next(t for t in trials if t.number == victim.number)
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["resumed_from_epoch"] >= len(dead.intermediate_values) >= 1
    _summary("past patience", trials, resumed_from_epoch=retry.user_attrs["resumed_from_epoch"])


# --- a trial ended under its live worker ------------------------------------------------------------------


def test_a_trial_reaped_under_its_live_worker_is_skipped_and_its_retry_resumes(tmp_path: Path, archive: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _long_trials_study(tmp_path, archive, "reaped")
    # The worker beats every 10 s; another party with a 1 s grace period (a misconfigured worker, a long
    # pause, the dashboard's "fail") ends its trial while it trains.
    worker = Worker("--study", str(study_file), "--n-trials", "2", "--storage", url, "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet")
    try:
        victim = wait_for(lambda: running_with_epochs(url, "reaped"), 120, "a running trial with a reported epoch")
        assert isinstance(victim, optuna.trial.FrozenTrial)
        from hpo.tuning.retry import retry_callback

        impatient = optuna.storages.RDBStorage(
            url, heartbeat_interval=1, grace_period=1, heartbeat_stale_trial_callback=retry_callback()
        )
        study = optuna.load_study(study_name="reaped", storage=impatient)

        def reaped() -> bool:
            optuna.storages.fail_stale_trials(study)
            return study.trials[victim.number].state == TrialState.FAIL

        wait_for(reaped, 30, "the trial to be reaped")
        worker.wait_for_line("was ended while this worker trained it", timeout=60)
        assert worker.wait(timeout=240) == 0, worker.output
    finally:
        worker.kill()
    assert "Traceback" not in worker.output, worker.output
    trials = _assert_all_done(url, "reaped", 2)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.user_attrs["resumed_from_epoch"] >= len(victim.intermediate_values) >= 1
    assert retry.user_attrs["worker"]["pid"] == worker.process.pid, "the live worker went on and took the retry"
    _summary("reaped under its live worker", trials, resumed_from_epoch=retry.user_attrs["resumed_from_epoch"])


def test_a_worker_cut_off_past_the_grace_period_leaves_its_trial_to_the_worker_that_took_it_over(
    tmp_path: Path, archive: Path, proxied_postgres: tuple[TcpProxy, str]
) -> None:
    """One host cut off while the others are not: they reap its trial and resume it from its checkpoint; the cut-off
    worker waits for the storage before it writes that file again, then finds the trial taken and leaves it."""
    proxy, url = proxied_postgres
    direct = make_url(url).set(host=proxy.target[0], port=proxy.target[1]).render_as_string(hide_password=False)
    study_file = write_study(tmp_path, archive=archive, name="cutoff", max_epochs=8, train_subset=1500)
    common = ("--study", str(study_file), "--n-trials", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), *BEAT, "--quiet")
    cut_off = Worker(*common, "--storage", url, "--storage-patience", "240")
    other = None
    try:
        victim = wait_for(lambda: running_with_epochs(direct, "cutoff"), 120, "the first worker's first epoch")
        assert isinstance(victim, optuna.trial.FrozenTrial)
        proxy.cut()
        try:
            other = Worker(*common, "--storage", direct)
            assert other.wait(timeout=240) == 0, other.output
        finally:
            proxy.restore()
        assert cut_off.wait(timeout=240) == 0, cut_off.output
    finally:
        for worker in (cut_off, other):
            if worker is not None:
                worker.kill()
    assert "Traceback" not in cut_off.output + (other.output if other else "")
    line = cut_off.wait_for_line("while this worker was cut off", timeout=1)
    assert f"trial {victim.number} was ended (FAIL)" in line and "without writing" in line, cut_off.output
    trials = _assert_all_done(direct, "cutoff", 2)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.user_attrs["worker"]["pid"] != victim.user_attrs["worker"]["pid"]
    assert retry.user_attrs["resumed_from_epoch"] >= 1


def test_workers_whose_sessions_default_to_different_time_zones_never_reap_each_other(tmp_path: Path, archive: Path) -> None:
    """Two hosts configured differently (PGTZ=UTC and PGTZ=Asia/Tokyo) on one study: heartbeats are written and
    compared in UTC, so no live trial is taken for stale (on the old main: every trial of the UTC worker was)."""
    import os

    with fresh_database(server_url("postgresql")) as url:
        study_file = write_study(tmp_path, archive=archive, name="zones", max_epochs=3, train_subset=1500)
        common = ("--study", str(study_file), "--n-trials", "6", "--storage", url, *BEAT, "--quiet")
        workers = [Worker(*common, env=dict(os.environ, PGTZ=zone)) for zone in ("UTC", "Asia/Tokyo")]
        try:
            codes = [worker.wait(timeout=300) for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
        outputs = "\n".join(worker.output for worker in workers)
        assert codes == [0, 0] and "Traceback" not in outputs, outputs
        trials = _assert_all_done(url, "zones", 6)
        assert not [t.number for t in trials if t.state == TrialState.FAIL], outputs
        assert "was ended" not in outputs and "while this worker" not in outputs


def test_a_worker_started_before_its_database_waits_for_it_and_finishes(tmp_path: Path, archive: Path) -> None:
    """A pod or job that starts before its database server (a Kubernetes Job beside a fresh PostgreSQL, a node
    reboot): the start-up connection gets --storage-patience like an outage.  On the old main: exit 2 at once."""
    problem = ThrowawayPostgres.available()
    if problem:
        pytest.skip(f"cannot start a throwaway PostgreSQL: {problem}")
    server = ThrowawayPostgres().init()  # not started yet
    study_file = write_study(tmp_path, archive=archive, name="late", max_epochs=1)
    worker = Worker("--study", str(study_file), "--n-trials", "2", "--storage", server.url, *BEAT, "--quiet")
    try:
        worker.wait_for_line("unreachable", timeout=60)
        server.start()
        code = worker.wait(timeout=240)
        _assert_all_done(server.url, "late", 2)
    finally:
        worker.kill()
        server.destroy()
    assert code == 0, worker.output
    assert "Traceback" not in worker.output and "while trying to connect" in worker.output, worker.output
    assert sum("is back after" in line for line in worker.lines) == 1, worker.output
