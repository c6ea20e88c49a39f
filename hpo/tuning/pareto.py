"""Multi-objective studies: feasibility under the study file's constraints, and the Pareto front.

A trial stores what its constraints measured as the user attr ``constraints`` (one number per
``[study] constraints`` entry, in the file's order: how far the objective is beyond its limit, in the
objective's units; <= 0 is within it), and on Optuna 5 through ``Trial.set_constraint`` under the
objective's name, which Optuna's samplers and ``Study.best_trials`` read.  On Optuna 4 the samplers
that take constraints read the user attr through :class:`AttrConstraints` (their ``constraints_func``).
The front and every "best" hpo shows consider feasible trials only, whatever the sampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optuna
from optuna.trial import TrialState

from hpo.studyfile.spec import OBJECTIVES, StudySection, direction_sign

# Optuna >= 5 stores constraints per trial (Trial.set_constraint); Optuna 4 only through a sampler's constraints_func.
CONSTRAINTS_ON_TRIALS = hasattr(optuna.trial.Trial, "set_constraint")
# The trial user attr holding the constraint values (see the module docstring).
CONSTRAINTS_ATTR = "constraints"
# The trial user attr holding the first objective's value after every epoch (index 0: epoch 1), the learning
# curve Optuna's trial.report cannot record in a multi-objective study.
CURVE_ATTR = "curve"
# The trial user attr naming the trial's twin in the curves study, which reports that curve to the pruner.
CURVE_TRIAL_ATTR = "curve_trial"
# The twin's user attr naming the trial of the multi-objective study it reports for.
TWIN_OF_ATTR = "trial"


def curves_study_name(study_name: str) -> str:
    """The single-objective study beside a multi-objective one, where each trial's twin reports its curve."""
    return f"{study_name}:curves"


def constraint_values(study: StudySection, measured: Mapping[str, float]) -> list[float]:
    """How far each measured objective is beyond its limit (> 0: infeasible); 0 for one not measured yet."""
    values = []
    for name, limit in study.constraints.items():
        value = measured.get(name)
        values.append(0.0 if value is None else direction_sign(OBJECTIVES[name]) * (value - limit))
    return values


def violations(study: StudySection, measured: Mapping[str, float]) -> list[str]:
    """Each broken constraint as "params 1234567 > 1000000" (for a maximized objective, "<")."""
    broken = []
    for (name, limit), value in zip(study.constraints.items(), constraint_values(study, measured)):
        if value > 0:
            sign = ">" if OBJECTIVES[name] == "minimize" else "<"
            broken.append(f"{name} {measured[name]:.6g} {sign} {limit:.6g}")
    return broken


class AttrConstraints:
    """Optuna's ``constraints_func``: the trial's ``constraints`` user attr (feasible when it has none)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self, trial: optuna.trial.FrozenTrial) -> Sequence[float]:
        values = trial.user_attrs.get(CONSTRAINTS_ATTR)
        return [float(v) for v in values] if isinstance(values, list) else [0.0] * self.count


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    values = trial.user_attrs.get(CONSTRAINTS_ATTR)
    return not isinstance(values, list) or all(float(v) <= 0 for v in values)


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete, feasible trials no other such trial dominates, by number (Optuna's ``best_trials``
    when the constraints are recorded where Optuna reads them; also right when they are not)."""
    return front_of(study.get_trials(deepcopy=False), [d.name.lower() for d in study.directions])


def front_of(trials: Sequence[optuna.trial.FrozenTrial], directions: Sequence[str]) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front of ``trials`` (their complete, feasible ones dominated by none), by number."""
    signs = [direction_sign(d) for d in directions]
    candidates = [t for t in trials if t.state == TrialState.COMPLETE and feasible(t)]
    points = [[s * v for s, v in zip(signs, t.values)] for t in candidates]
    front = [t for t, p in zip(candidates, points) if not any(_dominates(q, p) for q in points)]
    return sorted(front, key=lambda t: t.number)


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names (Optuna's metric names, set by hpo.run), else values_0, values_1, ..."""
    names = study.metric_names
    return list(names) if names else [f"values_{i}" for i in range(len(study.directions))]


def values_text(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """"val_loss 0.9123, params 12345" for a complete trial."""
    return ", ".join(f"{name} {value:.6g}" for name, value in zip(objective_names(study), trial.values or ()))


def curve(trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    """The trial's first objective per epoch: its intermediate values, or in a multi-objective study its curve attr."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    values = trial.user_attrs.get(CURVE_ATTR)
    return {epoch: float(v) for epoch, v in enumerate(values, start=1)} if isinstance(values, list) else {}
