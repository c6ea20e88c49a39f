"""Retries that count only failures, taken once each: interruptions, racing reapers, two workers on one
waiting retry, and workers killed or frozen at any moment of a trial.  Real processes throughout.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from faults import GatedStudy, Worker, fresh_database, server_url
from hpo.tuning.retry import FAILURES_ATTR, MAX_RETRY, Requeue


def _retries_of(trials: list[optuna.trial.FrozenTrial], number: int) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.system_attrs.get("failed_trial") == number]


def _ended_run(study: optuna.Study, epochs_before: int, epochs_run: int) -> optuna.trial.FrozenTrial:
    """The next queued retry (or a new trial) run for ``epochs_run`` epochs, then marked FAIL."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for epoch in range(epochs_before + 1, epochs_before + epochs_run + 1):
        trial.report(1.0 / epoch, epoch)
    return study.tell(trial, state=TrialState.FAIL)


def test_failures_without_progress_use_up_retries_and_interruptions_never_do() -> None:
    study = optuna.create_study()
    ended = _ended_run(study, 0, 1)
    for _ in range(MAX_RETRY + 2):  # more interruptions than there are retries
        Requeue(interrupted=True)(study, ended)
        ended = _ended_run(study, 1, 0)
    assert study.trials[-1].user_attrs[FAILURES_ATTR] == 0
    Requeue()(study, ended)  # reaped having trained nothing: a failure
    for expected in range(1, MAX_RETRY + 1):
        assert study.trials[-1].user_attrs[FAILURES_ATTR] == expected
        ended = _ended_run(study, 1, 0)
        Requeue()(study, ended)
    assert study.trials[-1].state == TrialState.FAIL, "failed MAX_RETRY + 1 times without progress: given up"
    Requeue()(study, _ended_run(study, 0, 0))  # a new configuration reaped before its first epoch: a failure
    progressed = _ended_run(study, 0, 2)  # its retry, reaped after two epochs of its own: killed while working
    Requeue()(study, progressed)
    assert study.trials[-1].state == TrialState.WAITING and study.trials[-1].user_attrs[FAILURES_ATTR] == 1


def _ask_many(url: str, asks: int, start: multiprocessing.synchronize.Barrier, numbers: multiprocessing.Queue) -> None:
    from hpo.tuning.storage import open_storage

    study = optuna.load_study(study_name="pop", storage=open_storage(url, "test"))
    start.wait()
    numbers.put([study.ask().number for _ in range(asks)])


@pytest.mark.slow
def test_workers_on_sqlite_never_take_the_same_waiting_trial(tmp_path: Path) -> None:
    """Python's sqlite3 reads outside a transaction: without BEGIN IMMEDIATE, 200 waiting trials popped by 4
    processes gave 230 to 274 pops (issue 17's double pop); each waiting trial must be taken once."""
    from hpo.tuning.storage import open_storage

    url = f"sqlite:///{tmp_path / 'pop.db'}"
    waiting, processes = 80, 4
    study = optuna.create_study(study_name="pop", storage=open_storage(url, "test"))
    for x in range(waiting):
        study.enqueue_trial({"x": x})
    start, numbers = multiprocessing.Barrier(processes), multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_ask_many, args=(url, waiting // processes + 5, start, numbers)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    taken = [number for _ in workers for number in numbers.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=60)
    twice = [number for number, count in Counter(taken).items() if count > 1]
    assert not twice, f"waiting trials taken by two workers: {twice}"
    assert set(range(waiting)) <= set(taken), "every waiting trial was taken"


ORPHANS = 12


def _leave_orphans(url: str) -> None:
    """A worker that asked for trials and was killed before it claimed them (no heartbeat, no claim)."""
    from hpo.tuning.storage import open_storage

    study = optuna.load_study(study_name="orphans", storage=open_storage(url, "test", heartbeat_interval=1))
    for _ in range(ORPHANS):
        study.ask()
    os.kill(os.getpid(), signal.SIGKILL)


def _reap(url: str, start: multiprocessing.synchronize.Barrier) -> None:
    from hpo.tuning.heartbeat import Reaper
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.storage import open_storage

    study = optuna.load_study(study_name="orphans", storage=open_storage(url, "test", heartbeat_interval=1))
    reaper = Reaper(study=study, guard=StorageGuard(shown="test"), interval=1, grace_period=0)
    start.wait()
    reaper.reap()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["sqlite", "postgresql"])
def test_racing_reapers_requeue_each_orphan_of_a_killed_worker_once(tmp_path: Path, server: str) -> None:
    def run(url: str) -> None:
        optuna.create_study(study_name="orphans", storage=url)
        killed = multiprocessing.Process(target=_leave_orphans, args=(url,))
        killed.start()
        killed.join(timeout=120)
        assert killed.exitcode == -signal.SIGKILL
        start = multiprocessing.Barrier(3)
        reapers = [multiprocessing.Process(target=_reap, args=(url, start)) for _ in range(3)]
        for reaper in reapers:
            reaper.start()
        for reaper in reapers:
            reaper.join(timeout=120)
        assert [reaper.exitcode for reaper in reapers] == [0, 0, 0]
        trials = optuna.load_study(study_name="orphans", storage=url).trials
        assert [t.state for t in trials[:ORPHANS]] == [TrialState.FAIL] * ORPHANS, "every orphan was reaped"
        requeued = Counter(t.system_attrs.get("failed_trial") for t in trials[ORPHANS:])
        assert requeued == Counter(range(ORPHANS)), "each orphan re-queued exactly once"
        assert all(t.state == TrialState.WAITING and t.user_attrs[FAILURES_ATTR] == 0 for t in trials[ORPHANS:])

    if server == "sqlite":
        run(f"sqlite:///{tmp_path / 'orphans.db'}")
    else:
        with fresh_database(server_url("postgresql")) as url:
            run(url)


def _clean(worker: Worker) -> None:
    assert "Traceback" not in worker.output, worker.output


@pytest.mark.slow
def test_interruptions_never_use_up_the_retries_of_a_trial(tmp_path: Path) -> None:
    """SIGTERM (a Slurm time limit, preemption, scancel, Kubernetes) more often than there are retries: the
    configuration is re-queued every time and finishes.  On the old main the fourth interruption dropped it."""
    study = GatedStudy(tmp_path, max_epochs=8, hang_after=1)
    for _ in range(MAX_RETRY + 1):
        worker = study.signalled(signal.SIGTERM)
        try:
            assert worker.wait(timeout=60) == 128 + signal.SIGTERM, worker.output
        finally:
            worker.kill()
        _clean(worker)
        assert "re-queued to resume (no retry used up)" in worker.output, worker.output
    last = study.worker()
    assert last.wait(timeout=120) == 0, last.output
    _clean(last)
    trials = study.trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * (MAX_RETRY + 1) + [TrialState.COMPLETE]
    finished = trials[-1]
    assert finished.system_attrs["failed_trial"] == 0 and finished.user_attrs[FAILURES_ATTR] == 0
    assert finished.user_attrs["resumed_from_epoch"] == MAX_RETRY + 1, "each run trained one epoch and kept it"
    assert sorted(finished.intermediate_values) == list(range(1, 9))


@pytest.mark.slow
def test_a_worker_killed_before_its_trials_first_epoch_is_reaped_and_the_study_finishes(tmp_path: Path) -> None:
    """kill -9 between the claim and the first epoch: the trial has a heartbeat, goes stale and is retried."""
    study = GatedStudy(tmp_path, max_epochs=2, hang_after=0)
    killed = study.signalled(signal.SIGKILL)
    try:
        killed.wait(timeout=60)
        other = study.worker()
        code = other.wait(timeout=120)
    finally:
        killed.kill()
    assert code == 0, other.output
    _clean(other)
    assert "budget taken by running trials 0; waiting in case one of them dies" in other.output, other.output
    trials = study.trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE], other.output
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs[FAILURES_ATTR] == 1


@pytest.mark.slow
def test_a_frozen_worker_is_taken_over_and_on_thawing_writes_nothing_of_the_trial(tmp_path: Path) -> None:
    """SIGSTOP (Ctrl-Z, a Slurm suspend, a paused VM) mid-trial: another worker reaps the trial and finishes the
    study; the frozen worker, thawed, neither records the trial nor writes its checkpoint, and exits 0.  On the
    old main it wrote epoch 2's checkpoint onto the file its retry owned."""
    study = GatedStudy(tmp_path, max_epochs=4, hang_after=1)
    frozen = study.signalled(signal.SIGSTOP)
    try:
        other = study.worker()
        assert other.wait(timeout=120) == 0, other.output
        assert not list(study.checkpoints.rglob("*.pt")), "the finished retry's checkpoint was removed"
        Path(f"{study.token}.release").touch()
        frozen.process.send_signal(signal.SIGCONT)
        code = frozen.wait(timeout=120)
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        frozen.kill()
    assert code == 0, frozen.output
    _clean(frozen)
    _clean(other)
    assert "no heartbeat for" in frozen.output and "was ended (FAIL)" in frozen.output, frozen.output
    assert not list(study.checkpoints.rglob("*.pt")), "the thawed worker wrote a checkpoint of a trial not its own"
    trials = study.trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs["resumed_from_epoch"] == 1
    assert trials[1].user_attrs["worker"]["pid"] == other.process.pid
