"""The Python API as a user calls it: ``hpo.search`` → ``hpo.retrain`` → ``hpo.save_model`` → ``hpo.write_report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import hpo
from conftest import FinishedStudy, write_study
from hpo.errors import HpoError


def test_import_hpo_loads_neither_torch_nor_optuna() -> None:
    code = "import sys, hpo; print('torch' in sys.modules, 'optuna' in sys.modules, callable(hpo.search))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False", "True"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_trials": 0}, "argument --n-trials: must be a positive integer, got 0"),
        ({"n_trials": 2, "grace_period": 5}, "argument --grace-period: must be above --heartbeat-interval (10 s), got 5"),
        ({"n_trials": 2, "device": "gpu"}, "argument --device: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ({"n_trials": 2, "study_name": " "}, "argument --study-name: must not be empty"),
    ],
)
def test_bad_search_arguments_raise_before_anything_is_stored(tmp_path: Path, kwargs: dict, message: str) -> None:
    study_file = write_study(tmp_path, archive=tmp_path / "unused.tar.gz")
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    with pytest.raises(HpoError) as raised:
        hpo.search(study_file, storage=storage, **kwargs)
    assert str(raised.value) == message
    assert not (tmp_path / "hpo.db").exists()


def test_unknown_study_raises_naming_it() -> None:
    with pytest.raises(HpoError, match="--study: unknown study 'no-such-study'"):
        hpo.search("no-such-study", n_trials=1)


def test_write_report_of_a_stored_study(tmp_path: Path) -> None:
    """No training: trials told by hand, as another tool could have written them."""
    study_file = write_study(tmp_path, archive=tmp_path / "unused.tar.gz", max_epochs=4)
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    for number, value in enumerate((0.9, 0.7, 0.8)):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        for epoch in range(1, 3 if number == 2 else 5):
            trial.report(value + 0.1 / epoch, epoch)
        if number == 2:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
    files = hpo.write_report(study, out=tmp_path / "report", study_file=study_file, storage_shown="here")
    summary = json.loads(files.summary.read_text(encoding="utf-8"))
    assert summary["trials"] == 3 and summary["best"]["number"] == 1 and summary["storage"] == "here"
    assert summary["epochs_trained"] == 4 + 4 + 2 and summary["epochs_without_pruning"] == 3 * 4, "max_epochs from the study file"
    assert files.page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert len(files.trials.read_text(encoding="utf-8").splitlines()) == 1 + 3
    override = hpo.write_report(study, out=tmp_path / "other", study_file=study_file, max_epochs=10)
    assert json.loads(override.summary.read_text(encoding="utf-8"))["epochs_without_pruning"] == 30


@pytest.mark.slow
def test_search_retrain_and_report_from_python(tmp_path: Path, archive: Path) -> None:
    study_file = write_study(tmp_path, archive=archive, max_epochs=2)
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    epochs: list[tuple[int, int]] = []
    study = hpo.search(study_file, n_trials=2, storage=storage, device="cpu", on_epoch=lambda n, r: epochs.append((n, r.epoch)))
    assert isinstance(study, optuna.Study) and study.study_name == "tiny"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert epochs == [(0, 1), (0, 2), (1, 1), (1, 2)], "on_epoch sees every epoch of every trial"
    again = hpo.search(study_file, n_trials=2, storage=storage, device="cpu")
    assert len(again.trials) == 2, "a study that holds its budget runs nothing more"

    saved = hpo.retrain(study, study_file=study_file)
    assert saved.trial == study.best_trial.number and saved.epochs == 2 and saved.study == "tiny"
    assert 0.0 <= saved.test_accuracy <= 1.0 and saved.train_images == 256 + 128
    path = tmp_path / "model.pt"
    hpo.save_model(saved, path)
    loaded = hpo.load_model(path)
    assert loaded.hyperparameters == saved.hyperparameters
    assert loaded.build()(__import__("torch").zeros(1, 3, 32, 32)).shape == (1, 10)

    files = hpo.write_report(study, out=tmp_path / "report", study_file=study_file)
    assert json.loads(files.summary.read_text(encoding="utf-8"))["trials"] == 2

    robust = hpo.retrain(study, study_file=study_file, top=2, seeds=1)
    stored = {t.number: study.user_attrs[f"reevaluated:trial{t.number}"]["mean"] for t in study.trials}
    assert robust.trial == min(stored, key=lambda number: stored[number]), "the best mean over 2 seeds is retrained"


def test_retrain_refuses_top_without_seeds(told_study: FinishedStudy) -> None:
    study = optuna.load_study(study_name="tiny", storage=told_study.url)
    with pytest.raises(HpoError, match=r"^argument --top: comparing the top 2 trials needs extra seeds \(--seeds S, S >= 1\)$"):
        hpo.retrain(study, top=2, study_file=told_study.study_file)


@pytest.mark.slow
def test_the_python_api_page_example_runs(tmp_path: Path, archive: Path) -> None:
    """docs/python-api.md's first example, run as written in a fresh folder, offline: CIFAR-10 from $HPO_DATA_ARCHIVE."""
    page = (Path(__file__).parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")
    example = page[page.index("```python\n") + len("```python\n"):page.index("```\n", page.index("```python"))]
    assert "hpo.search(" in example and "hpo.retrain(" in example and "hpo.write_report(" in example
    env = {**os.environ, "HPO_DATA_ARCHIVE": archive.as_posix(), "HPO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "quick-best.pt").is_file() and (tmp_path / "reports" / "quick" / "report.html").is_file()
