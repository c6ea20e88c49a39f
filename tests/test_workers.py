"""Many workers on one study, on SQLite, PostgreSQL and MariaDB; nothing lost when one dies or is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import hpo.tuning.objective
from conftest import write_study
from faults import running_with_epochs, server_url, wait_for
from hpo.run import main

pytestmark = pytest.mark.slow

@pytest.fixture()
def study_name() -> Iterator[str]:
    yield f"w-{uuid.uuid4().hex[:8]}"


def _cleanup(url: str, name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:
        pass


def _hpo(study_file: Path, url: str, n_trials: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hpo.run", "--study", str(study_file), "--n-trials", str(n_trials), "--storage", url, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _freeze_mid_trial(url: str, name: str, pid_of: Callable[[optuna.trial.FrozenTrial], int]) -> optuna.trial.FrozenTrial:
    """A running trial with a reported epoch whose worker is stopped (SIGSTOP) while the trial is still RUNNING.

    Whatever an epoch takes, the trial cannot finish between this check and the signal the test sends next:
    a stopped process runs nothing until SIGCONT (or SIGKILL).
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        victim = wait_for(lambda: running_with_epochs(url, name), 120, "a running trial with a reported epoch")
        assert isinstance(victim, optuna.trial.FrozenTrial)
        os.kill(pid_of(victim), signal.SIGSTOP)
        now = optuna.load_study(study_name=name, storage=url).trials[victim.number]
        if now.state == TrialState.RUNNING:
            return now
        os.kill(pid_of(victim), signal.SIGCONT)  # it finished in between: let it go on, take the next one
    raise AssertionError("no trial stayed running long enough to be stopped")


def _assert_exact_budget(url: str, name: str, budget: int) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=url).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "no duplicate trial numbers"
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == budget
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], "no trial left RUNNING"
    return trials


@pytest.mark.parametrize("storage", ["sqlite", "postgresql", "mariadb"])
def test_four_workers_finish_exactly_the_budget(tmp_path: Path, image_archive: Path, study_name: str, storage: str) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}" if storage == "sqlite" else server_url(storage)
    study_file = write_study(tmp_path, archive=image_archive, name=study_name, max_epochs=1)
    try:
        launcher = _hpo(study_file, url, 16, "--workers-per-gpu", "4", "--quiet")
        out, _ = launcher.communicate(timeout=300)
        assert launcher.returncode == 0, out
        trials = _assert_exact_budget(url, study_name, 16)
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 4, "all four workers ran trials"
        # Two workers starting the last trial in the same instant: the later one fails as surplus at once.
        assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in trials if t.state == TrialState.FAIL)
        assert "[w3 cpu]" in out or "[w0 cpu]" in out, "worker output comes back prefixed"
        assert "database is locked" not in out
    finally:
        _cleanup(url, study_name)


def test_killed_worker_is_reaped_retried_and_resumed(tmp_path: Path, image_archive: Path, study_name: str) -> None:
    url = server_url("postgresql")
    study_file = write_study(tmp_path, archive=image_archive, name=study_name, max_epochs=4, train_subset=1500)
    common = ("--heartbeat-interval", "1", "--grace-period", "3", "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet")
    workers = [_hpo(study_file, url, 4, *common) for _ in range(2)]
    try:
        victim = _freeze_mid_trial(url, study_name, lambda t: t.user_attrs["worker"]["pid"])
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
        killed_at = datetime.now()
        for worker in workers:
            worker.communicate(timeout=180)
        codes = sorted(w.returncode for w in workers)
        assert codes == [-signal.SIGKILL, 0], codes
        trials = _assert_exact_budget(url, study_name, 4)
        dead = next(t for t in trials if t.number == victim.number)
        assert dead.state == TrialState.FAIL
        reaped_after = (dead.datetime_complete - killed_at).total_seconds()  # reported below, not asserted on
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params
        resumed = retry.user_attrs["resumed_from_epoch"]
        assert resumed >= len(dead.intermediate_values) >= 1, (resumed, dead.intermediate_values)
        assert sorted(retry.intermediate_values) == [1, 2, 3, 4], "inherited epochs plus the resumed ones"
        assert retry.user_attrs["seed"] == dead.user_attrs["seed"], "the retry trains with the same seed"
        print(
            f"\nkill test: trial {victim.number} killed after epoch {len(victim.intermediate_values)}, "
            f"reaped {reaped_after:.1f} s later, retried as trial {retry.number}, resumed from epoch {resumed}; "
            f"{len(trials)} trials, {sum(t.state == TrialState.FAIL for t in trials)} FAIL"
        )
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        _cleanup(url, study_name)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopped_worker_leaves_nothing_running_and_resumes(
    tmp_path: Path, image_archive: Path, signum: int, code: int
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = write_study(tmp_path, archive=image_archive, max_epochs=4, train_subset=1500)
    worker = _hpo(study_file, url, 2, "--quiet")
    victim = _freeze_mid_trial(url, "tiny", lambda t: worker.pid)
    worker.send_signal(signum)  # pending until the worker runs again: then it lands in the middle of the trial
    worker.send_signal(signal.SIGCONT)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == code, out
    assert "Traceback" not in out
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == victim.number] == [TrialState.WAITING]
    # The next run picks the re-queued trial up first and continues from its checkpoint.
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    trials = _assert_exact_budget(url, "tiny", 2)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1


def test_sigterm_to_the_launcher_stops_every_worker(tmp_path: Path, image_archive: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = write_study(tmp_path, archive=image_archive, max_epochs=4, train_subset=1500)
    launcher = _hpo(study_file, url, 20, "--workers-per-gpu", "2", "--quiet")
    wait_for(lambda: running_with_epochs(url, "tiny"), 120, "a running trial with a reported epoch")
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=90)
    assert launcher.returncode == 143, out
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING], out


def _fail_first_trial(monkeypatch: pytest.MonkeyPatch, make_failure: Callable[..., None]) -> None:
    """Wrap hpo.tuning.objective.fit so that the first trial meets ``make_failure`` and the rest train normally."""
    real_fit = hpo.tuning.objective.fit
    calls: list[int] = []

    def fit(model, data, config, on_epoch_end, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            return make_failure(model, data, config, on_epoch_end, real_fit=real_fit, **kwargs)
        return real_fit(model, data, config, on_epoch_end, **kwargs)

    monkeypatch.setattr(hpo.tuning.objective, "fit", fit)


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(
    tmp_path: Path, image_archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _fail_first_trial(monkeypatch, oom)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(write_study(tmp_path, archive=image_archive, max_epochs=1)), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"] == "cuda_oom"
    # Optuna >= 5 has Trial.set_constraint: the sampler is told the point is infeasible; before, nothing is stored.
    expected = 1.0 if hasattr(optuna.trial.Trial, "set_constraint") else None
    assert trials[0].system_attrs.get("constraints:cuda_oom") == expected
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2


def test_non_finite_loss_prunes_as_diverged_and_the_worker_goes_on(
    tmp_path: Path, image_archive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverge(model, data, config, on_epoch_end, *, real_fit, **kwargs):  # type: ignore[no-untyped-def]
        import dataclasses

        return real_fit(model, data, config, lambda r: on_epoch_end(dataclasses.replace(r, train_loss=float("nan"), val_loss=float("nan"))), **kwargs)

    _fail_first_trial(monkeypatch, diverge)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(write_study(tmp_path, archive=image_archive, max_epochs=2)), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert trials[0].state == TrialState.PRUNED
    assert trials[0].user_attrs["pruned_reason"] == "diverged: non-finite loss at epoch 1"
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
