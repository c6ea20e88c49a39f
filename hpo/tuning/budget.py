"""The study's budget: how many finished trials it should hold, shared by every worker on every machine.

One rule, used by the worker loop and the objective alike: finished (COMPLETE, PRUNED) trials count
towards the budget, and RUNNING and WAITING trials hold a place in it.  A worker starts a trial only
while they leave room, waits while running trials may still fill the budget (one of them may die
and be re-queued), and stops once the finished trials reach it.  Two workers that start a trial in
the same instant can both see room; the later one's trial is then a surplus and fails before it
trains, so the study never ends with more finished trials than the budget.

The budget counts configurations, not trials: a trial re-queued after its worker died (hpo.tuning.retry)
or resumed after a pause at a rung (hpo.tuning.promotion) is the next trial of the same *lineage*, which
Optuna's retry attrs link (``failed_trial``: the first trial, ``retry_history``: every one before), and a
lineage holds one place, in the state of its last trial.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

# Trials finished for the budget: a pruned trial is a finished search decision too.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that hold a place in the budget.
HOLDING_STATES = (*FINISHED_STATES, TrialState.RUNNING, TrialState.WAITING)


def original_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first trial of ``trial``'s lineage (its own when it is no retry or resumption)."""
    failed = trial.system_attrs.get("failed_trial")
    return int(failed) if failed is not None else trial.number


def predecessor(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial this one was queued to go on from, or None for a new configuration."""
    history = trial.system_attrs.get("retry_history")
    return int(history[-1]) if history else None


def _successors(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[int, optuna.trial.FrozenTrial]:
    """Trial number → the trial that carries its lineage on: of several queued to go on from it (two workers
    promoting one paused trial in the same instant), the lowest-numbered; the others are duplicates."""
    successor: dict[int, optuna.trial.FrozenTrial] = {}
    for trial in trials:
        before = predecessor(trial)
        if before is not None and (before not in successor or trial.number < successor[before].number):
            successor[before] = trial
    return successor


def lineage_tips(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The last trial of every lineage: the one whose state is the configuration's."""
    successor = _successors(trials)
    if not successor:  # no retry, no resumption: every trial is its own lineage (most studies; one pass)
        return list(trials)
    tips = []
    for trial in trials:
        if predecessor(trial) is None:
            while trial.number in successor:
                trial = successor[trial.number]
            tips.append(trial)
    return tips


def duplicate(trial: optuna.trial.FrozenTrial, trials: Sequence[optuna.trial.FrozenTrial]) -> str | None:
    """Why ``trial`` is a second trial queued to go on from the same one (and must not train it twice), or None."""
    before = predecessor(trial)
    first = _successors(trials).get(before) if before is not None else None
    if first is not None and first.number < trial.number:
        return f"duplicate: trial {first.number} already goes on from trial {before}"
    return None


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
        return cls.count(study.get_trials(deepcopy=False))

    @classmethod
    def count(cls, every: Sequence[optuna.trial.FrozenTrial]) -> Tally:
        trials = lineage_tips(every)
        states = [trial.state for trial in trials]
        return cls(
            finished=sum(state in FINISHED_STATES for state in states),
            running=states.count(TrialState.RUNNING),
            # Every queued trial, a duplicate too: it is taken, fails untrained, and leaves nothing queued behind.
            waiting=sum(trial.state == TrialState.WAITING for trial in every),
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

    Counted ahead of it: the other lineages that hold a place (their last trial's state) and have a trial
    numbered below it; of two trials that took the last place at once, the later-numbered one fails.
    Trial numbers are dense from 0, so below the budget no surplus can be ahead of this trial, and
    the read of every trial is skipped.
    """
    if trial.number < budget:
        return None
    trials = trial.study.get_trials(deepcopy=False)
    own = next((original_number(t) for t in trials if t.number == trial.number), trial.number)
    # A lineage's first trial, whose number original_number gives, is its lowest-numbered one.
    ahead = sum(
        tip.state in HOLDING_STATES and original_number(tip) < trial.number
        for tip in lineage_tips(trials) if original_number(tip) != own
    )
    if ahead >= budget:
        return f"surplus: {ahead} trials already hold the budget of {budget}"
    return None


def finished_configurations(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """Configurations finished for the budget: lineages whose last trial is COMPLETE or PRUNED."""
    return sum(tip.state in FINISHED_STATES for tip in lineage_tips(trials))
