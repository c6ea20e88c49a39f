"""One run of bench/search.py: a finished search's figures, from its trials within the budget and its chosen trial."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import optuna

from hpo.results.retrain import best_first
from hpo.tuning.budget import predecessor


@dataclass(frozen=True)
class Run:
    config: str
    seed: int
    trials_finished: int  # configurations complete or pruned within the budget (a paused one resumed: once)
    trials_complete: int
    epochs_trained: int  # by the trials finished within the budget
    epochs_saved: float  # share of (trials_finished x max_epochs) that pruning did not train
    best_val_accuracy: float  # fraction, best complete trial's (at its best epoch)
    chosen_trial: int  # best complete trial by the study's objective: chosen on validation only
    chosen_value: float  # its objective value (the study's metric)
    test_accuracy: float  # the chosen trial retrained on training + validation data, tested once
    seconds_to_target: float | None  # None: the target was not reached within the budget
    curve: tuple[tuple[float, float], ...]  # (seconds since the first trial started, best val accuracy so far)

    def to_json(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "curve": [list(point) for point in self.curve]}

    @classmethod
    def from_json(cls, blob: dict[str, object]) -> Run:
        return cls(**{**blob, "curve": tuple(tuple(point) for point in blob["curve"])})  # type: ignore[arg-type, union-attr]


def finished_within(study: optuna.Study, budget_s: float) -> tuple[float, list[optuna.trial.FrozenTrial]]:
    """When the run started, and its complete or pruned trials that ended within ``budget_s`` of that."""
    trials = study.get_trials(deepcopy=False)
    started = min(t.datetime_start for t in trials if t.datetime_start is not None).timestamp()
    ended = [
        t for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        and t.datetime_complete is not None and t.datetime_complete.timestamp() - started <= budget_s
    ]
    return started, sorted(ended, key=lambda t: t.datetime_complete)  # type: ignore[arg-type, return-value]


def choose(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The best complete trial by the study's objective, which is computed on validation data only."""
    ranked = best_first(study, trials)
    if not ranked:
        raise SystemExit(f"study {study.study_name!r}: no trial completed within the budget; raise --budget")
    return ranked[0]


def outcome(
    config: str, seed: int, *, started: float, trials: list[optuna.trial.FrozenTrial], chosen: optuna.trial.FrozenTrial,
    max_epochs: int, target: float, test_accuracy: float,
) -> Run:
    """A finished run's figures: its trials finished within the budget, the chosen one and its test accuracy.

    A trial resumed after a pause (promotion halving) inherits its predecessor's curve: it counts only the epochs
    it trained, and the configuration counts once, as its last trial.
    """
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_number = {t.number: t for t in trials}
    before = {t.number: predecessor(t) for t in trials}
    inherited = sum(len(by_number[p].intermediate_values) for p in before.values() if p in by_number)
    epochs = sum(len(t.intermediate_values) for t in trials) - inherited
    resumed = set(before.values())  # trials another one went on from: their configuration counts as that one
    configurations = [t for t in trials if t.number not in resumed]
    curve: list[tuple[float, float]] = []
    best = -math.inf
    for t in complete:
        accuracy = float(t.user_attrs.get("val_accuracy", math.nan))
        if accuracy > best:
            best = accuracy
            curve.append((t.datetime_complete.timestamp() - started, best))  # type: ignore[union-attr]
    reached = next((s for s, accuracy in curve if accuracy >= target), None)
    return Run(
        config=config, seed=seed, trials_finished=len(configurations), trials_complete=len(complete),
        epochs_trained=epochs, epochs_saved=1 - epochs / (len(configurations) * max_epochs),
        best_val_accuracy=best, chosen_trial=chosen.number, chosen_value=float(chosen.value),  # type: ignore[arg-type]
        test_accuracy=test_accuracy, seconds_to_target=reached, curve=tuple(curve),
    )
