"""One worker process: runs trials of a study until the study holds its budget of finished trials.

The budget rule is :mod:`hpo.tuning.budget`'s.  The loop is Optuna's ask-and-tell, so that every
storage call goes through a ``StorageGuard`` and a database restart or a cut network pauses the
worker instead of ending it.  For the same reason the running trial's heartbeat and the reaper of
stale trials are threads of ours (:mod:`hpo.tuning.heartbeat`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import NoReturn

import optuna
from optuna.trial import TrialState

from hpo.errors import StorageUnavailable, Terminated
from hpo.tuning.budget import Next, Tally
from hpo.tuning.heartbeat import Heartbeat, ProgressClock, Reaper
from hpo.tuning.objective import TrialAbandoned, TrialFailed
from hpo.tuning.outage import StorageGuard
from hpo.tuning.pareto import curves_study_name, values_text
from hpo.tuning.promotion import Promotion, promote
from hpo.tuning.retry import retry_callback
from hpo.tuning.study import grid_exhausted

logger = logging.getLogger(__name__)

# Seconds between looks at the study while running trials of other workers may fill the budget.
POLL_S = 1.0

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


def _log_result(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state == TrialState.COMPLETE and len(study.directions) > 1:  # multi-objective: no single best
        logger.info("trial %d finished with %s", trial.number, values_text(study, trial))
    elif trial.state == TrialState.COMPLETE:
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
        clock: ProgressClock | None = None,
        stall_timeout: float = float("inf"),
        facts: Mapping[str, object] | None = None,
        promotion: Promotion | None = None,
    ) -> None:
        self.study = study
        self.promotion = promotion
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.storage = storage
        self.guard = guard
        self.objective = objective
        self.heartbeat_interval = heartbeat_interval
        self.callbacks = callbacks
        self.stop = StopRequest(guard)
        # Held by the reaper while it fails a trial and re-queues it (two writes), and here from counting the
        # trials to asking for one: in between the study looks one trial short, and a new configuration would
        # take the place of the one being re-queued.
        self.study_lock = threading.Lock()
        # The claim (user attr "worker") also carries what all of this worker's trials share, e.g. the device:
        # one storage write per trial instead of one per fact.
        self.claim = {"host": socket.gethostname(), "pid": os.getpid(), **(facts or {})}
        self.study_id = guard.call("look up the study", lambda: storage.get_study_id_from_name(study.study_name))

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():
            # Optuna's heartbeat thread belongs to study.optimize; the Heartbeat above replaces it here.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            return self.guard.call("start a trial", self.study.ask)

    def _claim(self, trial: optuna.Trial) -> Heartbeat | None:
        """Beat once, then claim the trial, then keep beating: a claimed trial always has a heartbeat.

        A worker that dies after the claim leaves a trial with a heartbeat, which goes stale and is
        reaped; one that dies before it leaves an unclaimed trial, which the reaper's orphan rule
        re-queues.  Claimed without a heartbeat (the order the other way round) no one would reap.
        """
        heartbeat = None
        if self.heartbeat_interval:
            # Through the study's own storage, which knows the id of a trial it just created or read (no round trip).
            trial_id = self.guard.call(
                "look up the trial",
                lambda: trial.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number),
            )
            self.guard.call("write a heartbeat", lambda: self.storage.record_heartbeat(trial_id))
            if self.clock is not None:
                self.clock.touch()
                self.clock.beat(first=True)
            heartbeat = Heartbeat(
                storage=self.storage, trial_id=trial_id, interval=self.heartbeat_interval, guard=self.guard,
                clock=self.clock, stall_timeout=self.stall_timeout,
            )
        claim = {**self.claim, "trial": trial.number}
        self.guard.call(f"claim trial {trial.number}", lambda: trial.set_user_attr("worker", claim))
        if heartbeat is not None:
            heartbeat.start()
        return heartbeat

    def promote(self, trials: Sequence[optuna.trial.FrozenTrial]) -> bool:
        """Promotion halving: queue the resumption of the paused trial due for it, if any (True)."""
        if self.promotion is None:
            return False
        paused = self.promotion.next_promotion(trials)
        if paused is None:
            return False
        promote(self.study, paused)
        return True

    def _tell(self, number: int, value: float | None, state: TrialState) -> optuna.trial.FrozenTrial:
        return self.guard.call(
            f"record the result of trial {number}",
            lambda: self.study.tell(number, value, state=state, skip_if_finished=True),
        )

    def run_one(self, trial: optuna.Trial) -> None:
        """Claim, train, tell one trial asked for; the callbacks then see its stored result."""
        try:
            heartbeat = self._claim(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Reaped as an orphan (a storage hiccup between ask and claim) or failed by hand: not this worker's error.
            logger.warning("trial %d was ended before this worker could claim it; going on with the next trial", trial.number)
            return
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
        except optuna.exceptions.UpdateFinishedTrialError:
            # Ended under this worker between epochs' reports: while its parameters were sampled, or while a
            # failure was recorded. As at an epoch boundary (TrialAbandoned): not this worker's error.
            logger.warning("trial %d was ended while this worker started or failed it; going on with the next trial", trial.number)
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
                retry_callback(interrupted=True)(self.study, stored)
                logger.warning("trial %d interrupted: marked FAIL and re-queued to resume (no retry used up)", number)
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
    clock: ProgressClock | None = None,
    stall_timeout: float = float("inf"),
    facts: Mapping[str, object] | None = None,
    promotion: Promotion | None = None,
) -> int:
    """Run trials until the study has ``budget`` finished ones (or ``timeout`` s pass); return how many ran.

    On Ctrl-C or SIGTERM the running trial is marked FAIL and re-queued, so a later run (or another
    worker) resumes it from its last epoch checkpoint; the interrupt propagates.  A storage away for
    longer than the guard's patience raises StorageUnavailable.  With a ``clock`` that the objective
    touches at every epoch, a trial that makes no progress for ``stall_timeout`` seconds stops beating.
    ``facts``: what every trial's claim records besides host and pid (``Objective.worker_facts``).
    ``promotion``: promotion halving's rule (``Objective.promotion``): before a new trial, and once the budget is
    met, a paused trial due for promotion is resumed first.
    """
    worker = _Worker(
        study=study, storage=storage, guard=guard, objective=objective, heartbeat_interval=heartbeat_interval,
        callbacks=callbacks, clock=clock, stall_timeout=stall_timeout, facts=facts, promotion=promotion,
    )
    previous = {signum: signal.signal(signum, worker.stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    reaper = None
    if heartbeat_interval:
        curves = curves_study_name(study.study_name) if len(study.directions) > 1 else None
        reaper = Reaper(
            study=study, guard=guard, interval=heartbeat_interval, grace_period=grace_period, lock=worker.study_lock,
            curves=curves, storage=storage,
        )
        reaper.start()
    try:
        return _loop(worker, budget=budget, deadline=None if timeout is None else time.monotonic() + timeout)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if reaper is not None:
            reaper.stop()


def _loop(worker: _Worker, *, budget: int, deadline: float | None) -> int:
    """Start trials while the budget leaves room, until it is met or ``deadline`` (monotonic s) passes."""
    ran = 0
    waiting_for: tuple[int, ...] | None = None  # the running trials last logged as blocking this worker
    while deadline is None or time.monotonic() < deadline:
        worker.stop.raise_if_requested()
        with worker.study_lock:
            trials = worker.guard.call("count the study's trials", lambda: worker.study.get_trials(deepcopy=False))
            tally = Tally.count(trials)
            # A promotion resumes a configuration the budget already counts: it goes first, even past the budget.
            promoted = worker.guard.call("look for a paused trial to promote", lambda: worker.promote(trials))
            step = Next.START if promoted else tally.next(budget)
            if step is Next.STOP:
                break
            if not promoted and worker.guard.call("look at the grid", lambda: grid_exhausted(worker.study)):
                logger.info("every point of the grid has been tried: stopping below the budget of %d", budget)
                break
            trial = worker._ask() if step is Next.START else None
        if trial is None:
            if tally.running_numbers != waiting_for:  # said again whenever the set of blocking trials changes
                waiting_for = tally.running_numbers
                shown = ", ".join(map(str, waiting_for))
                logger.info("budget taken by running trials %s; waiting in case one of them dies", shown)
            time.sleep(POLL_S)
            continue
        waiting_for = None
        worker.run_one(trial)
        ran += 1
    return ran
