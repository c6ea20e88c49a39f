"""Study file → Optuna sampler, pruner and study: created, resumed, or loaded for reading results."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import socket
from collections.abc import Sequence
from typing import Any

import optuna

from hpo.errors import SpecError, StorageError, UsageError, first_line
from hpo.studyfile.samplers import (
    CmaEsSamplerSpec,
    GpSamplerSpec,
    GridSamplerSpec,
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    NopPrunerSpec,
    NsgaIISamplerSpec,
    PatientPrunerSpec,
    PercentilePrunerSpec,
    PromotionHalvingPrunerSpec,
    QmcSamplerSpec,
    RandomSamplerSpec,
    SuccessiveHalvingPrunerSpec,
    ThresholdPrunerSpec,
    TpeSamplerSpec,
)
from hpo.studyfile.space import Choice, Distribution, Fixed, FloatRange, IntRange, grid
from hpo.studyfile.spec import DIRECTIONS, Overrides, StudySpec
from hpo.studyfile.stored import STARTED_WITH_ATTR, changes, refusal, started_with
from hpo.tuning.budget import finished_configurations
from hpo.tuning.outage import absorb_start_race
from hpo.tuning.pareto import CONSTRAINTS_ON_TRIALS, AttrConstraints, curves_study_name
from hpo.tuning.storage import check_existing_storage, open_storage, redact

logger = logging.getLogger(__name__)

# The study user attr naming the model its trials trained ([model] name: built-in, import path or
# registered name), so that hpo.best, the report and the dashboard know it without the study file.
MODEL_ATTR = "model"


class GridSearch(optuna.samplers.GridSampler):
    """Optuna's GridSampler for ask-and-tell workers: the worker loop stops once ``is_exhausted``.

    GridSampler.after_trial calls ``study.stop()``, which works only inside ``study.optimize`` and
    raises anywhere else, at the very end of a grid study, after the last trial was stored but before
    its worker could clean up.  hpo's workers ask and tell, so they check ``is_exhausted`` before
    each trial instead (:func:`grid_exhausted`).
    """

    def after_trial(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def grid_exhausted(study: optuna.Study) -> bool:
    """Whether the study is a grid search every point of which has been tried (or is being tried)."""
    return isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)


# Each spec dataclass's fields are its Optuna class's keyword arguments, named the same.
SAMPLER_CLASSES: dict[type, type[optuna.samplers.BaseSampler]] = {
    TpeSamplerSpec: optuna.samplers.TPESampler,
    RandomSamplerSpec: optuna.samplers.RandomSampler,
    GridSamplerSpec: GridSearch,
    CmaEsSamplerSpec: optuna.samplers.CmaEsSampler,
    GpSamplerSpec: optuna.samplers.GPSampler,
    QmcSamplerSpec: optuna.samplers.QMCSampler,
    NsgaIISamplerSpec: optuna.samplers.NSGAIISampler,
}


PRUNER_CLASSES: dict[type, type[optuna.pruners.BasePruner]] = {
    MedianPrunerSpec: optuna.pruners.MedianPruner,
    PercentilePrunerSpec: optuna.pruners.PercentilePruner,
    SuccessiveHalvingPrunerSpec: optuna.pruners.SuccessiveHalvingPruner,
    HyperbandPrunerSpec: optuna.pruners.HyperbandPruner,
    PatientPrunerSpec: optuna.pruners.PatientPruner,
    ThresholdPrunerSpec: optuna.pruners.ThresholdPruner,
    NopPrunerSpec: optuna.pruners.NopPruner,
    # Optuna's pruner is never asked: hpo pauses and promotes at the rungs (hpo.tuning.promotion).
    PromotionHalvingPrunerSpec: optuna.pruners.NopPruner,
}


def create_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    options: dict[str, Any] = dataclasses.asdict(spec.sampler)
    if isinstance(spec.sampler, GridSamplerSpec):
        options["search_space"] = {**grid(spec.space), **grid(spec.model.space)}
    cls = SAMPLER_CLASSES[type(spec.sampler)]
    if spec.study.constraints and not CONSTRAINTS_ON_TRIALS and "constraints_func" in inspect.signature(cls).parameters:
        # Optuna 4: the sampler reads the constraints through this function. Optuna 5 reads what each trial stores
        # with Trial.set_constraint. Samplers without constraints sample blind to them, and hpo's front
        # (hpo.tuning.pareto) leaves infeasible points out just the same.
        options["constraints_func"] = AttrConstraints(len(spec.study.constraints))
    return cls(**options, seed=seed)


def create_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    return PRUNER_CLASSES[type(spec.pruner)](**pruner_options(spec))


def pruner_options(spec: StudySpec) -> dict[str, Any]:
    """The keyword arguments of the study's Optuna pruner: the [pruner] table, with what it left open filled in.

    Hyperband's ``max_resource`` is filled in here, from the study's ``max_epochs`` after any
    ``--max-epochs``, never when the file is read.
    """
    pruner = spec.pruner
    options: dict[str, Any] = dataclasses.asdict(pruner)
    if isinstance(pruner, SuccessiveHalvingPrunerSpec) and pruner.min_resource is None:
        options["min_resource"] = "auto"  # estimated from the first finished trial
    if isinstance(pruner, HyperbandPrunerSpec) and pruner.max_resource is None:
        options["max_resource"] = spec.train.max_epochs
    if isinstance(pruner, PromotionHalvingPrunerSpec):
        return {}
    if isinstance(pruner, PatientPrunerSpec):
        options["wrapped_pruner"] = None  # patience alone decides
    return options


def sampler_seed(study_seed: int, *, worker_index: int, trials_so_far: int) -> int:
    """This process's sampler seed: reproducible, yet different for every worker, host and resumed run.

    With one seed for all, a resumed run or a second machine would propose the very same points
    again (the random sampler, and TPE's random start-up trials).  Trials' own training seeds do
    not depend on this; they come from the study seed and the trial number.
    """
    key = f"{study_seed}|{worker_index}|{trials_so_far}|{socket.gethostname()}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def _existing(storage: optuna.storages.BaseStorage, name: str) -> optuna.study.FrozenStudy | None:
    """The stored study of that name, with its attrs and directions, read without its trials.

    (Optuna's study summaries count every trial of every study in the database: at 10,000 trials that
    alone kept a joining worker seconds from its first trial, issue 20.)
    """
    for study in storage.get_all_studies():
        if study.study_name == name:
            return study
    return None


def open_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, worker_index: int = 0, overrides: Overrides = Overrides(),
    accept_changed: bool = False,
) -> optuna.Study:
    """Create the study, or resume it when one of that name already exists (also when another worker
    creates it in the same instant).  A resume whose trials would train differently (hpo.studyfile.stored)
    is refused unless ``accept_changed``; ``overrides`` (hpo.run's flags) only name where a change came from."""
    return absorb_start_race(
        "create the study",
        lambda: _open_study(spec, storage, worker_index=worker_index, overrides=overrides, accept_changed=accept_changed),
    )


def _open_study(
    spec: StudySpec, storage: optuna.storages.BaseStorage, *, worker_index: int, overrides: Overrides,
    accept_changed: bool,
) -> optuna.Study:
    directions = list(spec.study.directions)
    found = _existing(storage, spec.study.name)
    if found is not None:
        _check_directions(spec, [d.name.lower() for d in found.directions])
    stored_model = found.user_attrs.get(MODEL_ATTR) if found is not None else None
    if stored_model is not None and stored_model != spec.model.name:
        raise StorageError(
            f"{spec.path}: [model] study {spec.study.name!r} already exists with model {stored_model!r}, "
            f"not {spec.model.name!r}; choose another name (--study-name)"
        )
    stored = _stored_values(spec, found, overrides, accept_changed)
    study = optuna.create_study(
        storage=storage,
        study_name=spec.study.name,
        directions=directions,
        sampler=optuna.samplers.RandomSampler(),  # replaced below, once the trials so far are known
        # Optuna refuses trial.report in a multi-objective study: there the curves study's twin trials are pruned
        # (open_curves_study), and this study's pruner never runs.
        pruner=create_pruner(spec) if len(directions) == 1 else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    # The study's trials are read once, through its own cache, which the worker's budget count and Optuna's ask
    # then only bring up to date: a worker joining a study of 10,000 trials reads them once, not three times.
    trials = study.get_trials(deepcopy=False) if found is not None else []
    _check_distributions(spec, trials)
    study.sampler = create_sampler(spec, sampler_seed(spec.study.seed, worker_index=worker_index, trials_so_far=len(trials)))
    stored_names = study.metric_names
    if found is not None and stored_names is not None and len(stored_names) > 1 and stored_names != list(spec.study.objectives):
        # Same directions, other objectives (params for macs, say): the stored values would mean something else.
        raise StorageError(
            f"{spec.path}: [study] study {spec.study.name!r} already exists with objectives {stored_names!r}, not "
            f"{list(spec.study.objectives)!r}; choose another name (--study-name)"
        )
    study.set_metric_names(list(spec.study.objectives))  # the dashboard's names for the objectives
    if stored_model is None:
        study.set_user_attr(MODEL_ATTR, spec.model.name)
    if stored != started_with(spec):
        study.set_user_attr(STARTED_WITH_ATTR, started_with(spec))
    return study


def _stored_values(
    spec: StudySpec, found: optuna.study.FrozenStudy | None, overrides: Overrides, accept_changed: bool
) -> dict[str, object] | None:
    """The values the study was started with (None: a new study, or one from before hpo stored them); a
    resume with other ones raises a UsageError naming each, unless ``accept_changed`` (then they are replaced)."""
    stored = found.user_attrs.get(STARTED_WITH_ATTR) if found is not None else None
    if not isinstance(stored, dict):
        return None
    changed = changes(spec, stored, overrides)
    if changed and not accept_changed:
        raise UsageError(refusal(spec.study.name, changed))
    if changed:
        # Accepted: later trials (and hpo.best, the report) follow the new values; the log keeps the old.
        logger.warning("study %r continues with changed values: %s", spec.study.name, "; ".join(map(str, changed)))
    return stored


def _check_directions(spec: StudySpec, stored: list[str]) -> None:
    """A stored study resumes with the same directions (single-objective: the same one)."""
    if len(stored) == 1 and len(spec.study.directions) == 1:
        if stored[0] != spec.study.direction:
            raise StorageError(
                f"{spec.path}: [study] study {spec.study.name!r} already exists with direction "
                f"{stored[0]!r}, not {spec.study.direction!r}; choose another name (--study-name)"
            )
    elif stored != list(spec.study.directions):
        raise StorageError(
            f"{spec.path}: [study] study {spec.study.name!r} already exists with directions {stored!r}, not "
            f"{list(spec.study.directions)!r} (objectives {list(spec.study.objectives)!r}); choose another name (--study-name)"
        )


def open_curves_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The single-objective study beside a multi-objective one: each trial has a twin here that reports its
    learning curve (the first objective per epoch) and asks the study file's pruner whether to stop.

    Optuna's pruners then work unchanged, through Optuna's public API, and with many workers exactly as in a
    single-objective study: every decision reads the twins stored in the shared storage.
    """
    metric = spec.study.metric
    assert metric is not None

    def create() -> optuna.Study:
        study = optuna.create_study(
            storage=storage, study_name=curves_study_name(spec.study.name), direction=DIRECTIONS[metric],
            sampler=optuna.samplers.RandomSampler(),  # twins sample nothing: their parameters are their trial's
            pruner=create_pruner(spec), load_if_exists=True,
        )
        study.set_metric_names([metric])
        return study

    return absorb_start_race("create the curves study", create)


def optuna_distribution(dist: Distribution) -> optuna.distributions.BaseDistribution | None:
    """The Optuna distribution ``trial.suggest_*`` records for a [space] entry; None for a fixed value."""
    if isinstance(dist, FloatRange):
        return optuna.distributions.FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntRange):
        return optuna.distributions.IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, Choice):
        return optuna.distributions.CategoricalDistribution(dist.choices)
    return None


def _check_distributions(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial]) -> None:
    """An edited study file resumes only where Optuna can: the same choices for a categorical, the same
    kind and log scale for a range (a range's bounds may move).  Else one line naming the hyperparameter."""
    wanted = {
        name: optuna_distribution(dist)
        for name, dist in (*spec.space.entries, *spec.model.space.entries)
        if not isinstance(dist, Fixed)
    }
    for trial in trials:
        for name, stored in trial.distributions.items():
            new = wanted.pop(name, None)
            if new is None:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(stored, new)
            except ValueError as exc:
                raise SpecError(
                    f"{spec.path}: [space] {name}: the study {spec.study.name!r} searched it as {_shown(stored)}, "
                    f"the study file now as {_shown(new)} ({first_line(exc)}); keep it, or start another study "
                    "(--study-name)"
                ) from None
        if not wanted:
            return


def _shown(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    assert isinstance(dist, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution))
    return f"{dist.low}..{dist.high}{' log' if dist.log else ''}"


def load_existing_study(url: str, source: str, name: str, *, flag: str) -> optuna.Study:
    """The study of that name, for reading results; never creates a database or a study."""
    check_existing_storage(url, source)
    storage = open_storage(url, source)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise StorageError(
            f"{flag}: no study {name!r} in {redact(url)} (studies there: {', '.join(sorted(names)) or 'none'})"
        )
    return optuna.load_study(study_name=name, storage=storage)


def count_finished(study: optuna.Study) -> int:
    """Configurations finished for the budget (hpo.tuning.budget): a resumed or retried trial's lineage counts once."""
    return finished_configurations(study.get_trials(deepcopy=False))

