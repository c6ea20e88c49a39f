"""``python -m hpo.report`` on a real tiny study, on a study still running and on an empty one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import FinishedStudy, write_study
from hpo.report import main

TITLES = (
    "Optimization history", "Learning curves", "Parallel coordinates", "Hyperparameter importances",
    "Learning rate against batch size", "Slices", "Timeline",
)


def _report(study_file: Path, url: str, out: Path) -> tuple[str, list[dict[str, str]], dict[str, object]]:
    assert main(["--study", str(study_file), "--storage", url, "--out", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    with (out / "trials.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return page, rows, json.loads((out / "summary.json").read_text(encoding="utf-8"))


def _self_contained(page: str) -> None:
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:500]) == 1, "plotly.js is embedded exactly once"
    assert "<script src=" not in page and 'src="http' not in page, "nothing is fetched from the network"
    for title in TITLES:
        assert f"<h2>{title}</h2>" in page, title


@pytest.mark.slow
def test_report_of_a_tiny_study_matches_the_storage(finished_study: FinishedStudy, tmp_path: Path) -> None:
    page, rows, summary = _report(finished_study.study_file, finished_study.url, tmp_path)
    _self_contained(page)
    assert page.count("Plotly.newPlot(") == len(TITLES), "every section is a drawn figure"
    assert 'class="missing"' not in page

    study = optuna.load_study(study_name=finished_study.name, storage=finished_study.url)
    trials = study.trials
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    for row, trial in zip(rows, trials):
        assert row["state"] == trial.state.name
        assert float(row["value"]) == trial.value
        assert int(row["epochs_reported"]) == len(trial.intermediate_values)
        assert {name: row[name] for name in trial.params} == {name: str(v) for name, v in trial.params.items()}
        assert int(row["seed"]) == trial.user_attrs["seed"] and row["device"] == "cpu"
        # Read off the curve and the worker's claim, not stored as attrs of their own (hpo.tuning.records).
        assert "epochs" not in trial.user_attrs and int(row["epochs"]) == max(trial.intermediate_values)
        best = min(trial.intermediate_values, key=lambda epoch: trial.intermediate_values[epoch])
        assert int(row["best_epoch"]) == best and int(row["pid"]) == trial.user_attrs["worker"]["pid"]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and len(complete) >= 2, [t.state for t in trials]

    assert summary["study"] == "tiny" and summary["metric"] == "val_loss" and summary["trials"] == len(trials)
    assert summary["states"]["COMPLETE"] == len(complete) and summary["states"]["PRUNED"] == len(pruned)
    assert summary["best"]["number"] == study.best_trial.number and summary["best"]["value"] == study.best_value
    assert summary["best"]["params"] == study.best_trial.params
    assert summary["epochs_trained"] == sum(len(t.intermediate_values) for t in trials) < 2 * len(trials)
    assert summary["epochs_without_pruning"] == 2 * len(trials)
    assert f"#{study.best_trial.number}: val_loss {study.best_value:.4f}" in page


def test_report_of_a_running_study(told_study: FinishedStudy, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'running.db'}"
    optuna.copy_study(from_study_name=told_study.name, from_storage=told_study.url, to_storage=url)
    running = optuna.load_study(study_name=told_study.name, storage=url).ask()
    running.report(2.5, 1)  # a worker is in its second epoch
    page, rows, summary = _report(told_study.study_file, url, tmp_path / "out")
    _self_contained(page)
    assert rows[-1]["state"] == "RUNNING" and rows[-1]["value"] == "" and rows[-1]["epochs_reported"] == "1"
    assert summary["states"]["RUNNING"] == 1
    assert summary["epochs_without_pruning"] == 2 * (len(rows) - 1), "a running trial is not counted yet"


def test_report_of_an_empty_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = write_study(tmp_path, archive=tmp_path / "no-data.tar.gz", name="empty")  # a report reads no images
    optuna.create_study(study_name="empty", storage=url)
    page, rows, summary = _report(study_file, url, tmp_path / "out")
    _self_contained(page)
    assert "No completed trial yet" in capsys.readouterr().out
    assert page.count('class="missing"') == len(TITLES) and "Plotly.newPlot(" not in page
    assert rows == [] and (tmp_path / "out" / "trials.csv").read_text().startswith("number,state,value")
    assert summary["trials"] == 0 and summary["best"] is None and summary["epochs_trained"] == 0


def test_default_output_folder_is_named_after_the_study(
    told_study: FinishedStudy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--study", str(told_study.study_file), "--storage", told_study.url, "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "reports" / "tiny").iterdir()) == ["report.html", "summary.json", "trials.csv"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--storage", "sqlite:///{tmp}/none.db"], "--storage: no SQLite file"),
        (["--storage", "{url}", "--study-name", "other"], "--study-name: no study 'other' in sqlite:///"),
        (["--storage", "{url}", "--max-epochs", "0"], "argument --max-epochs: must be a positive integer, got '0'"),
    ],
)
def test_bad_input_is_one_line(
    told_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    argv = [a.format(tmp=tmp_path, url=told_study.url) for a in argv]
    assert main(["--study", str(told_study.study_file), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpo.report: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "none.db").exists(), "a report never creates a database"
    assert not (tmp_path / "out").exists()
