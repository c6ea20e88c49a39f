"""What a trial stores beside its params and curve, and how readers (report, summary, tests) get it back.

Every user attr is one storage write, so a trial writes few (issue 20): its ``seed`` when it starts, the
worker's claim ``worker`` (host, pid, the trial's number and what all the worker's trials share: device,
precision), and when it ends ``params`` (the model's size), ``val_accuracy`` at its best epoch,
``seconds_per_epoch`` and ``images_per_second``.  The epochs trained and the best epoch are read off the
reported curve.  Studies of hpo 0.2 stored host, pid, device, precision, epochs and best_epoch as attrs of
their own; the readers here accept both.
"""

from __future__ import annotations

import math

import optuna

from hpo.studyfile.spec import DIRECTIONS
from hpo.tuning.pareto import curve

# The user attr a worker writes when it takes a trial: a dict of the keys below and "trial" (its number).
WORKER_ATTR = "worker"
# The claim's keys shown as columns of their own (hpo.results.report), as hpo 0.2 stored them.
WORKER_FACTS = ("host", "pid", "device", "precision")


def worker_facts(trial: optuna.trial.FrozenTrial) -> dict[str, object]:
    """Who ran the trial, on what: host, pid, device and precision (those it has)."""
    facts = {key: trial.user_attrs[key] for key in WORKER_FACTS if key in trial.user_attrs}
    claim = trial.user_attrs.get(WORKER_ATTR)
    if isinstance(claim, dict):
        facts.update({key: claim[key] for key in WORKER_FACTS if key in claim})
    return facts


def best_curve_epoch(trial: optuna.trial.FrozenTrial, metric: str) -> int | None:
    """The epoch of the trial's best ``metric`` on its curve (the first of equals); None before any epoch."""
    points = [(epoch, value) for epoch, value in sorted(curve(trial).items()) if math.isfinite(value)]
    if not points:
        return None
    sign = -1.0 if DIRECTIONS[metric] == "maximize" else 1.0
    return min(points, key=lambda point: sign * point[1])[0]


def epochs_trained(trial: optuna.trial.FrozenTrial) -> int:
    """The last epoch the trial reported (0 before any): its retries' inherited epochs count too."""
    return max(curve(trial), default=0)
