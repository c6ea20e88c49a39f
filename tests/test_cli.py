"""Bad input: one line on stderr naming the flag or file and the bad value, exit 2, nothing in storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_study
from hpo.run import main


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("hpo.run: error: "), err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--n-trials", "0", "argument --n-trials: must be a positive integer, got '0'"),
        ("--n-trials", "-3", "argument --n-trials: must be a positive integer, got '-3'"),
        ("--n-trials", "ten", "argument --n-trials: must be a positive integer, got 'ten'"),
        ("--timeout", "-5", "argument --timeout: must be a number of seconds > 0, got '-5'"),
        ("--max-epochs", "0", "argument --max-epochs: must be a positive integer, got '0'"),
        ("--device", "gpu", "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("--seed", "-1", "argument --seed: must be an integer >= 0, got '-1'"),
        ("--workers-per-gpu", "0", "argument --workers-per-gpu: must be a positive integer, got '0'"),
        ("--gpus", "zero", "argument --gpus: must be 'all' or a list like 0,2,3, got 'zero'"),
        ("--heartbeat-interval", "0", "argument --heartbeat-interval: must be a positive integer, got '0'"),
    ],
)
def test_bad_flag_values(workdir: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, expected: str) -> None:
    argv = ["--study", "quick", "--n-trials", "2", flag, value]
    _fails(capsys, argv, expected)
    assert not (workdir / "hpo.db").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a GPU 3")
def test_a_gpu_that_does_not_exist_is_named(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--gpus", "3"], "argument --gpus: GPU 3 does not exist here")
    assert not (workdir / "hpo.db").exists()


def test_gpus_and_device_together_are_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--gpus", "all", "--device", "cpu"], "argument --device: not allowed with --gpus")


def test_missing_required_flag(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick"], "--n-trials")


def test_unknown_study_lists_the_available_ones(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "cifr", "--n-trials", "2"], "unknown study 'cifr'", "cifar", "quick")
    assert not (workdir / "hpo.db").exists()


def test_malformed_study_file_names_file_and_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = workdir / "broken.toml"
    bad.write_text('[study]\nname = "x"\n[space\nlr = 1\n')
    _fails(capsys, ["--study", str(bad), "--n-trials", "2"], str(bad), "invalid TOML", "line 3")
    assert not (workdir / "hpo.db").exists()


def test_inverted_range_in_study_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = workdir / "inverted.toml"
    bad.write_text("[space]\nlr = { low = 0.1, high = 0.001, log = true }\n")
    _fails(capsys, ["--study", str(bad), "--n-trials", "2"], str(bad), "[space] lr", "low=0.1 high=0.001")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "--storage: cannot parse storage URL 'not a url'"),
        ("nosuchdb://x/y", "--storage: unknown database in storage URL 'nosuchdb://x/y'"),
        ("sqlite:////no/such/folder/h.db", "--storage: folder of SQLite file '/no/such/folder/h.db' does not exist"),
    ],
)
def test_bad_storage_url(workdir: Path, capsys: pytest.CaptureFixture[str], archive: Path, url: str, expected: str) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--data-dir", str(archive), "--storage", url], expected)
    assert not (workdir / "hpo.db").exists()


def test_unreachable_database_hides_the_password(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg2://postgres:hunter2@127.0.0.1:1/test"
    err = _fails(capsys, ["--study", "quick", "--n-trials", "2", "--storage", url], "--storage: cannot connect to", "postgres:***@127.0.0.1:1/test")
    assert "hunter2" not in err


def test_storage_from_environment_is_named(workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_STORAGE", "mysql+pymysql://root@127.0.0.1:1/test")
    _fails(capsys, ["--study", "quick", "--n-trials", "2"], "HPO_STORAGE: cannot connect to mysql+pymysql://root@127.0.0.1:1/test")


def test_missing_dataset_offline_says_where_it_looked(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HPO_DATA_ARCHIVE", raising=False)
    empty = workdir / "nodata"
    empty.mkdir()
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--data-dir", str(empty)], f"looked in {empty}", "HPO_DATA_ARCHIVE", "--data-dir")
    assert not (workdir / "hpo.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_a_gpu(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--device", "cuda"], "--device: device 'cuda' asked for, but CUDA is not available")


def test_existing_study_with_other_direction_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str], archive: Path) -> None:
    import optuna

    url = f"sqlite:///{workdir / 'h.db'}"
    optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    study_file = write_study(workdir, archive=archive)
    _fails(capsys, ["--study", str(study_file), "--n-trials", "2", "--storage", url], "already exists with direction 'maximize'")
    assert len(optuna.load_study(study_name="tiny", storage=url).trials) == 0


def test_real_process_exits_2_without_traceback(workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpo.run", "--study", "quick", "--n-trials", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == "hpo.run: error: argument --n-trials: must be a positive integer, got '0'\n"
    assert done.stdout == ""
