"""The notes optuna-dashboard shows on pruned trials: why the pruner stopped each one.

The objective emits a :class:`Pruned` event when it prunes a trial; :func:`write_pruning_note`
turns it into markdown and attaches it to the trial.  optuna-dashboard is an optional extra
(``pip install -e ".[dashboard]"``): without it nothing is written, and the ``pruned_reason`` user
attr still says why a trial was pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpo.studyfile.samplers import MedianPrunerSpec, PercentilePrunerSpec, PrunerSpec

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Pruned:
    """What the objective knew when it pruned a trial."""

    epoch: int  # 1-based
    value: float  # the metric at that epoch
    best: float  # the trial's best value of the metric so far
    metric: str
    pruner: PrunerSpec  # the study file's pruner, which decided


# Why the pruners without one comparable threshold stop a trial, in a user's words.
_WHY = {
    "SuccessiveHalvingPruner": "it was not among the best share of the trials that reached this epoch's rung",
    "HyperbandPruner": "it was not among the best share of its bracket's trials at this epoch's rung",
    "PatientPruner": "its best value had not improved for the pruner's patience (in epochs)",
    "ThresholdPruner": "its value was outside the pruner's bounds, or not finite",
}


def _percentile(pruner: PrunerSpec) -> float | None:
    """The percentile the pruner compares with (the median is the 50th), or None when it compares with none."""
    if isinstance(pruner, MedianPrunerSpec):
        return 50.0
    if isinstance(pruner, PercentilePrunerSpec):
        return pruner.percentile
    return None


def pruning_note(trial: optuna.Trial, event: Pruned) -> str:
    """Markdown saying why ``trial`` was pruned: its values and what the pruner compared them to."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    study = trial.study
    epoch, metric = event.epoch, event.metric
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    lines = [
        f"**Pruned at epoch {epoch}** by {type(study.pruner).__name__}.",
        "",
        f"- {metric} at epoch {epoch}: {event.value:.4f}; best so far: {event.best:.4f}",
    ]
    percentile = _percentile(event.pruner)
    if percentile is not None:
        # What PercentilePruner.prune compares: this trial's best value so far against that percentile of
        # the completed trials' values at the same epoch (for maximizing, the mirrored percentile).
        others = [
            t.intermediate_values[epoch]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if epoch in t.intermediate_values and math.isfinite(t.intermediate_values[epoch])
        ]
        if others:
            effective = percentile if minimize else 100 - percentile
            threshold = float(np.percentile(others, effective))
            name = "median" if effective == 50 else f"{effective:g}th percentile"
            lines.append(
                f"- threshold: the {name} {threshold:.4f} of the {len(others)} completed trials' {metric} at epoch {epoch}; "
                f"the best so far is {'above' if minimize else 'below'} it"
            )
    else:
        why = _WHY.get(type(study.pruner).__name__, "the pruner stopped it")
        lines.append(f"- why: {why}; this pruner has no single threshold to show")
    return "\n".join(lines)


def write_pruning_note(trial: optuna.Trial, event: Pruned) -> None:
    """Attach :func:`pruning_note` to the trial for optuna-dashboard; nothing when it is not installed."""
    try:
        import optuna_dashboard
    except ImportError:
        return  # the pruned_reason user attr carries the short version
    optuna_dashboard.save_note(trial, pruning_note(trial, event))
