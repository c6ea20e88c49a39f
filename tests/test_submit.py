"""python -m hpo.submit: its flags, and the hpo.run arguments it queues, checked before anything reaches Slurm."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from hpo.submit import main, queued_run, slurm_minutes


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


def _no_storage_check(monkeypatch: pytest.MonkeyPatch) -> str:
    """A server URL that hpo.submit takes without reaching it: what these tests check comes before any worker runs."""
    import hpo.tuning.storage

    monkeypatch.setattr(hpo.tuning.storage, "check_storage", lambda url, source: None)
    return "postgresql+psycopg2://hpo:secret@db.example:5432/hpo"


def test_queued_arguments_name_files_absolutely_and_leave_the_storage_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _no_storage_check(monkeypatch)
    monkeypatch.chdir(tmp_path)
    queued = queued_run(["--study", "quick", f"--storage={url}", "--n-trials", "4", "--checkpoint-dir", "ck"])
    assert queued.storage_url == url
    argv = queued.task_argv(index=3, device="cpu")
    assert not any(arg == "--storage" or arg.startswith("--storage=") or url in arg for arg in argv)
    assert argv[-4:] == ["--device", "cpu", "--worker-index", "3"]
    assert argv[argv.index("--checkpoint-dir") + 1] == str(tmp_path / "ck")
    study = Path(argv[argv.index("--study") + 1])
    assert study.is_absolute() and study.name == "quick.toml" and study.is_file()


def test_no_sbatch_here_is_exit_code_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HPO_STORAGE", _no_storage_check(monkeypatch))
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    monkeypatch.chdir(tmp_path)
    code = main(["slurm", "--workers", "2", "--log-dir", str(tmp_path / "logs"), "--", "--study", "quick", "--n-trials", "4"])
    assert code == 3
    assert capsys.readouterr().err == "hpo.submit: error: sbatch not found: run hpo.submit on a Slurm login node\n"


@pytest.mark.parametrize("argv", [["--help"], ["slurm", "--help"]])
def test_help_is_shown_without_hpo_run_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m hpo.submit")
    assert ("--workers" in out) == (argv[0] == "slurm")


def test_every_task_runs_hpo_run_with_its_own_index_and_the_sbatch_script_adds_the_same_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slurm/hpo-array.sbatch runs hpo.launching.array_task, which adds hpo.run's task flags as hpo.submit does."""
    from hpo.launching import array_task

    execs: list[list[str]] = []
    monkeypatch.setattr(array_task.os, "execv", lambda path, argv: execs.append(list(argv)))
    monkeypatch.setattr(array_task.sys, "argv", ["array_task", "--study", "quick", "--n-trials", "4"])
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("HPO_DEVICE", "cpu")
    array_task.main()
    assert execs == [[sys.executable, "-m", "hpo.run", "--study", "quick", "--n-trials", "4", "--device", "cpu", "--worker-index", "5"]]
    script = (Path(__file__).resolve().parent.parent / "slurm" / "hpo-array.sbatch").read_text()
    assert '-m hpo.launching.array_task "$@"' in script
