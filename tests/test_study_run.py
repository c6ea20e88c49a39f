"""Real tiny studies on generated images of CIFAR-10's shape (conftest.image_archive), run through ``python -m hpo.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import missing, write_study
from hpo.run import main

pytestmark = pytest.mark.slow


def _run(study_file: Path, url: str, n_trials: int, *extra: str) -> int:
    return main(["--study", str(study_file), "--n-trials", str(n_trials), "--storage", url, "--quiet", *extra])


def test_tiny_study_end_to_end(tmp_path: Path, image_archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = write_study(tmp_path, archive=image_archive, max_epochs=2)
    assert _run(study_file, url, 3) == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2], "validation loss is reported every epoch"
        assert trial.value == min(trial.intermediate_values.values())
        attrs = trial.user_attrs
        assert {"seed", "val_accuracy", "seconds_per_epoch", "images_per_second", "params", "worker"} <= set(attrs)
        assert attrs["worker"]["device"] == "cpu" and attrs["worker"]["trial"] == trial.number and attrs["params"] > 0
        assert 0.0 <= attrs["val_accuracy"] <= 1.0
        assert set(trial.params) >= {"lr", "batch_size", "depth", "optimizer"}
    assert len({t.user_attrs["seed"] for t in study.trials}) == 3, "every trial has its own seed"
    out = capsys.readouterr().out
    assert "Study 'tiny'" in out and "COMPLETE 3" in out and "Best trial" in out and "val_accuracy" in out
    assert f"optuna-dashboard {url}" in out


def test_budget_is_the_study_total_and_a_rerun_resumes(tmp_path: Path, image_archive: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = write_study(tmp_path, archive=image_archive, max_epochs=1)
    assert _run(study_file, url, 2) == 0
    assert _run(study_file, url, 2) == 0, "the budget is reached: nothing runs"
    assert len(optuna.load_study(study_name="tiny", storage=url).trials) == 2
    assert _run(study_file, url, 3) == 0, "a larger budget resumes the same study"
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.trials[2].params["lr"] not in {t.params["lr"] for t in study.trials[:2]}, (
        "a resumed run's sampler does not propose the first run's points again"
    )


def test_a_pruner_set_to_prune_prunes(tmp_path: Path, image_archive: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    # lr 1e-6 barely moves the weights; after one finished trial the median pruner cuts such trials at epoch 1.
    study_file = write_study(
        tmp_path, archive=image_archive, max_epochs=3, pruner='type = "median"\nn_startup_trials = 1\nn_warmup_steps = 0',
        lr="{ choices = [0.000001, 0.05] }",
    )
    assert _run(study_file, url, 8) == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in study.trials]
    for trial in pruned:
        assert len(trial.intermediate_values) < 3
        assert trial.user_attrs["pruned_reason"].startswith("pruned at epoch")
    assert len(study.trials) == 8, "pruned trials count towards the budget"


def test_the_optuna_command_line_reads_the_study(tmp_path: Path, image_archive: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert _run(write_study(tmp_path, archive=image_archive, max_epochs=1), url, 2) == 0
    cli = Path(sys.executable).parent / "optuna"
    studies = subprocess.run([str(cli), "studies", "--storage", url, "-f", "json"], capture_output=True, text=True, check=True)
    assert [s["name"] for s in json.loads(studies.stdout)] == ["tiny"]
    trials = subprocess.run(
        [str(cli), "trials", "--study-name", "tiny", "--storage", url, "-f", "json"], capture_output=True, text=True, check=True
    )
    rows = json.loads(trials.stdout)
    assert len(rows) == 2 and all(row["state"] == "COMPLETE" for row in rows)


@pytest.mark.parametrize(
    ("variable", "driver"),
    [("HPO_TEST_POSTGRES_URL", None), ("HPO_TEST_POSTGRES_URL", "postgresql+psycopg"), ("HPO_TEST_MYSQL_URL", None)],
    ids=["postgresql", "postgresql-psycopg3", "mysql"],
)
def test_study_on_a_real_database_server(tmp_path: Path, image_archive: Path, variable: str, driver: str | None) -> None:
    from sqlalchemy.engine import make_url

    url = os.environ.get(variable)
    if not url:
        missing("mysql" if "MYSQL" in variable else "postgresql", f"{variable} is not set (.ci/run sets it)")
    if driver is not None:  # the same server through another driver: psycopg 3 is installed with the test extra
        url = make_url(url).set(drivername=driver).render_as_string(hide_password=False)
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    study_file = write_study(tmp_path, archive=image_archive, name=name, max_epochs=1)
    try:
        assert _run(study_file, url, 2) == 0
        study = optuna.load_study(study_name=name, storage=url)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert all(sorted(t.intermediate_values) == [1] for t in study.trials)
    finally:
        optuna.delete_study(study_name=name, storage=url)
