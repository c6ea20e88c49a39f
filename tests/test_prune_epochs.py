"""hpo asks the pruner only at the epochs where it can prune (``may_prune_at``), and gets the same verdicts.

Each ``should_prune`` reads every trial of the study from the storage (issue 20).  Here Optuna's real pruners
judge a trial at every epoch, and a twin trial with the same curve only at the epochs ``may_prune_at`` names:
a pruner never prunes elsewhere, and both trials are stopped at the same epoch.
"""

from __future__ import annotations

import dataclasses
import random

import optuna
import pytest

from hpo.studyfile.samplers import (
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    NopPrunerSpec,
    PercentilePrunerSpec,
    PrunerSpec,
    SuccessiveHalvingPrunerSpec,
    ThresholdPrunerSpec,
    may_prune_at,
)
from hpo.studyfile.spec import StudySpec, find_study, load_spec
from hpo.tuning.study import create_pruner

EPOCHS = 12
SPECS: dict[str, PrunerSpec] = {
    "median, warmup 3, every 2": MedianPrunerSpec(n_startup_trials=1, n_warmup_steps=3, interval_steps=2),
    "percentile, warmup 2": PercentilePrunerSpec(percentile=50.0, n_startup_trials=1, n_warmup_steps=2),
    "threshold, warmup 4, every 3": ThresholdPrunerSpec(upper=1.5, n_warmup_steps=4, interval_steps=3),
    "halving, rungs 1 2 4 8": SuccessiveHalvingPrunerSpec(min_resource=1, reduction_factor=2),
    "halving, rungs 6": SuccessiveHalvingPrunerSpec(min_resource=2, reduction_factor=3, min_early_stopping_rate=1),
}


def _spec(pruner: PrunerSpec) -> StudySpec:
    return dataclasses.replace(load_spec(find_study("quick")), pruner=pruner)


def _judge(study: optuna.Study, curve: list[float], *, ask_when: object) -> int | None:
    """The epoch at which the pruner stops a trial with this curve, asking only where ``ask_when(epoch)``."""
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)
        if ask_when(epoch) and trial.should_prune():  # type: ignore[operator]
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, curve[-1])
    return None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_pruner_prunes_only_where_hpo_asks_and_at_the_same_epoch(name: str) -> None:
    spec = _spec(SPECS[name])
    for seed in range(4):
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        every = optuna.create_study(pruner=create_pruner(spec))
        sparse = optuna.create_study(pruner=create_pruner(spec))
        rng = random.Random(seed)
        for _ in range(6):  # finished trials to compare with, then trials that get worse than them
            good = [1.0 / e + rng.random() * 0.1 for e in range(1, EPOCHS + 1)]
            for study in (every, sparse):
                _judge(study, good, ask_when=lambda epoch: False)
        stopped = []
        for _ in range(6):
            bad = [1.0 + rng.random() + e * rng.random() * 0.2 for e in range(1, EPOCHS + 1)]
            at_every = _judge(every, bad, ask_when=lambda epoch: True)
            at_sparse = _judge(sparse, bad, ask_when=lambda epoch: may_prune_at(spec.pruner, epoch))
            assert at_every == at_sparse, f"{name}: pruned at {at_every} asking every epoch, at {at_sparse} asking as hpo does"
            assert at_every is None or may_prune_at(spec.pruner, at_every)
            stopped.append(at_every)
        assert any(epoch is not None for epoch in stopped), f"{name}: the bad trials were never pruned"


def test_the_epochs_each_pruner_can_prune_at() -> None:
    def at(pruner: PrunerSpec) -> list[int]:
        return [epoch for epoch in range(1, 20) if may_prune_at(pruner, epoch)]

    assert at(SuccessiveHalvingPrunerSpec(min_resource=1, reduction_factor=4)) == [1, 4, 16]
    assert at(MedianPrunerSpec(n_warmup_steps=3, interval_steps=5)) == [3, 8, 13, 18]
    assert at(NopPrunerSpec()) == []
    # Unknown rungs (min_resource "auto") and Hyperband's brackets: always asked.
    assert at(SuccessiveHalvingPrunerSpec(min_resource=None)) == at(HyperbandPrunerSpec()) == list(range(1, 20))
