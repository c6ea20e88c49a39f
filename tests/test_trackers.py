"""Experiment trackers switched on by [tracking] keys: what MLflow and TensorBoard hold afterwards, read back with
their own readers (MlflowClient.search_runs, TensorBoard's EventAccumulator)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import random_image_folder
from hpo.run import main
from hpo.studyfile.spec import load_spec
from hpo.tuning.trackers import TensorBoardTracker, tracker_callbacks


def _event_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _study_with(*trials: optuna.trial.FrozenTrial) -> optuna.Study:
    study = optuna.create_study(study_name="tracked")
    for trial in trials:
        study.add_trial(trial)
    return study


def _trial(state: TrialState, curve: dict[int, float], value: float | None = None) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=state, params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)},
        value=value, intermediate_values=curve,
    )


def test_tensorboard_gets_each_finished_trials_curve_and_no_failed_one(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the trackers extra)")
    study = _study_with(
        _trial(TrialState.COMPLETE, {1: 0.9, 2: 0.5}, value=0.5), _trial(TrialState.PRUNED, {1: 1.5}),
        _trial(TrialState.FAIL, {1: 2.0}),
    )
    tracker = TensorBoardTracker(str(tmp_path / "runs"), "val_loss")
    for trial in study.trials:
        tracker(study, trial)
    runs = tmp_path / "runs" / "tracked"
    assert _event_scalars(runs / "trial-0", "val_loss") == [(1, pytest.approx(0.9)), (2, pytest.approx(0.5))]
    assert _event_scalars(runs / "trial-1", "hparam/val_loss") == [(0, pytest.approx(1.5))], "a pruned trial: its last value"
    assert sorted(p.name for p in runs.iterdir()) == ["trial-0", "trial-1"], "a failed trial is tracked when its retry ends"


def test_a_tracker_that_fails_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the trackers extra)")
    blocked = tmp_path / "runs"
    blocked.write_text("a file where the folder should be")
    study = _study_with(_trial(TrialState.COMPLETE, {1: 0.9}, value=0.9))
    with caplog.at_level(logging.WARNING, logger="hpo.tuning.trackers"):
        TensorBoardTracker(str(blocked), "val_loss")(study, study.trials[0])
    assert "trial 0: TensorBoard did not take it" in caplog.text


def test_a_missing_tracker_library_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.chdir(tmp_path)
    study_file = tmp_path / "t.toml"
    study_file.write_text('[tracking]\nmlflow = "sqlite:///mlflow.db"\n')
    assert main(["--study", str(study_file), "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{study_file}: [tracking] mlflow needs mlflow, which is not installed: " in err, err
    assert 'pip install "hpo[trackers]"' in err and not (tmp_path / "hpo.db").exists()


def test_tracking_keys_are_checked_like_every_key(tmp_path: Path) -> None:
    from hpo.errors import SpecError

    path = tmp_path / "t.toml"
    path.write_text('[tracking]\ntensorboard = ""\n')
    with pytest.raises(SpecError, match=r"\[tracking\]: tensorboard must not be empty"):
        load_spec(path)
    path.write_text('[tracking]\nwandb = "x"\n')
    with pytest.raises(SpecError, match=r"\[tracking\]: unknown key 'wandb' \(known keys: mlflow, tensorboard\)"):
        load_spec(path)
    path.write_text("")
    assert tracker_callbacks(load_spec(path)) == []


@pytest.mark.slow
def test_a_search_logs_every_trial_to_mlflow_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow is not installed (the trackers extra)")
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the trackers extra)")
    import mlflow

    pictures = random_image_folder(tmp_path / "pictures", train=8, test=2, size=12, seed=4)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_file = tmp_path / "tracked.toml"
    study_file.write_text(
        f'[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\nimage_size = 12\n'
        '[train]\nmax_epochs = 2\ndevice = "cpu"\n[pruner]\ntype = "none"\n'
        "[space]\nlr = { low = 1e-3, high = 1e-1, log = true }\ndepth = 1\nbase_width = 4\nbatch_size = 8\n"
        f'[tracking]\nmlflow = "{tracking_uri}"\ntensorboard = "{(tmp_path / "runs").as_posix()}"\n'
    )
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="tracked", storage=url).trials

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    runs = {run.data.tags["number"]: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["0", "1"]
    for trial in trials:
        run = runs[str(trial.number)]
        assert run.data.params == {"lr": str(trial.params["lr"])} and run.data.tags["state"] == "COMPLETE"
        assert run.data.metrics["value"] == trial.value and run.data.tags["seed"] == str(trial.user_attrs["seed"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted((m.step, m.value) for m in history) == sorted(trial.intermediate_values.items())
        curve = _event_scalars(tmp_path / "runs" / "tracked" / f"trial-{trial.number}", "val_loss")
        assert curve == [(epoch, pytest.approx(value, rel=1e-6)) for epoch, value in sorted(trial.intermediate_values.items())]
