"""A trial that has trained its last epoch is complete, whatever the pruner would say there (issue 21)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import random_image_folder
from hpo.run import main

pytestmark = pytest.mark.slow

# Each pruner set to give its first verdict at epoch 2, the last: before, some of these trials ended PRUNED.
PRUNERS = {
    "median": "n_startup_trials = 0\nn_warmup_steps = 2",
    "percentile": "percentile = 1.0\nn_startup_trials = 0\nn_warmup_steps = 2",
    "successive_halving": "min_resource = 2\nreduction_factor = 2",
    "hyperband": "min_resource = 2\nmax_resource = 2\nreduction_factor = 2",
    "patient": "patience = 0\nmin_delta = 0.0",
    "threshold": "upper = 1e-9\nn_warmup_steps = 2",
}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image_folder(tmp_path_factory.mktemp("pictures"), train=8, test=2, size=12, seed=3)


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_trial_that_trained_its_last_epoch_is_complete_whatever_the_pruner(
    tmp_path: Path, pictures: Path, pruner: str
) -> None:
    study_file = tmp_path / "last.toml"
    study_file.write_text(
        f'[study]\nname = "last"\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\nimage_size = 12\n'
        '[train]\nmax_epochs = 2\ndevice = "cpu"\n[space]\nlr = { low = 1e-4, high = 1.0, log = true }\n'
        f'batch_size = 4\ndepth = 1\nbase_width = 4\n[pruner]\ntype = "{pruner}"\n{PRUNERS[pruner]}\n'
    )
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(study_file), "--n-trials", "5", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="last", storage=url).trials
    assert len(trials) == 5 and all(len(t.intermediate_values) == 2 for t in trials)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5, [t.user_attrs.get("pruned_reason") for t in trials]


def test_a_pruner_still_stops_trials_before_their_last_epoch(tmp_path: Path, pictures: Path) -> None:
    study_file = tmp_path / "early.toml"
    study_file.write_text(
        f'[study]\nname = "early"\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\nimage_size = 12\n'
        '[train]\nmax_epochs = 3\ndevice = "cpu"\n[space]\nlr = 0.01\nbatch_size = 4\ndepth = 1\nbase_width = 4\n'
        '[pruner]\ntype = "threshold"\nupper = 1e-9\nn_warmup_steps = 2\n'
    )
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="early", storage=url).trials
    assert [(t.state, len(t.intermediate_values)) for t in trials] == [(TrialState.PRUNED, 2)] * 2
