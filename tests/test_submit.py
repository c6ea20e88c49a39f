"""python -m hpo.submit: its flags, and the hpo.run arguments it queues, checked before anything reaches Slurm."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpo.submit import main, run_arguments, slurm_minutes


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("240", 240), ("4:00:00", 240), ("90:30", 91), ("1-00:00:00", 1440), ("2-12", 3600), ("0:00:30", 1)],
)
def test_slurm_time_formats_become_minutes(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0", "4h", "", "1:2:3:4", "-5"])
def test_bad_slurm_times_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        slurm_minutes(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["slurm", "--workers", "2"], "hpo.run arguments are missing: put them after --"),
        (["slurm", "--workers", "0", "--", "--study", "quick", "--n-trials", "4"], "argument --workers: must be a positive integer, got '0'"),
        (["slurm", "--workers", "2", "--gpus-per-worker", "2", "--", "--study", "quick"], "argument --gpus-per-worker: invalid choice: 2"),
        (["slurm", "--workers", "2", "--time", "4h", "--", "--study", "quick"], "argument --time: must be a Slurm time like 240"),
        (["slurm", "--workers", "2", "--sbatch", "qos", "--", "--study", "quick"], "argument --sbatch: must be NAME=VALUE"),
        (["slurm", "--workers", "2", "--", "--study", "quick"], "after --: the following arguments are required: --n-trials"),
        (["slurm", "--workers", "2", "--", "--study", "quick", "--n-trials", "4", "--epochs", "2"], "after --: unrecognized arguments: --epochs"),
        (["slurm", "--workers", "2", "--", "--study", "quick", "--n-trials", "4", "--device", "cpu"], "after --: argument --device: set by hpo.submit (see --gpus-per-worker)"),
        (["slurm", "--workers", "2", "--", "--study", "quick", "--n-trials", "4", "--gpus", "all"], "after --: argument --gpus: set by hpo.submit (see --workers)"),
        (["slurm", "--workers", "2", "--", "--study", "nope", "--n-trials", "4"], "--study: unknown study 'nope'"),
        (["slurm", "--workers", "2", "--", "--study", "quick", "--n-trials", "4", "--storage", "sqlite:///hpo.db"], "--storage: workers on a cluster need a database server"),
        (["slurm", "--workers", "2", "--", "--study", "quick", "--n-trials", "4", "--storage", "postgresql+psycopg2://u:secret@127.0.0.1:1/x"], "--storage: cannot connect to postgresql+psycopg2://u:***@127.0.0.1:1/x"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpo.submit: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and "secret" not in err


def test_queued_arguments_name_files_absolutely_and_leave_the_storage_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    monkeypatch.chdir(tmp_path)
    argv, storage, source = run_arguments(["--study", "quick", f"--storage={url}", "--n-trials", "4", "--checkpoint-dir", "ck"])
    assert storage == url and source == "--storage"
    assert not any("storage" in arg or url in arg for arg in argv)
    assert argv[argv.index("--checkpoint-dir") + 1] == str(tmp_path / "ck")
    study = Path(argv[argv.index("--study") + 1])
    assert study.is_absolute() and study.name == "quick.toml" and study.is_file()


def test_no_sbatch_here_is_exit_code_3(tmp_path: Path) -> None:
    url = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("HPO_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    # A PATH with this Python but without sbatch.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = dict(os.environ, PATH=str(bin_dir), HPO_STORAGE=url)
    done = subprocess.run(
        [sys.executable, "-m", "hpo.submit", "slurm", "--workers", "2", "--log-dir", str(tmp_path / "logs"), "--",
         "--study", "quick", "--n-trials", "4"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr == "hpo.submit: error: sbatch not found: run hpo.submit on a Slurm login node\n"
