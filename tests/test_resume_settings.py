"""Resuming keeps the study's settings: the epochs, seed, subsets, split and image size a study was started with are
stored with it; a resume with other ones is one line naming each (exit 2, nothing written) unless
--accept-changed-overrides; hpo.best and hpo.report read the stored ones, not a study file edited since."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from conftest import random_image_folder
from hpo.launching.run_args import parse_run_args, worker_argv
from hpo.run import main
from hpo.studyfile.spec import load_spec
from hpo.studyfile.stored import STARTED_WITH_ATTR
from hpo.tuning.storage import open_storage
from hpo.tuning.study import open_study


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image_folder(tmp_path_factory.mktemp("pictures"), train=12, test=2, size=12, seed=3)


def _study_file(folder: Path, pictures: Path, *, extra_data: str = "", max_epochs: int = 1) -> Path:
    path = folder / "kept.toml"
    path.write_text(
        f'[study]\nname = "kept"\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\n'
        f'image_size = 12\nval_fraction = 0.25\n{extra_data}[train]\nmax_epochs = {max_epochs}\ndevice = "cpu"\n'
        '[pruner]\ntype = "none"\n[space]\nlr = { low = 1e-3, high = 1e-1, log = true }\ndepth = 1\nbase_width = 4\n'
        "batch_size = 8\n"
    )
    return path


def _started(tmp_path: Path, pictures: Path) -> tuple[str, Path]:
    """A study created from its study file, no trial yet: (storage URL, study file)."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, pictures)
    open_study(load_spec(study_file), open_storage(url, "--storage"))
    return url, study_file


def _one_line_error(capsys: pytest.CaptureFixture[str], prog: str = "hpo.run") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err


def test_a_new_study_stores_the_values_it_was_started_with(tmp_path: Path, pictures: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = open_study(load_spec(_study_file(tmp_path, pictures, max_epochs=3)), open_storage(url, "--storage"))
    stored = optuna.load_study(study_name=study.study_name, storage=url).user_attrs[STARTED_WITH_ATTR]
    assert stored["max_epochs"] == 3 and stored["seed"] == 0 and stored["image_size"] == 12
    assert stored["val_fraction"] == 0.25 and stored["train_subset"] is None and stored["augment"] is True


def test_a_resume_with_another_max_epochs_is_one_line_naming_it_and_nothing_is_written(
    tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, study_file = _started(tmp_path, pictures)
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--max-epochs", "3"]) == 2
    err = _one_line_error(capsys)
    assert "study 'kept' was started with max_epochs 1, not 3 (--max-epochs)" in err, err
    assert "--accept-changed-overrides" in err, err
    study = optuna.load_study(study_name="kept", storage=url)
    assert study.trials == [] and study.user_attrs[STARTED_WITH_ATTR]["max_epochs"] == 1, "nothing written"


def test_an_edited_study_file_and_a_flag_are_named_together(
    tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, study_file = _started(tmp_path, pictures)
    _study_file(tmp_path, pictures, extra_data="train_subset = 10\n")
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--seed", "5"]) == 2
    err = _one_line_error(capsys)
    assert "seed 0, not 5 (--seed)" in err and f"train_subset None, not 10 ({study_file}: [data] train_subset)" in err, err
    assert "max_epochs" not in err, "an unchanged value is not named"


def test_a_study_that_stored_no_values_resumes_and_stores_them(tmp_path: Path, pictures: Path) -> None:
    """Studies made before hpo stored these values resume as before; from then on they are kept."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    storage = open_storage(url, "--storage")
    spec = load_spec(_study_file(tmp_path, pictures, max_epochs=2))
    old = open_study(spec, storage)
    old.set_user_attr(STARTED_WITH_ATTR, None)  # as an older hpo left it
    assert open_study(spec, storage).user_attrs[STARTED_WITH_ATTR]["max_epochs"] == 2


def test_the_accept_flag_is_parsed_and_given_to_launched_workers(tmp_path: Path) -> None:
    request = parse_run_args(["--study", "quick", "--n-trials", "2", "--accept-changed-overrides"])
    assert request.settings.accept_changed_overrides
    argv = worker_argv(request, study_path=tmp_path / "quick.toml", checkpoint_dir=tmp_path, index=0, device="cpu")
    assert "--accept-changed-overrides" in argv
    assert not parse_run_args(["--study", "quick", "--n-trials", "2"]).settings.accept_changed_overrides


def test_the_report_uses_the_stored_max_epochs(tmp_path: Path, pictures: Path) -> None:
    from hpo.report import main as report

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, pictures, max_epochs=2)
    study = open_study(load_spec(study_file), open_storage(url, "--storage"))
    for losses in ([2.0, 1.5], [2.5]):  # told by hand: one complete trial of 2 epochs, one pruned after 1
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        for epoch, loss in enumerate(losses, start=1):
            trial.report(loss, epoch)
        study.tell(trial, losses[-1] if len(losses) == 2 else None, state=None if len(losses) == 2 else optuna.trial.TrialState.PRUNED)
    _study_file(tmp_path, pictures, max_epochs=9)  # edited since: the study ran 2 epochs per trial
    assert report(["--study", str(study_file), "--storage", url, "--out", str(tmp_path / "report"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["max_epochs"] == 2 and summary["epochs_without_pruning"] == 2 * 2, summary


@pytest.mark.slow
def test_an_accepted_change_trains_the_new_epochs_and_is_stored(tmp_path: Path, pictures: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, pictures)
    assert main(["--study", str(study_file), "--n-trials", "1", "--storage", url, "--quiet"]) == 0
    argv = ["--study", str(study_file), "--n-trials", "2", "--storage", url, "--quiet", "--max-epochs", "2"]
    assert main([*argv, "--accept-changed-overrides"]) == 0
    study = optuna.load_study(study_name="kept", storage=url)
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1], [1, 2]]
    assert study.user_attrs[STARTED_WITH_ATTR]["max_epochs"] == 2, "later resumes compare with the accepted values"


@pytest.mark.slow
def test_best_replays_with_the_stored_subsets_not_an_edited_study_file(
    tmp_path: Path, pictures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replay is bit-identical only on the very split and subset the trial trained on: an edited train_subset
    and split_seed would give other values."""
    from hpo.best import main as best

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, pictures, extra_data="train_subset = 12\n", max_epochs=2)
    assert main(["--study", str(study_file), "--n-trials", "1", "--storage", url, "--quiet"]) == 0
    _study_file(tmp_path, pictures, extra_data="train_subset = 6\nsplit_seed = 4\n", max_epochs=5)
    assert best(["--study", str(study_file), "--storage", url, "--quiet", "--replay"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s", out, re.MULTILINE)
    assert [int(epoch) for epoch, _, _ in rows] == [1, 2], out
    for _, stored, replayed in rows:
        assert float(replayed) == pytest.approx(float(stored), abs=5e-4), out  # tolerance as tests/test_best.py's


def test_a_joining_worker_reads_the_study_trials_once_through_the_study_it_gets(
    tmp_path: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a study of many trials (issue 20): no study summaries (they count every trial of every study), no
    read past the study's own cache, and the trials it checked are those the worker's count then sees."""
    from hpo.tuning.budget import Tally

    spec = load_spec(_study_file(tmp_path, pictures))
    url = f"sqlite:///{tmp_path / 'many.db'}"
    first = open_study(spec, open_storage(url, "test"))
    first.add_trials([optuna.trial.create_trial(value=float(i), params={"lr": 0.01},
                                                distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)})
                      for i in range(25)])
    storage = open_storage(url, "test")
    reads: list[str] = []
    real_get_all_trials = storage.get_all_trials
    monkeypatch.setattr(storage, "get_all_trials", lambda *a, **k: reads.append("get_all_trials") or real_get_all_trials(*a, **k))
    monkeypatch.setattr(optuna, "get_all_study_summaries", lambda *a, **k: reads.append("summaries") or [])
    study = open_study(spec, storage)
    assert reads == [], "every read of the trials goes through the study's cache"
    assert Tally.of(study).finished == 25 and len(study.get_trials(deepcopy=False)) == 25
