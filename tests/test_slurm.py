"""hpo workers as a real Slurm job array (a single-node cluster that .ci/slurm-up starts), on PostgreSQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_workers import _assert_exact_budget, _cleanup

from conftest import missing, write_study
from faults import running_with_epochs, server_url, wait_for
from hpo.run import main

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slurm() -> None:
    if shutil.which("sbatch") is None:
        missing("slurm", "Slurm is not installed here (.ci/slurm-up installs and starts a single-node cluster)")
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if states.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        problem = (states.stderr or states.stdout).strip().splitlines()
        missing("slurm", f"Slurm does not take jobs here (.ci/slurm-up starts it): {problem[-1] if problem else 'no node up'}")


@pytest.fixture()
def postgres(study_name: str) -> Iterator[str]:
    url = server_url("postgresql")
    # The array's tasks start together on a study that does not exist yet: they create it in a race.
    yield url
    _cleanup(url, study_name)


@pytest.fixture()
def study_name() -> str:
    return f"slurm-{uuid.uuid4().hex[:8]}"


def _submit(tmp_path: Path, study_file: Path, url: str, n_trials: int) -> str:
    """python -m hpo.submit slurm with 2 CPU workers; returns the array's job id."""
    done = subprocess.run(
        [
            sys.executable, "-m", "hpo.submit", "slurm", "--workers", "2", "--gpus-per-worker", "0",
            "--cpus-per-worker", "1", "--time", "10", "--log-dir", str(tmp_path / "logs"), "--",
            "--study", str(study_file), "--n-trials", str(n_trials), "--storage", url,
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--heartbeat-interval", "2",
        ],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Submitted Slurm array job (\d+)", done.stdout)
    assert match is not None, done.stdout
    assert f"squeue -j {match.group(1)}" in done.stdout and f"scancel {match.group(1)}" in done.stdout
    return match.group(1)


def _sbatch(tmp_path: Path, study_file: Path, url: str, n_trials: int) -> str:
    """The plain sbatch script, as a user submits it by hand, on 2 CPU workers; returns the array's job id."""
    done = subprocess.run(
        [
            "sbatch", "--parsable", "--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=10",
            str(ROOT / "slurm" / "hpo-array.sbatch"),
            "--study", str(study_file), "--n-trials", str(n_trials), "--checkpoint-dir", str(tmp_path / "ckpt"),
        ],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=dict(os.environ, HPO_STORAGE=url, HPO_PYTHON=sys.executable, HPO_DEVICE="cpu"),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _queued(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30).stdout
    return bool(out.strip())


def _logs(tmp_path: Path, job_id: str) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in (tmp_path / "logs").glob(f"{job_id}_*/*_log.out")}


def _array_of_two(submit: Callable[[Path, Path, str, int], str], tmp_path: Path, image_archive: Path, name: str, url: str) -> str:
    """Submit 2 workers on a budget of 6 trials, wait for the array to end; the budget is exact and both ran trials."""
    study_file = write_study(tmp_path, archive=image_archive, name=name, max_epochs=2, train_subset=1000)
    job_id = submit(tmp_path, study_file, url, 6)
    wait_for(lambda: not _queued(job_id), 300, f"array job {job_id} to leave the queue")
    trials = _assert_exact_budget(url, name, 6)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2, "both array tasks ran trials"
    return job_id


def test_two_task_array_finishes_exactly_the_budget(slurm: None, tmp_path: Path, image_archive: Path, study_name: str, postgres: str) -> None:
    job_id = _array_of_two(_submit, tmp_path, image_archive, study_name, postgres)
    logs = _logs(tmp_path, job_id)
    assert sorted(logs) == [f"{job_id}_0", f"{job_id}_1"], logs.keys()
    for task, text in logs.items():
        assert "Job completed successfully" in text, text
        (command,) = [line for line in text.splitlines() if line.startswith("hpo worker: ")]
        assert not re.search(r"--storage[ =]", command) and postgres not in command, "the URL travels in the environment"
        assert f"--worker-index {task.split('_')[1]}" in command
    for script in (tmp_path / "logs").rglob("*.sh"):
        assert postgres not in script.read_text()


def test_the_plain_sbatch_script_runs_the_same_workers(
    slurm: None, tmp_path: Path, image_archive: Path, study_name: str, postgres: str
) -> None:
    _array_of_two(_sbatch, tmp_path, image_archive, study_name, postgres)


def test_scancel_mid_trial_leaves_nothing_running_and_a_later_run_resumes(
    slurm: None, tmp_path: Path, image_archive: Path, study_name: str, postgres: str
) -> None:
    # Epochs long enough (~0.5 s) to cancel the array in the middle of a trial.
    study_file = write_study(tmp_path, archive=image_archive, name=study_name, max_epochs=4, train_subset=1500)
    job_id = _submit(tmp_path, study_file, postgres, 2)
    victim = wait_for(lambda: running_with_epochs(postgres, study_name), 180, "a running trial with a reported epoch")
    assert isinstance(victim, optuna.trial.FrozenTrial)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    # Slurm's KillWait (30 s) is the time between SIGTERM and SIGKILL; the tasks must be gone well before.
    wait_for(lambda: not _queued(job_id), 60, f"array job {job_id} to end after scancel")
    trials = optuna.load_study(study_name=study_name, storage=postgres).trials
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "scancel leaves no trial RUNNING"
    assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == victim.number] == [TrialState.WAITING]
    for text in _logs(tmp_path, job_id).values():
        assert "Traceback" not in text, text
    # A later run (here on this machine; on a cluster, the next submission) resumes the trial from its checkpoint.
    assert main([
        "--study", str(study_file), "--n-trials", "2", "--storage", postgres, "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--quiet",
    ]) == 0
    trials = _assert_exact_budget(postgres, study_name, 2)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
