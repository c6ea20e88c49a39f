"""``python -m hpo.dashboard`` serves the study (its API and, in headless Chromium, its page); pruned trials carry notes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FinishedStudy, missing
from faults import answer_when_up
from hpo.dashboard import main
from hpo.studyfile.samplers import MedianPrunerSpec, PercentilePrunerSpec, SuccessiveHalvingPrunerSpec
from hpo.tuning.notes import Pruned, pruning_note, write_pruning_note

# Seconds to wait for the server to answer: Python, optuna and the dashboard load first.
START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def dashboard(finished_study: FinishedStudy) -> Iterator[str]:
    """The base URL of ``python -m hpo.dashboard`` serving the finished study; stopped afterwards."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hpo.dashboard", "--storage", finished_study.url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        answer_when_up(server, f"{base}/api/meta", START_TIMEOUT_S)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _study_id(base: str, name: str) -> int:
    summaries = _get_json(f"{base}/api/studies")["study_summaries"]
    assert isinstance(summaries, list)
    found = [s["study_id"] for s in summaries if s["study_name"] == name]
    assert found, summaries
    return int(found[0])


@pytest.mark.slow
def test_dashboard_api_serves_the_trials_their_attrs_and_notes(dashboard: str, finished_study: FinishedStudy) -> None:
    detail = _get_json(f"{dashboard}/api/studies/{_study_id(dashboard, finished_study.name)}")
    stored = optuna.load_study(study_name=finished_study.name, storage=finished_study.url).trials
    served = detail["trials"]
    assert isinstance(served, list)
    assert [t["number"] for t in served] == [t.number for t in stored]
    assert {TrialState.PRUNED, TrialState.COMPLETE} <= {t.state for t in stored}, "both kinds of row are checked below"
    for trial, row in zip(stored, served):
        attrs = {a["key"]: a["value"] for a in row["user_attrs"]}
        assert {"val_accuracy", "seconds_per_epoch", "images_per_second", "params", "worker", "seed"} <= set(attrs)
        # The worker's claim shows who ran the trial on what (hpo.tuning.records): host, pid, device, precision.
        assert all(f'"{key}"' in str(attrs["worker"]) for key in ("host", "pid", "device", "precision")), attrs["worker"]
        if trial.state == TrialState.PRUNED:
            note = row["note"]["body"]
            epoch = max(trial.intermediate_values)
            assert note.startswith(f"**Pruned at epoch {epoch}** by MedianPruner."), note
            assert f"val_loss at epoch {epoch}: {trial.intermediate_values[epoch]:.4f}" in note
            assert "threshold: the median" in note and "completed trials' val_loss" in note
        else:
            assert row["note"]["body"] == ""


@pytest.mark.slow
def test_dashboard_page_renders_in_headless_chromium(dashboard: str, finished_study: FinishedStudy, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing("browser", "no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    page = f"{dashboard}/dashboard/studies/{_study_id(dashboard, finished_study.name)}"
    # --virtual-time-budget: milliseconds of page time to let the single-page app fetch and render.
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"{finished_study.name} (id=" in dom, dom[:2000]
    screenshot = tmp_path / "dashboard.png"
    subprocess.run(
        [*browser, f"--screenshot={screenshot}", "--window-size=1280,900", page], capture_output=True, timeout=120, check=True
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_busy_port_and_missing_storage_are_one_line(
    told_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--storage", told_study.url, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpo.dashboard: error: --port: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1, err
    assert main(["--storage", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "--storage: no SQLite file" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert main(["--port", "70000"]) == 2
    assert "argument --port: must be a port number from 1 to 65535, got '70000'" in capsys.readouterr().err


def test_without_optuna_dashboard_the_command_says_how_to_install_it(
    told_study: FinishedStudy, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    assert main(["--storage", told_study.url, "--port", str(_free_port())]) == 2
    assert 'optuna-dashboard is not installed: pip install -e ".[dashboard]"' in capsys.readouterr().err


def _third_trial(pruner: optuna.pruners.BasePruner) -> optuna.Trial:
    """Two completed trials (epoch-1 values 1.0 and 3.0), and a running third that reported 2.5 at epoch 1."""
    study = optuna.create_study(pruner=pruner)
    for value in (1.0, 3.0):
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    trial = study.ask()
    trial.report(2.5, 1)
    return trial


def _pruned_in_memory(*, dashboard_installed: bool, monkeypatch: pytest.MonkeyPatch) -> optuna.Trial:
    trial = _third_trial(optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    study = trial.study
    assert trial.should_prune(), "2.5 is worse than the median 2.0"
    with monkeypatch.context() as patch:
        if not dashboard_installed:
            patch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
        write_pruning_note(trial, Pruned(epoch=1, value=2.5, best=2.5, metric="val_loss", pruner=MedianPrunerSpec(2)))
    study.tell(trial, state=TrialState.PRUNED)
    return trial


def test_pruned_note_names_the_median_it_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna_dashboard

    note = optuna_dashboard.get_note(_pruned_in_memory(dashboard_installed=True, monkeypatch=monkeypatch))
    assert note.splitlines()[0] == "**Pruned at epoch 1** by MedianPruner."
    assert "- val_loss at epoch 1: 2.5000; best so far: 2.5000" in note
    assert "the median 2.0000 of the 2 completed trials' val_loss at epoch 1; the best so far is above it" in note


def test_without_optuna_dashboard_no_note_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna_dashboard

    assert optuna_dashboard.get_note(_pruned_in_memory(dashboard_installed=False, monkeypatch=monkeypatch)) == ""


@pytest.mark.parametrize(
    ("pruner", "spec", "expected"),
    [
        (optuna.pruners.PercentilePruner(25.0, n_startup_trials=0), PercentilePrunerSpec(25.0, n_startup_trials=0),
         "- threshold: the 25th percentile 1.5000 of the 2"),
        (optuna.pruners.SuccessiveHalvingPruner(), SuccessiveHalvingPrunerSpec(), "- why: it was not among the best share"),
    ],
)
def test_other_pruners_get_their_own_note(pruner: optuna.pruners.BasePruner, spec: object, expected: str) -> None:
    trial = _third_trial(pruner)
    note = pruning_note(trial, Pruned(epoch=1, value=2.5, best=2.5, metric="val_loss", pruner=spec))
    assert note.startswith(f"**Pruned at epoch 1** by {type(pruner).__name__}.") and expected in note, note
