"""A running trial's heartbeat, and the reaper that fails the trials of workers that stopped beating.

Both are threads of ours rather than Optuna's: every storage call they make goes through the
worker's ``StorageGuard``, so that they ride out an outage, and the reaper lets one grace period
pass after an outage before it judges anyone dead (nobody could write a heartbeat meanwhile).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

import optuna
from optuna.trial import TrialState

from hpo.tuning.outage import StorageGuard, reason
from hpo.tuning.pareto import TWIN_OF_ATTR
from hpo.tuning.retry import retry_callback

logger = logging.getLogger(__name__)

# Seconds between heartbeat tries while the storage is away, so that the beat resumes promptly.
HEARTBEAT_RETRY_S = 1.0


class _StoppableThread(threading.Thread):
    """A daemon thread whose loop waits on ``_stop_event``; ``stop()`` ends it."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


class ProgressClock:
    """When the worker's trial last made progress (started, finished an epoch), and its longest epoch.

    The trial's thread touches it; the heartbeat thread reads it.  A float or two written by one
    thread and read by another: no lock is needed for a reading that may be one epoch late.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.longest_epoch = 0.0  # seconds
        self.last_beat: float | None = None  # monotonic s of the trial's last heartbeat; None before its first
        self.longest_silence = 0.0  # seconds: the longest gap between two heartbeats of the trial

    def beat(self, *, first: bool = False) -> None:
        """A heartbeat was written; ``first``: the first of a new trial."""
        now = time.monotonic()
        if first or self.last_beat is None:
            self.longest_silence = 0.0
        else:
            self.longest_silence = max(self.longest_silence, now - self.last_beat)
        self.last_beat = now

    def silence(self) -> float:
        """The longest time the running trial has gone without a heartbeat, including now (seconds).

        Kept once it happened: a process frozen (SIGSTOP, a Slurm suspend, a paused VM) beats again the
        moment it thaws, before its trial's thread can ask whether someone took the trial over meanwhile.
        """
        if self.last_beat is None:
            return 0.0
        return max(self.longest_silence, time.monotonic() - self.last_beat)

    def touch(self, epoch_seconds: float = 0.0) -> None:
        self.last = time.monotonic()
        self.longest_epoch = max(self.longest_epoch, epoch_seconds)

    def stalled(self, bound: float) -> float | None:
        """Seconds since the last progress when that exceeds ``bound`` (and 3 epochs as long as the longest), else None."""
        idle = time.monotonic() - self.last
        return idle if idle > max(bound, 3 * self.longest_epoch) else None


class Heartbeat(_StoppableThread):
    """Writes the running trial's heartbeat every ``interval`` seconds, through outages too.

    A beat that fails is tried again every HEARTBEAT_RETRY_S seconds; the thread never ends on an
    error, so a trial is never judged dead while its worker lives and the storage can be reached.
    With a ``clock``, a worker alive but stuck (a hung device call, a blocked write, a lock wait) that
    makes no progress for ``stall_timeout`` seconds stops beating, so that its trial goes stale and
    another worker retries it; should it ever move again, it finds the trial ended and goes on.
    """

    def __init__(
        self, *, storage: optuna.storages.RDBStorage, trial_id: int, interval: float, guard: StorageGuard,
        clock: ProgressClock | None = None, stall_timeout: float = float("inf"),
    ) -> None:
        super().__init__(name="hpo-heartbeat")
        self.storage = storage
        self.trial_id = trial_id
        self.interval = interval
        self.guard = guard
        self.clock = clock
        self.stall_timeout = stall_timeout

    def run(self) -> None:
        stalled = False
        while True:
            if self._stalled(stalled) != stalled:
                stalled = not stalled
            if stalled:  # no beat: the trial goes stale and another worker's reaper re-queues it
                if self._stop_event.wait(min(self.interval, HEARTBEAT_RETRY_S)):
                    return
                continue
            try:
                beaten, _ = self.guard.attempt("write a heartbeat", lambda: self.storage.record_heartbeat(self.trial_id))
            except Exception as exc:  # not an outage, but the trial must go on; the next beat tries again
                logger.warning("heartbeat failed: %s", reason(exc))
                beaten = False
            if beaten and self.clock is not None:
                self.clock.beat()
            if self._stop_event.wait(self.interval if beaten else min(self.interval, HEARTBEAT_RETRY_S)):
                return

    def _stalled(self, was: bool) -> bool:
        """Whether the trial has made no progress for too long; says so when that changes."""
        idle = self.clock.stalled(self.stall_timeout) if self.clock is not None else None
        if idle is not None and not was:
            logger.error(
                "no progress on this worker's trial for %.0f s (--stall-timeout %.0f s): its heartbeat stops, so "
                "that another worker retries it from its checkpoint", idle, self.stall_timeout,
            )
        elif idle is None and was:
            logger.warning("this worker's trial made progress again: its heartbeat resumes")
        return idle is not None

    def stop(self) -> None:
        super().stop()
        self.join()  # gone before the next trial starts a heartbeat of its own


class Reaper(_StoppableThread):
    """Marks trials of dead workers FAIL (Optuna's retry callback then re-queues them) every ``interval`` s.

    Optuna reaps stale trials only when a worker starts a new trial; this thread does it even while
    every live worker is busy with a long trial.  After an outage it waits ``grace_period`` seconds
    before reaping, so that live workers have written a heartbeat again.  It also re-queues orphans:
    trials a worker created but never claimed (a storage failure in the middle of ``study.ask``),
    which have no heartbeat and would otherwise hold a place in the budget forever.
    """

    def __init__(
        self, *, study: optuna.Study, guard: StorageGuard, interval: float, grace_period: float,
        lock: threading.Lock | None = None, curves: str | None = None,
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        super().__init__(name="hpo-reaper")
        self.study = study
        # Multi-objective: the curves study's name, whose twins of trials ended without their worker are ended too.
        self.curves = curves
        self.storage = storage
        self._curves: optuna.Study | None = None  # loaded at the first round that finds it
        self.guard = guard
        self.interval = interval
        self.grace_period = grace_period
        # The worker's: while a trial is failed but not yet re-queued, the worker must not count the study.
        self.lock = lock if lock is not None else threading.Lock()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            if self.guard.down_within(self.grace_period):
                continue
            try:
                with self.lock:
                    self.guard.attempt("reap stale trials", self.reap)
            except Exception as exc:  # a bad round must not end the thread; the next one tries again
                logger.warning("reaping stale trials failed: %s", reason(exc))

    def reap(self) -> None:
        optuna.storages.fail_stale_trials(self.study)
        oldest = datetime.datetime.now() - datetime.timedelta(seconds=self.grace_period)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            claimed = trial.user_attrs.get("worker", {}).get("trial") == trial.number
            if claimed or trial.datetime_start is None or trial.datetime_start > oldest:
                continue
            try:
                failed = self.study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # ended meanwhile, by a racing reaper that re-queues it, or by its worker
            logger.warning("trial %d was never claimed by a worker: marked FAIL and re-queued", trial.number)
            # Not the configuration's failure: a storage hiccup between asking for a trial and claiming it.
            retry_callback(interrupted=True)(self.study, failed)
        if self.curves is not None and self.storage is not None:
            self._end_orphaned_twins(self.curves, self.storage)

    def _end_orphaned_twins(self, name: str, storage: optuna.storages.BaseStorage) -> None:
        """A multi-objective trial ended without its worker (reaped, failed by hand) leaves its twin in the curves
        study RUNNING; it is marked FAIL too.  A live worker ends the twin before its trial, so a RUNNING twin
        whose trial is not RUNNING has no worker."""
        if self._curves is None:
            try:
                self._curves = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                return  # no trial has started a twin yet
        curves = self._curves
        twins = curves.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not twins:
            return
        live = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for twin in twins:
            owner = twin.user_attrs.get(TWIN_OF_ATTR)
            if owner is None or owner in live:
                continue  # a twin is RUNNING a moment before it names its trial
            try:
                curves.tell(twin.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # ended meanwhile
            logger.info("the curve of trial %s, ended without its worker, marked FAIL", owner)
