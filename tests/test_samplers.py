"""Every sampler and pruner of a study file reaches Optuna with its arguments; the grid is enumerated."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo.space import suggest
from hpo.spec import PRUNERS, SAMPLERS, load_spec
from hpo.study import create_pruner, create_sampler

SPACE = """
[space]
lr = { low = 1e-4, high = 1e-1, log = true }
depth = { low = 1, high = 3 }
optimizer = { choices = ["sgd", "adamw"] }
"""

SAMPLER_CASES = {
    "tpe": ("n_startup_trials = 3\nmultivariate = true\nconstant_liar = false\ngroup = true", optuna.samplers.TPESampler,
            lambda s: s._n_startup_trials == 3 and s._multivariate and not s._constant_liar and s._group),
    "random": ("", optuna.samplers.RandomSampler, lambda s: True),
    "grid": ("", optuna.samplers.GridSampler, lambda s: len(s._all_grids) == 1),  # one searched value combination below
    "cmaes": ("n_startup_trials = 4\nsigma0 = 0.3\nwith_margin = true\npopsize = 6", optuna.samplers.CmaEsSampler,
              lambda s: s._n_startup_trials == 4 and s._sigma0 == 0.3 and s._with_margin and s._popsize == 6),
    "gp": ("n_startup_trials = 7\ndeterministic_objective = true", optuna.samplers.GPSampler,
           lambda s: s._n_startup_trials == 7 and s._deterministic),
    "qmc": ('qmc_type = "halton"\nscramble = true', optuna.samplers.QMCSampler,
            lambda s: s._qmc_type == "halton" and s._scramble),
}


def _spec(tmp_path: Path, text: str):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return load_spec(path)


def test_every_sampler_has_a_case() -> None:
    assert set(SAMPLER_CASES) == set(SAMPLERS)


@pytest.mark.parametrize("kind", sorted(SAMPLER_CASES))
def test_sampler_and_its_arguments_reach_optuna(tmp_path: Path, kind: str) -> None:
    options, cls, check = SAMPLER_CASES[kind]
    space = SPACE if kind != "grid" else "[space]\nlr = { choices = [0.01] }\n"
    sampler = create_sampler(_spec(tmp_path, f'[sampler]\ntype = "{kind}"\n{options}\n{space}'), seed=3)
    assert type(sampler) is cls and check(sampler)
    # It samples the study's space (CMA-ES, GP and QMC hand categorical values to their independent sampler).
    study = optuna.create_study(sampler=sampler)
    spec = _spec(tmp_path, space)
    study.optimize(lambda t: suggest(t, spec.space).lr, n_trials=3)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_grid_search_enumerates_its_grid(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        '[sampler]\ntype = "grid"\n[space]\nlr = { choices = [1e-3, 1e-4] }\ndepth = { low = 2, high = 3 }\n'
        "dropout = { low = 0.0, high = 0.5, step = 0.25 }\n",
    )
    study = optuna.create_study(sampler=create_sampler(spec, seed=0))
    study.optimize(lambda t: suggest(t, spec.space).lr, n_trials=50)
    points = sorted((t.params["lr"], t.params["depth"], t.params["dropout"]) for t in study.trials)
    expected = sorted((lr, d, p) for lr in (1e-3, 1e-4) for d in (2, 3) for p in (0.0, 0.25, 0.5))
    assert points == expected, "each of the 12 points once, then the sampler stops the study"


PRUNER_CASES = {
    "median": ("n_startup_trials = 2\nn_warmup_steps = 1", optuna.pruners.MedianPruner, lambda p: p._n_startup_trials == 2),
    "percentile": ("percentile = 40.0\nn_warmup_steps = 2", optuna.pruners.PercentilePruner,
                   lambda p: p._percentile == 40.0 and p._n_warmup_steps == 2),
    "successive_halving": ("min_resource = 2\nreduction_factor = 3", optuna.pruners.SuccessiveHalvingPruner,
                           lambda p: p._min_resource == 2 and p._reduction_factor == 3),
    "hyperband": ("min_resource = 2", optuna.pruners.HyperbandPruner, lambda p: p._min_resource == 2 and p._max_resource == 9),
    "patient": ("patience = 2\nmin_delta = 0.01", optuna.pruners.PatientPruner,
                lambda p: p._patience == 2 and p._min_delta == 0.01 and p._wrapped_pruner is None),
    "threshold": ("upper = 3.0\nn_warmup_steps = 1", optuna.pruners.ThresholdPruner,
                  lambda p: p._upper == 3.0 and p._lower == float("-inf") and p._n_warmup_steps == 1),
    "none": ("", optuna.pruners.NopPruner, lambda p: True),
}


def test_every_pruner_has_a_case() -> None:
    assert set(PRUNER_CASES) == set(PRUNERS)


@pytest.mark.parametrize("kind", sorted(PRUNER_CASES))
def test_pruner_and_its_arguments_reach_optuna(tmp_path: Path, kind: str) -> None:
    options, cls, check = PRUNER_CASES[kind]
    pruner = create_pruner(_spec(tmp_path, f'[train]\nmax_epochs = 9\n[pruner]\ntype = "{kind}"\n{options}\n'))
    assert type(pruner) is cls and check(pruner)


def test_threshold_and_patient_pruners_prune() -> None:
    for pruner, values in (
        (optuna.pruners.ThresholdPruner(upper=3.0), [2.0, 5.0]),  # a diverging loss
        (optuna.pruners.PatientPruner(None, patience=1), [1.0, 2.0, 2.0]),  # worse than the best for 2 epochs
    ):
        study = optuna.create_study(pruner=pruner)
        trial = study.ask()
        pruned = []
        for epoch, value in enumerate(values, start=1):
            trial.report(value, epoch)
            pruned.append(trial.should_prune())
        assert pruned[-1] and not pruned[0]
