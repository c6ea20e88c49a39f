"""One summary of a study: its trials by state, its best trial, what pruning saved. Printed by ``hpo.run`` and
``hpo.report``, tabled in the report page, written as ``summary.json``."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import optuna

Value = Union[int, float, str]


@dataclass(frozen=True)
class BestTrial:
    number: int
    value: float
    params: Mapping[str, Value]
    val_accuracy: float | None  # at the best epoch, fraction in [0, 1]
    best_epoch: int | None


@dataclass(frozen=True)
class FrontTrial:
    """A trial of a multi-objective study's Pareto front (complete, feasible, dominated by none)."""

    number: int
    values: Mapping[str, float]  # objective name → value, in the study's order
    params: Mapping[str, Value]


@dataclass(frozen=True)
class Summary:
    """The report's table, and ``summary.json``."""

    study: str
    storage: str  # password shown as ***
    model: str | None  # [model] name the trials trained (None: a study hpo.run did not create)
    metric: str
    direction: str
    generated_at: str  # ISO 8601, UTC
    trials: int
    states: Mapping[str, int]  # every Optuna trial state → count
    best: BestTrial | None
    max_epochs: int  # per trial: as the study was started with (hpo.studyfile.stored), else the study file's
    # Over finished (complete and pruned) trials: epochs reported, and finished trials x max_epochs.
    epochs_trained: int
    epochs_without_pruning: int
    epochs_saved_fraction: float  # 1 - trained / without pruning; 0 with no finished trial
    training_seconds: float  # sum of the finished trials' wall-clock durations
    # The objectives (names, directions; one for a single-objective study) and, for several, the Pareto front
    # by trial number (None for one objective: see best).
    objectives: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()
    front: tuple[FrontTrial, ...] | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def summarize(study: optuna.Study, *, storage_shown: str, metric: str, max_epochs: int) -> Summary:
    from optuna.trial import TrialState

    from hpo.tuning.budget import FINISHED_STATES, lineage_tips
    from hpo.tuning.pareto import curve, objective_names, pareto_front
    from hpo.tuning.records import best_curve_epoch
    from hpo.tuning.study import MODEL_ATTR

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in FINISHED_STATES]
    names = tuple(objective_names(study))
    multi = len(study.directions) > 1
    front = None
    if multi:
        front = tuple(
            FrontTrial(number=t.number, values=dict(zip(names, t.values)), params=dict(t.params)) for t in pareto_front(study)
        )
    best = None
    if not multi and any(t.state == TrialState.COMPLETE for t in trials):
        trial = study.best_trial
        accuracy = trial.user_attrs.get("val_accuracy")
        epoch = best_curve_epoch(trial, metric)
        best = BestTrial(
            number=trial.number,
            value=float(trial.value),  # type: ignore[arg-type]
            params=dict(trial.params),
            val_accuracy=accuracy if isinstance(accuracy, float) else None,
            best_epoch=epoch if isinstance(epoch, int) else None,
        )
    configurations = [t for t in lineage_tips(trials) if t.state in FINISHED_STATES]  # a resumed one once
    trained, without = sum(len(curve(t)) for t in configurations), len(configurations) * max_epochs
    return Summary(
        study=study.study_name,
        storage=storage_shown,
        model=study.user_attrs.get(MODEL_ATTR),
        metric=metric,
        direction=study.directions[0].name.lower(),
        generated_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        trials=len(trials),
        states={state.name: sum(t.state == state for t in trials) for state in TrialState},
        best=best,
        max_epochs=max_epochs,
        epochs_trained=trained,
        epochs_without_pruning=without,
        epochs_saved_fraction=1 - trained / without if without else 0.0,
        training_seconds=sum(t.duration.total_seconds() for t in finished if t.duration is not None),
        objectives=names,
        directions=tuple(d.name.lower() for d in study.directions),
        front=front,
    )



def format_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def states_text(summary: Summary) -> str:
    return ", ".join(f"{name} {count}" for name, count in summary.states.items() if count) or "none"


def best_text(summary: Summary) -> str:
    """"#N: val_loss 0.1234, val_accuracy 56.78% at epoch E", or why there is no best trial."""
    best = summary.best
    if best is None:
        return "no completed trial yet"
    accuracy = f", val_accuracy {best.val_accuracy:.2%}" if best.val_accuracy is not None else ""
    epoch = f" at epoch {best.best_epoch}" if best.best_epoch is not None else ""
    return f"#{best.number}: {summary.metric} {best.value:.4f}{accuracy}{epoch}"


def _objective_text(value: float) -> str:
    # Counts (params, macs) in full: 4 significant digits would print 14,426 parameters as 1.443e+04.
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1000 else f"{value:.4g}"


def front_member_text(trial: FrontTrial) -> str:
    """"#N: val_loss 0.9123, params 14426"."""
    return f"#{trial.number}: " + ", ".join(f"{name} {_objective_text(value)}" for name, value in trial.values.items())


def front_lines(summary: Summary) -> list[str]:
    """A multi-objective study's Pareto front: one line per trial, its hyperparameters on the next."""
    assert summary.front is not None
    shown = ", ".join(f"{name} ({direction})" for name, direction in zip(summary.objectives, summary.directions))
    if not summary.front:
        return [f"Objectives: {shown}", "Pareto front: no completed feasible trial yet."]
    count = f"{len(summary.front)} trial{'s' if len(summary.front) > 1 else ''}"
    lines = [f"Objectives: {shown}", f"Pareto front: {count} (complete, feasible, dominated by none)"]
    for trial in summary.front:
        lines.append(f"  {front_member_text(trial)}")
        lines.append("      " + ", ".join(f"{name}={format_value(value)}" for name, value in trial.params.items()))
    return lines


def summary_lines(summary: Summary) -> list[str]:
    """The summary as the commands print it: trials by state, the best trial and its hyperparameters (the Pareto
    front of a multi-objective study), epochs."""
    lines = [f"Study {summary.study!r} in {summary.storage}: {summary.trials} trials ({states_text(summary)})"]
    if summary.model is not None:
        lines.append(f"Model: {summary.model}")
    if summary.front is not None:
        lines += front_lines(summary)
    elif summary.best is None:
        lines.append("No completed trial yet.")
    else:
        lines.append(f"Best trial {best_text(summary)}")
        lines += [f"  {name} = {format_value(value)}" for name, value in summary.best.params.items()]
    lines.append(
        f"Epochs: {summary.epochs_trained} trained, {summary.epochs_without_pruning} without pruning "
        f"(saved {summary.epochs_saved_fraction:.0%}); {summary.training_seconds:.1f} s of training in finished trials"
    )
    return lines
