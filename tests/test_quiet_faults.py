"""Quiet faults that used to end in a traceback: a grid that runs out, an edited study file, passwords, odd names.

Each was first reproduced on the previous main (a traceback, exit 1, and something written); here each is
one line and exit code 2, with nothing written, or a clean exit 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import random_image_folder, write_study
from hpo.run import main
from hpo.studyfile.spec import load_spec
from hpo.tuning.objective import suggest
from hpo.tuning.storage import open_storage
from hpo.tuning.study import open_study

SECRET = "P@ss:w0rd"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image_folder(tmp_path_factory.mktemp("pictures"), train=8, test=2, size=12, seed=1)


def _study_file(folder: Path, pictures: Path, optimizers: str) -> Path:
    path = folder / "edited.toml"
    path.write_text(
        f'[study]\nname = "edited"\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\n'
        f'image_size = 12\n[train]\nmax_epochs = 1\ndevice = "cpu"\n[space]\nlr = {{ low = 1e-3, high = 1e-1, log = true }}\n'
        f"optimizer = {{ choices = {optimizers} }}\ndepth = 1\nbase_width = 4\n"
    )
    return path


def test_an_edited_categorical_is_one_line_naming_it_and_nothing_is_written(
    tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = open_study(load_spec(_study_file(tmp_path, pictures, '["sgd", "adamw"]')), open_storage(url, "--storage"))
    trial = study.ask()
    study.tell(trial, suggest(trial, load_spec(tmp_path / "edited.toml").space).lr)
    edited = _study_file(tmp_path, pictures, '["sgd", "adam"]')
    assert main(["--study", str(edited), "--n-trials", "3", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpo.run: error: {edited}: [space] optimizer: the study 'edited' searched it as choices "
                          "['sgd', 'adamw'], the study file now as choices ['sgd', 'adam']"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert len(optuna.load_study(study_name="edited", storage=url).trials) == 1, "no FAIL trial written"


def test_a_moved_range_resumes(tmp_path: Path, pictures: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    spec = load_spec(_study_file(tmp_path, pictures, '["sgd"]'))
    study = open_study(spec, open_storage(url, "--storage"))
    trial = study.ask()
    study.tell(trial, suggest(trial, spec.space).lr)
    moved = tmp_path / "edited.toml"
    moved.write_text(moved.read_text().replace("low = 1e-3, high = 1e-1", "low = 1e-4, high = 1e-2"))
    assert open_study(load_spec(moved), open_storage(url, "--storage")).trials[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg2://u:{SECRET}@host:5432/x",  # ":" moves the port: not a number
        f"postgresql+psycopg2://u:{SECRET.replace(':', '')}@127.0.0.1:1/x",  # "@" moves the host
        f"not a url {SECRET}@",
    ],
)
def test_a_storage_url_with_special_characters_is_one_line_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPO_STORAGE", url)
    assert main(["--study", "quick", "--n-trials", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpo.run: error: HPO_STORAGE: cannot parse storage URL") and err.count("\n") == 1, err
    assert "percent-encoded" in err and "w0rd" not in err and "Pss" not in err and "P@ss" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_study_name_with_a_control_character_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--study", "quick", "--n-trials", "1", "--study-name", "a\x00b"]) == 2
    assert capsys.readouterr().err == "hpo.run: error: argument --study-name: must be printable characters only, got 'a\\x00b'\n"
    (tmp_path / "nul.toml").write_text('[study]\nname = "x\\u0000y"\n')
    assert main(["--study", str(tmp_path / "nul.toml"), "--n-trials", "1"]) == 2
    assert "[study]: name must be printable characters only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nul.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("n_trials", [2, 3])
def test_a_grid_study_ends_with_exit_0_once_its_grid_is_exhausted(tmp_path: Path, archive: Path, n_trials: int) -> None:
    study_file = write_study(tmp_path, archive=archive, max_epochs=1, sampler="grid", lr="{ choices = [0.01, 0.05] }")
    study_file.write_text(study_file.read_text().replace("batch_size = { choices = [32, 64] }", "batch_size = 64")
                          .replace("depth = { low = 1, high = 2 }", "depth = 1")
                          .replace('optimizer = { choices = ["sgd", "adamw"] }', 'optimizer = "sgd"'))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "hpo.run", "--study", str(study_file), "--n-trials", str(n_trials), "--storage", url, "-q"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    study = optuna.load_study(study_name="tiny", storage=url)
    assert sorted(t.params["lr"] for t in study.trials) == [0.01, 0.05]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert not any((tmp_path / "hpo-checkpoints").rglob("*.pt")), "no checkpoint left behind"


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_every_database_session_is_in_utc_with_server_side_timeouts(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the client's zone (PGTZ, TZ), hpo's sessions read and write heartbeats in UTC, with bounds."""
    from faults import server_url

    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    engine = open_storage(server_url(server), "--storage").engine
    try:
        with engine.connect() as connection:
            if server == "postgresql":
                shown = {name: connection.exec_driver_sql(f"SHOW {name}").scalar()
                         for name in ("timezone", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")}
                assert shown == {"timezone": "UTC", "statement_timeout": "1min", "lock_timeout": "30s",
                                 "idle_in_transaction_session_timeout": "1min"}
            else:
                zone, wait = connection.exec_driver_sql("SELECT @@session.time_zone, @@session.innodb_lock_wait_timeout").one()
                assert (zone, int(wait)) == ("+00:00", 30)
            # The clock a heartbeat is written with reads as UTC in this session.
            offset = connection.exec_driver_sql(
                "SELECT EXTRACT(EPOCH FROM (LOCALTIMESTAMP - (now() AT TIME ZONE 'UTC')))" if server == "postgresql"
                else "SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())"
            ).scalar()
            assert abs(float(offset)) < 5
    finally:
        engine.dispose()


def test_a_trial_has_a_heartbeat_before_it_is_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed right after claiming its trial leaves a heartbeat that goes stale, so the trial is reaped;
    claimed first and killed before the heartbeat thread's first beat, the trial stayed RUNNING for ever."""
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.worker import run_worker

    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", "--storage", heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(study_name="order", storage=storage)
    events: list[str] = []
    real_beat, real_attr = storage.record_heartbeat, optuna.Trial.set_user_attr
    monkeypatch.setattr(storage, "record_heartbeat", lambda trial_id: (events.append("heartbeat"), real_beat(trial_id)))

    def set_user_attr(trial: optuna.Trial, key: str, value: object) -> None:
        events.append(f"attr {key}")
        real_attr(trial, key, value)

    monkeypatch.setattr(optuna.Trial, "set_user_attr", set_user_attr)
    run_worker(
        study, lambda trial: 1.0, storage=storage, guard=StorageGuard(shown="test"), budget=1, timeout=None,
        heartbeat_interval=60, grace_period=180,
    )
    assert events.index("heartbeat") < events.index("attr worker"), events
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_a_worker_waiting_at_the_end_of_the_study_names_the_trials_it_waits_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.worker import run_worker

    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", "--storage")
    study = optuna.create_study(study_name="waiting", storage=storage)
    study.tell(study.ask(), 1.0)
    study.ask()  # trial 1: RUNNING under another worker, holding the budget's last place
    with caplog.at_level(logging.INFO, logger="hpo.tuning.worker"):
        ran = run_worker(
            study, lambda trial: 1.0, storage=storage, guard=StorageGuard(shown="test"), budget=2, timeout=1.0,
            heartbeat_interval=None, grace_period=30,
        )
    assert ran == 0
    assert "budget taken by running trials 1; waiting in case one of them dies" in caplog.messages


@pytest.mark.parametrize("moment", ["claim", "suggest"])
def test_a_trial_ended_under_its_worker_before_training_does_not_end_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """A trial failed by someone else (a reaper, the dashboard) at the claim or while its parameters are sampled:
    the worker goes on with the next trial instead of exiting with code 1 (which uses up a Job's backoff limit)."""
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.worker import run_worker

    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", "--storage")
    study = optuna.create_study(study_name="ended", storage=storage)
    ended: list[int] = []
    real_attr = optuna.Trial.set_user_attr

    def end_it(trial: optuna.Trial) -> None:
        if not ended:
            ended.append(trial.number)
            study.tell(trial.number, state=TrialState.FAIL)  # as a reaper in another process would

    def set_user_attr(trial: optuna.Trial, key: str, value: object) -> None:
        if moment == "claim" and key == "worker":
            end_it(trial)
        real_attr(trial, key, value)

    def objective(trial: optuna.Trial) -> float:
        if moment == "suggest":
            end_it(trial)
        return trial.suggest_float("x", 0.0, 1.0)

    monkeypatch.setattr(optuna.Trial, "set_user_attr", set_user_attr)
    ran = run_worker(
        study, objective, storage=storage, guard=StorageGuard(shown="test"), budget=2, timeout=None,
        heartbeat_interval=None, grace_period=30,
    )
    assert ended == [0] and ran == 3
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


@pytest.mark.slow
def test_a_study_created_again_under_its_name_never_resumes_the_old_studys_weights(tmp_path: Path, pictures: Path) -> None:
    """The old study's trial 0 left a checkpoint (it failed after an epoch); the study was deleted and created again,
    and its new trial 0 failed and was re-queued: the retry starts afresh instead of from the old weights."""
    import torch

    from hpo.training.datasets import load_dataset
    from hpo.training.fit import fit
    from hpo.training.recipe import seeded_model, train_config
    from hpo.training.splits import carve_validation
    from hpo.tuning.objective import Objective
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.retry import retry_callback
    from hpo.tuning.worker import run_worker

    spec = load_spec(_study_file(tmp_path, pictures, '["sgd"]'))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    data = carve_validation(load_dataset(spec.data), spec.data)
    objective = Objective(spec=spec, data=data, device=torch.device("cpu"), checkpoint_dir=tmp_path / "ck",
                          guard=StorageGuard(shown="test"))

    old = open_study(spec, open_storage(url, "--storage"))
    old_trial = old.ask()
    hp = suggest(old_trial, spec.space)
    old_path = objective.checkpoint_path(old.trials[0].number, old.trials[0].datetime_start)
    fit(seeded_model(spec, hp, data, 0), data, train_config(spec, hp, seed=0, device=torch.device("cpu")),
        checkpoint=old_path, stop_after=1)
    assert old_path.is_file()
    optuna.delete_study(study_name="edited", storage=url)

    storage = open_storage(url, "--storage")
    new = open_study(spec, storage)
    new_trial = new.ask()
    suggest(new_trial, spec.space)
    retry_callback()(new, new.tell(new_trial, state=TrialState.FAIL))  # as a reaper does: trial 1 retries trial 0
    run_worker(new, objective, storage=storage, guard=objective.guard, budget=1, timeout=None,
               heartbeat_interval=None, grace_period=30, callbacks=[objective.on_trial_end])
    retry = new.trials[1]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert "resumed_from_epoch" not in retry.user_attrs, "resumed from the deleted study's checkpoint"
    assert old_path.is_file(), "the old study's file is not touched"


def _release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("\n")
    process.stdin.flush()


# A stand-in for a worker's dataset download: inside the download lock it says so, then waits to be released.
DOWNLOADER = """
import logging, sys
from pathlib import Path
from hpo.training.datasets import download_lock
logging.basicConfig(level=logging.INFO, format="%(message)s")
root, name = Path(sys.argv[1]), sys.argv[2]
with download_lock(root):
    (root / f"{name}-inside").touch()
    sys.stdin.readline()  # released by the test: a line on stdin
"""


def test_workers_on_an_empty_data_folder_download_one_at_a_time(tmp_path: Path) -> None:
    from faults import wait_for

    root = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    processes: list[subprocess.Popen[str]] = []

    def downloader(name: str) -> subprocess.Popen[str]:
        processes.append(subprocess.Popen([sys.executable, "-c", DOWNLOADER, str(root), name], env=env, text=True,
                                          stdin=subprocess.PIPE, stderr=subprocess.PIPE))
        return processes[-1]

    first = downloader("first")
    try:
        wait_for(lambda: (root / "first-inside").exists(), 60, "the first download to start")
        second = downloader("second")
        assert second.stderr is not None
        line = wait_for(second.stderr.readline, 60, "the second process to report its wait")
        assert f"waiting for another process's download into {root}" in str(line)
        assert not (root / "second-inside").exists(), "two downloads into one folder at once"
        _release(first)
        wait_for(lambda: (root / "second-inside").exists(), 60, "the second download to start after the first")
        _release(second)
        assert second.wait(timeout=60) == 0 and first.wait(timeout=60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


@pytest.mark.slow
def test_a_worker_stuck_in_its_trial_stops_beating_and_another_finishes_the_study(tmp_path: Path) -> None:
    """A model that hangs in epoch 2 (faults.GATED_MODEL, never released): a worker alive but stuck, as on a hung
    device call, while its heartbeat thread goes on.  Epoch 1 ends (and is checkpointed) first."""
    from faults import GatedStudy

    study = GatedStudy(tmp_path, max_epochs=12, hang_after=1)
    study.token.touch()
    stall = ("--stall-timeout", "8", "-q")
    stuck = study.worker(2, *stall)
    try:
        study.held(stuck)
        other = study.worker(2, *stall)
        assert other.wait(timeout=180) == 0, other.output
    finally:
        stuck.kill()
    stuck.wait(timeout=60)
    assert "no progress on this worker's trial" in stuck.output and "--stall-timeout 8 s" in stuck.output, stuck.output
    trials = study.trials()
    assert trials[0].state == TrialState.FAIL
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 3
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
