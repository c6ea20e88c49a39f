"""One worker process: runs trials of a study until the study holds its budget of finished trials.

The budget is the study's, shared by every worker on every machine.  Before each trial a worker
counts finished (COMPLETE, PRUNED) trials and trials that hold a place (RUNNING, WAITING): it starts
a trial only while they leave room, waits while running trials may still fill the budget (one of
them may die and be re-queued), and stops once the finished trials reach it.  Two workers that
start a trial in the same instant can both see room; the later one's trial then fails at once with
``fail_reason`` "surplus…" before training, so the study never ends with more finished trials than
the budget.

The loop is Optuna's ask-and-tell, so that every storage call goes through a ``StorageGuard`` and a
database restart or a cut network pauses the worker instead of ending it.  For the same reason the
running trial's heartbeat is a thread of ours (it keeps beating through and after an outage), and
stale trials are reaped only by our ``Reaper``, which lets one grace period pass after an outage
before it judges anyone dead: nobody could write a heartbeat while the storage was away.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

import optuna
from optuna.trial import TrialState

from hpo.errors import StorageUnavailable, Terminated
from hpo.objective import TrialAbandoned, TrialFailed
from hpo.outage import StorageGuard, reason
from hpo.study import FINISHED_STATES, retry_callback

logger = logging.getLogger(__name__)

# Seconds between looks at the study while running trials of other workers may fill the budget.
POLL_S = 1.0
# Seconds between heartbeat tries while the storage is away, so that the beat resumes promptly.
HEARTBEAT_RETRY_S = 1.0

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class StopRequest:
    """Ctrl-C and SIGTERM inside a trial's training stop it at once; elsewhere at the next safe point.

    Raising in the middle of Optuna's own bookkeeping (creating a trial, telling its result) could
    leave a trial RUNNING forever, so there the signal is only noted and raised once that is done.
    While the storage is away nothing can be recorded anyway, so the signal is raised at once: the
    trial left RUNNING is reaped and re-queued by whichever worker next reaches the storage.
    """

    def __init__(self, guard: StorageGuard) -> None:
        self.guard = guard
        self.signum: int | None = None
        self.in_training = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self.in_training or self.guard.down:
            self.raise_now()

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            self.raise_now()

    def raise_now(self) -> NoReturn:
        self.in_training = False
        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


class _StoppableThread(threading.Thread):
    """A daemon thread whose loop waits on ``_stop_event``; ``stop()`` ends it."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


class Heartbeat(_StoppableThread):
    """Writes the running trial's heartbeat every ``interval`` seconds, through outages too.

    A beat that fails is tried again every HEARTBEAT_RETRY_S seconds; the thread never ends on an
    error, so a trial is never judged dead while its worker lives and the storage can be reached.
    """

    def __init__(self, *, storage: optuna.storages.RDBStorage, trial_id: int, interval: float, guard: StorageGuard) -> None:
        super().__init__(name="hpo-heartbeat")
        self.storage = storage
        self.trial_id = trial_id
        self.interval = interval
        self.guard = guard

    def run(self) -> None:
        while True:
            try:
                beaten, _ = self.guard.attempt("write a heartbeat", lambda: self.storage.record_heartbeat(self.trial_id))
            except Exception as exc:  # not an outage, but the trial must go on; the next beat tries again
                logger.warning("heartbeat failed: %s", reason(exc))
                beaten = False
            if self._stop_event.wait(self.interval if beaten else min(self.interval, HEARTBEAT_RETRY_S)):
                return

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

    def __init__(self, *, study: optuna.Study, guard: StorageGuard, interval: float, grace_period: float) -> None:
        super().__init__(name="hpo-reaper")
        self.study = study
        self.guard = guard
        self.interval = interval
        self.grace_period = grace_period

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            if self.guard.down_within(self.grace_period):
                continue
            try:
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
            failed = self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            if failed.state == TrialState.FAIL:
                logger.warning("trial %d was never claimed by a worker: marked FAIL and re-queued", trial.number)
                retry_callback()(self.study, failed)


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def _log_result(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        logger.info(
            "trial %d finished with value %.6g; best is trial %d with value %.6g", trial.number, trial.value,
            best.number, best.value,
        )
    elif trial.state == TrialState.PRUNED:
        logger.info("trial %d pruned: %s", trial.number, trial.user_attrs.get("pruned_reason", "by the pruner"))
    else:
        logger.warning("trial %d failed: %s", trial.number, trial.user_attrs.get("fail_reason", "see above"))


class _Worker:
    """The state of one ``run_worker`` call: the study, its storage, the guard and the signal handling."""

    def __init__(
        self,
        *,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        guard: StorageGuard,
        objective: Callable[[optuna.Trial], float],
        heartbeat_interval: float | None,
        callbacks: Sequence[TrialCallback],
    ) -> None:
        self.study = study
        self.storage = storage
        self.guard = guard
        self.objective = objective
        self.heartbeat_interval = heartbeat_interval
        self.callbacks = callbacks
        self.stop = StopRequest(guard)
        self.claim = {"host": socket.gethostname(), "pid": os.getpid()}
        self.study_id = guard.call("look up the study", lambda: storage.get_study_id_from_name(study.study_name))

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():
            # Optuna's heartbeat thread belongs to study.optimize; the Heartbeat above replaces it here.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = self.guard.call("start a trial", self.study.ask)
        claim = {**self.claim, "trial": trial.number}
        self.guard.call(f"claim trial {trial.number}", lambda: trial.set_user_attr("worker", claim))
        return trial

    def _tell(self, number: int, value: float | None, state: TrialState) -> optuna.trial.FrozenTrial:
        return self.guard.call(
            f"record the result of trial {number}",
            lambda: self.study.tell(number, value, state=state, skip_if_finished=True),
        )

    def run_one(self) -> None:
        """Ask, train, tell one trial; the callbacks then see its stored result."""
        trial = self._ask()
        heartbeat = None
        if self.heartbeat_interval:
            trial_id = self.guard.call(
                "look up the trial",
                lambda: self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number),
            )
            heartbeat = Heartbeat(storage=self.storage, trial_id=trial_id, interval=self.heartbeat_interval, guard=self.guard)
            heartbeat.start()
        try:
            value, state = self._train(trial)
            if state is None:
                return
            stored = self._tell(trial.number, value, state)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        if stored.state != state:
            logger.warning(
                "trial %d was ended (%s) while this worker trained it; its result is not recorded, "
                "and its retry resumes from the checkpoint", trial.number, stored.state.name,
            )
            return
        _log_result(self.study, stored)
        for callback in self.callbacks:
            callback(self.study, stored)

    def _train(self, trial: optuna.Trial) -> tuple[float | None, TrialState | None]:
        """(value, state) to tell; state None: nothing to tell (the trial was ended under us)."""
        self.stop.raise_if_requested()  # the signal came while the trial was being created
        self.stop.in_training = True
        try:
            return self.objective(trial), TrialState.COMPLETE
        except optuna.TrialPruned:
            return None, TrialState.PRUNED
        except TrialFailed:
            return None, TrialState.FAIL
        except TrialAbandoned as abandoned:
            logger.warning("%s: stopped it; going on with the next trial (a retry resumes from its checkpoint)", abandoned)
            return None, None
        except StorageUnavailable:
            raise  # nothing can be recorded; the trial is reaped and re-queued once the storage is back
        except KeyboardInterrupt:
            self.stop.in_training = False
            self._requeue_interrupted(trial.number)
            raise
        except Exception:
            self.stop.in_training = False
            self._tell(trial.number, None, TrialState.FAIL)
            raise
        finally:
            self.stop.in_training = False

    def _requeue_interrupted(self, number: int) -> None:
        """Ctrl-C or SIGTERM: the trial is marked FAIL, never left RUNNING, and re-queued to resume."""
        try:
            told, stored = self.guard.attempt(
                f"mark the interrupted trial {number} FAIL", lambda: self.study.tell(number, state=TrialState.FAIL)
            )
            if told and stored is not None:
                retry_callback()(self.study, stored)
                logger.warning("trial %d interrupted: marked FAIL and re-queued to resume", number)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            pass  # already ended by someone else, who re-queued it


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    storage: optuna.storages.RDBStorage,
    guard: StorageGuard,
    budget: int,
    timeout: float | None,
    heartbeat_interval: float | None,
    grace_period: float,
    callbacks: Sequence[TrialCallback] = (),
) -> int:
    """Run trials until the study has ``budget`` finished ones (or ``timeout`` s pass); return how many ran.

    On Ctrl-C or SIGTERM the running trial is marked FAIL and re-queued, so a later run (or another
    worker) resumes it from its last epoch checkpoint; the interrupt propagates.  A storage away for
    longer than the guard's patience raises StorageUnavailable.
    """
    worker = _Worker(
        study=study, storage=storage, guard=guard, objective=objective, heartbeat_interval=heartbeat_interval,
        callbacks=callbacks,
    )
    previous = {signum: signal.signal(signum, worker.stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if timeout is None else time.monotonic() + timeout
    reaper = None
    if heartbeat_interval:
        reaper = Reaper(study=study, guard=guard, interval=heartbeat_interval, grace_period=grace_period)
        reaper.start()
    ran = 0
    waiting_logged = False
    try:
        while deadline is None or time.monotonic() < deadline:
            worker.stop.raise_if_requested()
            counts = guard.call("count the study's trials", lambda: _counts(study))
            finished = sum(counts[s] for s in FINISHED_STATES)
            if finished >= budget:
                break
            if counts[TrialState.WAITING] == 0 and finished + counts[TrialState.RUNNING] >= budget:
                if not waiting_logged:
                    logger.info("budget taken by running trials; waiting in case one of them dies")
                    waiting_logged = True
                time.sleep(POLL_S)
                continue
            waiting_logged = False
            worker.run_one()
            ran += 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if reaper is not None:
            reaper.stop()
    return ran
