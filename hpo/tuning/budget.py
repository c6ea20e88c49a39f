"""The study's budget: how many finished trials it should hold, shared by every worker on every machine.

One rule, used by the worker loop and the objective alike: finished (COMPLETE, PRUNED) trials count
towards the budget, and RUNNING and WAITING trials hold a place in it.  A worker starts a trial only
while they leave room, waits while running trials may still fill the budget (one of them may die
and be re-queued), and stops once the finished trials reach it.  Two workers that start a trial in
the same instant can both see room; the later one's trial is then a surplus and fails before it
trains, so the study never ends with more finished trials than the budget.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

# Trials finished for the budget: a pruned trial is a finished search decision too.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that hold a place in the budget.
HOLDING_STATES = (*FINISHED_STATES, TrialState.RUNNING, TrialState.WAITING)


class Next(enum.Enum):
    START = "start a trial"
    WAIT = "wait: running trials may fill the budget, or one of them dies and is re-queued"
    STOP = "stop: the budget is met"


@dataclass(frozen=True)
class Tally:
    finished: int
    running: int
    waiting: int
    running_numbers: tuple[int, ...] = ()  # the RUNNING trials, which a waiting worker waits for

    @classmethod
    def of(cls, study: optuna.Study) -> Tally:
        trials = study.get_trials(deepcopy=False)
        states = [trial.state for trial in trials]
        return cls(
            finished=sum(state in FINISHED_STATES for state in states),
            running=states.count(TrialState.RUNNING),
            waiting=states.count(TrialState.WAITING),
            running_numbers=tuple(trial.number for trial in trials if trial.state == TrialState.RUNNING),
        )

    def next(self, budget: int) -> Next:
        if self.finished >= budget:
            return Next.STOP
        if self.waiting == 0 and self.finished + self.running >= budget:
            return Next.WAIT
        return Next.START


def surplus(trial: optuna.Trial, budget: int) -> str | None:
    """Why ``trial`` is over the budget (a later trial of two started in the same instant), or None.

    Trial numbers are dense from 0, so below the budget no surplus can be ahead of this trial, and
    the read of every trial is skipped.
    """
    if trial.number < budget:
        return None
    ahead = sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=HOLDING_STATES))
    if ahead >= budget:
        return f"surplus: {ahead} trials already hold the budget of {budget}"
    return None
