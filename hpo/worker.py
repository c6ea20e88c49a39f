"""One worker process: runs trials of a study until the study holds its budget of finished trials.

The budget is the study's, shared by every worker on every machine.  Before each trial a worker
counts finished (COMPLETE, PRUNED) trials and trials that hold a place (RUNNING, WAITING): it starts
a trial only while they leave room, waits while running trials may still fill the budget (one of
them may die and be re-queued), and stops once the finished trials reach it.  Two workers that
start a trial in the same instant can both see room; the later one's trial then fails at once with
``fail_reason`` "surplus…" before training, so the study never ends with more finished trials than
the budget.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

import optuna
from optuna.trial import TrialState

from hpo.cli import Terminated
from hpo.objective import TrialFailed, frozen
from hpo.study import FINISHED_STATES, Reaper, retry_callback

logger = logging.getLogger(__name__)

# Seconds between looks at the study while running trials of other workers may fill the budget.
POLL_S = 1.0

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class StopRequest:
    """Ctrl-C and SIGTERM inside a trial's training stop it at once; elsewhere at the next safe point.

    Raising in the middle of Optuna's own bookkeeping (creating a trial, telling its result) could
    leave a trial RUNNING forever, so there the signal is only noted and raised once that is done.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_training = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self.in_training:
            self.raise_now()

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            self.raise_now()

    def raise_now(self) -> NoReturn:
        self.in_training = False
        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    budget: int,
    timeout: float | None,
    heartbeat_interval: float | None,
    callbacks: Sequence[TrialCallback] = (),
) -> int:
    """Run trials until the study has ``budget`` finished ones (or ``timeout`` s pass); return how many ran.

    On Ctrl-C or SIGTERM the running trial is marked FAIL by Optuna and re-queued here, so a later
    run (or another worker) resumes it from its last epoch checkpoint; the interrupt propagates.
    """
    stop = StopRequest()
    current: list[optuna.Trial] = []  # the trial in progress, if any

    def guarded(trial: optuna.Trial) -> float:
        current[:] = [trial]
        stop.raise_if_requested()  # the signal came while Optuna was creating this trial
        stop.in_training = True
        try:
            return objective(trial)
        finally:
            stop.in_training = False

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if timeout is None else time.monotonic() + timeout
    reaper = Reaper(study=study, interval=heartbeat_interval) if heartbeat_interval else None
    if reaper is not None:
        reaper.start()
    ran = 0
    waiting_logged = False
    try:
        while deadline is None or time.monotonic() < deadline:
            stop.raise_if_requested()
            counts = _counts(study)
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
            study.optimize(guarded, n_trials=1, callbacks=list(callbacks), catch=(TrialFailed,), gc_after_trial=False)
            current.clear()
            ran += 1
    except KeyboardInterrupt:
        if current:
            stored = frozen(current[0])
            if stored.state == TrialState.FAIL:
                retry_callback()(study, stored)
                logger.warning("trial %d interrupted: marked FAIL and re-queued to resume", stored.number)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if reaper is not None:
            reaper.stop()
    return ran
