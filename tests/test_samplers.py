"""Every sampler and pruner of a study file reaches Optuna with its arguments; the grid is enumerated."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo.studyfile.samplers import PRUNERS, SAMPLERS
from hpo.studyfile.spec import load_spec
from hpo.tuning.objective import suggest
from hpo.tuning.study import PRUNER_CLASSES, SAMPLER_CLASSES, GridSearch, create_pruner, create_sampler, grid_exhausted

SPACE = """
[space]
lr = { low = 1e-4, high = 1e-1, log = true }
depth = { low = 1, high = 3 }
optimizer = { choices = ["sgd", "adamw"] }
"""

# kind → (study file options, Optuna class, the keyword arguments hpo must pass it)
SAMPLER_CASES = {
    "tpe": ("n_startup_trials = 3\nmultivariate = true\nconstant_liar = false\ngroup = true", optuna.samplers.TPESampler,
            {"n_startup_trials": 3, "multivariate": True, "constant_liar": False, "group": True, "seed": 3}),
    "random": ("", optuna.samplers.RandomSampler, {"seed": 3}),
    "grid": ("", GridSearch, {"search_space": {"lr": (0.01,)}, "seed": 3}),
    "cmaes": ("n_startup_trials = 4\nsigma0 = 0.3\nwith_margin = true\npopsize = 6", optuna.samplers.CmaEsSampler,
              {"n_startup_trials": 4, "sigma0": 0.3, "with_margin": True, "lr_adapt": False, "popsize": 6,
               "consider_pruned_trials": False, "seed": 3}),
    "gp": ("n_startup_trials = 7\ndeterministic_objective = true", optuna.samplers.GPSampler,
           {"n_startup_trials": 7, "deterministic_objective": True, "seed": 3}),
    "qmc": ('qmc_type = "halton"\nscramble = true', optuna.samplers.QMCSampler,
            {"qmc_type": "halton", "scramble": True, "seed": 3}),
    "nsga2": ("population_size = 8\ncrossover_prob = 0.8", optuna.samplers.NSGAIISampler,
              {"population_size": 8, "mutation_prob": None, "crossover_prob": 0.8, "swapping_prob": 0.5, "seed": 3}),
}


def _spy(monkeypatch: pytest.MonkeyPatch, classes: dict, spec_type: type) -> list[dict]:
    """Record the keyword arguments hpo passes to the Optuna class built for ``spec_type``; still builds it."""
    real, calls = classes[spec_type], []

    def build(**kwargs: object) -> object:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setitem(classes, spec_type, build)
    return calls


def _spec(tmp_path: Path, text: str):
    path = tmp_path / "s.toml"
    path.write_text(text)
    return load_spec(path)


def test_every_sampler_has_a_case() -> None:
    assert set(SAMPLER_CASES) == set(SAMPLERS)


@pytest.mark.parametrize("kind", sorted(SAMPLER_CASES))
def test_sampler_and_its_arguments_reach_optuna(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options, cls, expected = SAMPLER_CASES[kind]
    space = SPACE if kind != "grid" else "[space]\nlr = { choices = [0.01] }\n"
    spec = _spec(tmp_path, f'[sampler]\ntype = "{kind}"\n{options}\n{space}')
    calls = _spy(monkeypatch, SAMPLER_CLASSES, type(spec.sampler))
    sampler = create_sampler(spec, seed=3)
    assert type(sampler) is cls
    assert calls == [expected]
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
    while not grid_exhausted(study) and len(study.trials) < 50:  # as hpo's worker loop asks, trains and tells
        trial = study.ask()
        study.tell(trial, suggest(trial, spec.space).lr)
    points = sorted((t.params["lr"], t.params["depth"], t.params["dropout"]) for t in study.trials)
    expected = sorted((lr, d, p) for lr in (1e-3, 1e-4) for d in (2, 3) for p in (0.0, 0.25, 0.5))
    assert points == expected, "each of the 12 points once, then the grid is exhausted"


PRUNER_CASES = {
    "median": ("n_startup_trials = 2\nn_warmup_steps = 1", optuna.pruners.MedianPruner,
               {"n_startup_trials": 2, "n_warmup_steps": 1, "interval_steps": 1}),
    "percentile": ("percentile = 40.0\nn_warmup_steps = 2", optuna.pruners.PercentilePruner,
                   {"percentile": 40.0, "n_startup_trials": 5, "n_warmup_steps": 2, "interval_steps": 1}),
    "successive_halving": ("min_resource = 2\nreduction_factor = 3", optuna.pruners.SuccessiveHalvingPruner,
                           {"min_resource": 2, "reduction_factor": 3, "min_early_stopping_rate": 0}),
    "hyperband": ("min_resource = 2", optuna.pruners.HyperbandPruner,
                  {"min_resource": 2, "max_resource": 9, "reduction_factor": 3}),
    "patient": ("patience = 2\nmin_delta = 0.01", optuna.pruners.PatientPruner,
                {"patience": 2, "min_delta": 0.01, "wrapped_pruner": None}),
    "threshold": ("upper = 3.0\nn_warmup_steps = 1", optuna.pruners.ThresholdPruner,
                  {"lower": None, "upper": 3.0, "n_warmup_steps": 1, "interval_steps": 1}),
    "none": ("", optuna.pruners.NopPruner, {}),
    # Optuna's pruner never judges: hpo pauses and promotes at the rungs (tests/test_promotion.py).
    "promotion_halving": ("min_resource = 2\nreduction_factor = 3", optuna.pruners.NopPruner, {}),
}


def test_every_pruner_has_a_case() -> None:
    assert set(PRUNER_CASES) == set(PRUNERS)


@pytest.mark.parametrize("kind", sorted(PRUNER_CASES))
def test_pruner_and_its_arguments_reach_optuna(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options, cls, expected = PRUNER_CASES[kind]
    spec = _spec(tmp_path, f'[train]\nmax_epochs = 9\n[pruner]\ntype = "{kind}"\n{options}\n')
    calls = _spy(monkeypatch, PRUNER_CLASSES, type(spec.pruner))
    assert type(create_pruner(spec)) is cls
    assert calls == [expected]


def test_successive_halving_lets_optuna_estimate_min_resource(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path, '[pruner]\ntype = "successive_halving"\n')
    calls = _spy(monkeypatch, PRUNER_CLASSES, type(spec.pruner))
    create_pruner(spec)
    assert calls[0]["min_resource"] == "auto"


@pytest.mark.parametrize(("kind", "options", "values"), [
    ("threshold", "upper = 3.0", [2.0, 5.0]),  # a diverging loss
    ("patient", "patience = 1", [1.0, 2.0, 2.0]),  # worse than the best for 2 epochs
])
def test_threshold_and_patient_pruners_from_a_study_file_prune(tmp_path: Path, kind: str, options: str, values: list) -> None:
    """Their public behaviour: no other trial is needed, so the first trial is pruned at the last value only."""
    study = optuna.create_study(pruner=create_pruner(_spec(tmp_path, f'[pruner]\ntype = "{kind}"\n{options}\n')))
    trial = study.ask()
    pruned = []
    for epoch, value in enumerate(values, start=1):
        trial.report(value, epoch)
        pruned.append(trial.should_prune())
    assert pruned == [False] * (len(values) - 1) + [True]
