"""The search space reaches Optuna as written, with conditional hyperparameters only where they apply."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo.studyfile.space import Hyperparameters, from_params, parse_space, readme_table
from hpo.tuning.objective import suggest


def _sample(space_table: dict, n: int = 30) -> list[tuple[Hyperparameters, dict]]:
    space = parse_space(space_table)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        hp = suggest(trial, space)
        study.tell(trial, 0.0)
        out.append((hp, trial.params))
    return out


def test_ranges_and_choices_are_respected() -> None:
    for hp, params in _sample(
        {
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "batch_size": {"choices": [64, 128]},
            "depth": {"low": 2, "high": 4},
            "dropout": {"low": 0.0, "high": 0.5},
            "base_width": 24,
        }
    ):
        assert 1e-4 <= hp.lr <= 1e-1 and hp.batch_size in (64, 128) and 2 <= hp.depth <= 4
        assert 0.0 <= hp.dropout <= 0.5 and hp.base_width == 24
        assert set(params) == {"lr", "batch_size", "depth", "dropout"}, "fixed values are not searched"
        assert isinstance(hp.depth, int) and isinstance(hp.lr, float)


def test_distribution_types_reach_optuna() -> None:
    space = parse_space({"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "depth": {"low": 1, "high": 5, "step": 2}})
    study = optuna.create_study()
    trial = study.ask()
    suggest(trial, space)
    lr, depth = trial.distributions["lr"], trial.distributions["depth"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
    assert isinstance(depth, optuna.distributions.IntDistribution) and depth.step == 2


def test_momentum_is_sampled_only_for_optimizers_that_use_it() -> None:
    samples = _sample(
        {"optimizer": {"choices": ["sgd", "adamw", "rmsprop"]}, "momentum": {"low": 0.8, "high": 0.99}}, n=40
    )
    seen = set()
    for hp, params in samples:
        seen.add(hp.optimizer)
        assert ("momentum" in params) == (hp.optimizer in ("sgd", "rmsprop"))
    assert seen == {"sgd", "adamw", "rmsprop"}


def test_stored_params_rebuild_the_same_hyperparameters() -> None:
    table = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "optimizer": {"choices": ["sgd", "adamw"]}, "depth": 2}
    for hp, params in _sample(table, n=10):
        assert from_params(params, parse_space(table)) == hp


@pytest.mark.parametrize("bad", [{"lr": {"low": 1e-3}}, {"depth": {"low": 1, "high": 3, "step": 0.5}}])
def test_incomplete_or_fractional_ranges_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        parse_space(bad)


def test_the_readme_table_is_the_declaration() -> None:
    """docs/study-files.md's hyperparameter table is hpo.space.readme_table() verbatim: regenerate it after a change."""
    readme = (Path(__file__).parents[1] / "docs" / "study-files.md").read_text(encoding="utf-8")
    header = readme_table().splitlines()[0]
    assert header in readme
    start = readme.index(header)
    end = readme.index("\n\n", start)
    assert readme[start:end + 1] == readme_table()
