"""Re-queuing a trial whose run ended before its result: failures use up retries, interruptions do not.

Optuna's retry callback re-queues a trial with its parameters and its epochs so far, and keeps the
chain (``failed_trial``, ``retry_history``) that hpo resumes checkpoints from.  It counts every ended
run against one limit, so a long trial preempted or scancelled three times would be dropped as FAIL.
Here only failures count (kept in the ``failures`` user attribute, which retries inherit):

- a run stopped by a signal (SIGTERM, Ctrl-C, a Slurm time limit or preemption) never counts;
- a run whose worker vanished (reaped: killed, frozen, cut off, stuck) counts only when it finished
  no epoch of its own: a worker killed while making progress was interrupted, one that dies at the
  same spot every time has a trial that kills it.
"""

from __future__ import annotations

import copy
import logging

import optuna

from hpo.tuning.pareto import curve

logger = logging.getLogger(__name__)

# Failures (not interruptions) after which a configuration is given up; up to this many retries follow failures.
MAX_RETRY = 3
# User attributes a retry inherits: failures so far, and the epochs already stored when this run began.
FAILURES_ATTR = "failures"
STARTED_AT_ATTR = "started_at_epoch"

# Optuna >= 4.9 names the callback RetryHeartbeatStaleTrialCallback, and RDBStorage's argument for it
# heartbeat_stale_trial_callback; older versions RetryFailedTrialCallback and failed_trial_callback.
_NEW_NAMES = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
RETRY_CALLBACK = (
    optuna.storages.RetryHeartbeatStaleTrialCallback if _NEW_NAMES else optuna.storages.RetryFailedTrialCallback
)
STALE_CALLBACK_ARG = "heartbeat_stale_trial_callback" if _NEW_NAMES else "failed_trial_callback"


class Requeue:
    """Re-queue an ended trial unless it has failed more than MAX_RETRY times; ``interrupted``: a signal ended it."""

    def __init__(self, *, interrupted: bool = False) -> None:
        self.interrupted = interrupted

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        epochs = len(curve(trial))  # a multi-objective trial's epochs are its curve attr (no intermediate values there)
        progressed = epochs > int(trial.user_attrs.get(STARTED_AT_ATTR, 0))
        failures = int(trial.user_attrs.get(FAILURES_ATTR, 0)) + (0 if self.interrupted or progressed else 1)
        if failures > MAX_RETRY:
            logger.warning("trial %d failed %d times without progress: not re-queued", trial.number, failures)
            return
        queued = copy.deepcopy(trial)
        queued.set_user_attr(FAILURES_ATTR, failures)
        queued.set_user_attr(STARTED_AT_ATTR, epochs)
        # No limit of Optuna's own: the count above is the limit.
        RETRY_CALLBACK(max_retry=None, inherit_intermediate_values=True)(study, queued)


def retry_callback(*, interrupted: bool = False) -> Requeue:
    """The callback that re-queues reaped trials (and, with ``interrupted``, trials stopped by a signal)."""
    return Requeue(interrupted=interrupted)
