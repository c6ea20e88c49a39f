"""The benchmark script runs end to end in a CI-sized form; it asserts nothing about speed."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import optuna
import pytest
from optuna.trial import TrialState

from conftest import write_study

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


def _bench(image_archive: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--data", str(image_archive), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_pipeline_mode_prints_both_pipelines_and_the_ratio(image_archive: Path) -> None:
    out = _bench(image_archive, "pipeline", "--images", "256", "--val-images", "64", "--epochs", "1", "--num-workers", "1")
    assert "reference (DataLoader, 1 workers)" in out and "1.00x" in out
    hpo_line = next(line for line in out.splitlines() if line.startswith("hpo "))
    assert hpo_line.split()[2].endswith("x"), "hpo's images/s is shown as a ratio to the reference"
    assert "%" in hpo_line, "validation accuracy is shown next to the speed"


def test_workers_mode_prints_trials_per_hour_per_k(image_archive: Path) -> None:
    out = _bench(image_archive, "workers", "--k", "1", "2", "--n-trials", "2", "--images", "128", "--val-images", "64", "--epochs", "1")
    assert "K=1:" in out and "trials/hour" in out and "K=2: " in out and "the trials/hour of K=1" in out


def test_finetune_mode_prints_speed_per_size_training_every_layer_and_the_head_only(image_archive: Path) -> None:
    out = _bench(image_archive, "finetune", "--arch", "mobilenet_v3_small", "--sizes", "32", "--images", "16", "--epochs", "2")
    rows = [line.split() for line in out.splitlines() if line.lstrip().startswith("32 px")]
    assert [row[2:4] for row in rows] == [["every", "layer"], ["backbone", "frozen"]]
    assert all(row[5] == "images/s" and float(row[4]) > 0 and row[-3:] == ["CPU-s", "per", "epoch"] for row in rows)


STORAGE = SCRIPT.parent / "storage.py"


def _storage_bench(*args: str) -> str:
    done = subprocess.run([sys.executable, str(STORAGE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _rows(out: str, first: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith(first)]


def test_storage_workers_mode_prints_a_row_per_backend_and_m() -> None:
    backends = ["sqlite"] + (["postgresql"] if os.environ.get("HPO_TEST_POSTGRES_URL") else [])
    out = _storage_bench("workers", "--backends", *backends, "--workers", "1", "2", "--trials-per-worker", "2",
                         "--epochs", "2", "--epoch-seconds", "0.01")
    for backend in backends:
        rows = _rows(out.split("\n\n")[-1], backend)
        assert [row[1] for row in rows] == ["1", "2"], out
        for row in rows:
            assert float(row[2]) > 0, "trials/s"
            assert row[-3] == "0", f"no errors: {row}"
    postgres = _rows(out.split("\n\n")[-1], "postgresql")
    if postgres:
        assert int(postgres[-1][9]) >= 2, "connections are read from the server: at least one per worker"


def test_storage_growth_mode_times_trials_on_a_filled_study() -> None:
    out = _storage_bench("growth", "--backends", "sqlite", "--sizes", "0", "30", "--growth-trials", "3",
                         "--epochs", "2", "--epoch-seconds", "0.01")
    rows = _rows(out, "sqlite")
    assert [row[1] for row in rows] == ["0", "30"], out
    assert all(float(row[2]) > 0 for row in rows), "storage time per trial is measured"


SEARCH = SCRIPT.parent / "search.py"


def _load_search_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/search.py imported in this process, so that the test can record what it evaluates."""
    spec = importlib.util.spec_from_file_location("bench_search", SEARCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_search_bench_compares_configurations_and_tests_only_the_chosen_trial_once_per_run(
    tmp_path: Path, image_archive: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    record_evaluations: Callable[[int], list[str]],
) -> None:
    """2 configurations x 2 seeds of a tiny study: every evaluation is recorded; per run the test set is evaluated
    exactly once, after the run's last validation evaluation, on the trial that is best by the stored validation value."""
    from hpo.studyfile.spec import load_spec
    from hpo.training.datasets import load_dataset

    study_file = write_study(tmp_path, archive=image_archive, name="benchy", max_epochs=2)
    evaluated = record_evaluations(len(load_dataset(load_spec(study_file).data).test_labels))
    out = tmp_path / "out"
    bench = _load_search_bench(monkeypatch)
    assert bench.main([
        "--study", str(study_file), "--data", str(image_archive), "--configs", "random:none", "random:median:1",
        "--seeds", "0", "1", "--budget", "3", "--target", "0.05", "--out", str(out),
    ]) == 0
    printed = capsys.readouterr().out

    # One test evaluation per run, each after all of that run's validation evaluations (the search is over).
    segments = "".join("t" if e == "test" else "v" for e in evaluated).split("t")
    assert len(segments) == 5 and segments[-1] == "", evaluated
    assert all(segment and set(segment) == {"v"} for segment in segments[:-1]), evaluated

    with (out / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert [(r["config"], r["seed"]) for r in runs] == [
        ("random:none", "0"), ("random:median:1", "0"), ("random:none", "1"), ("random:median:1", "1")
    ]
    storage = f"sqlite:///{out / 'bench.db'}"
    for run in runs:
        study = optuna.load_study(study_name=f"{run['config']}/seed{run['seed']}", storage=storage)
        started = min(t.datetime_start for t in study.trials).timestamp()
        within = [
            t for t in study.trials
            if t.state == TrialState.COMPLETE and t.datetime_complete.timestamp() - started <= 3
        ]
        assert int(run["chosen_trial"]) == min(within, key=lambda t: t.value).number, "chosen on validation only"
        assert 0 < float(run["test_accuracy"]) < 1
        assert int(run["epochs_trained"]) <= 2 * int(run["trials_finished"])
    with (out / "summary.csv").open() as handle:
        assert [row["config"] for row in csv.DictReader(handle)] == ["random:none", "random:median:1"]
    figure = (out / "best-so-far.html").read_text()
    assert "random:none" in figure and "random:median:1" in figure
    table = printed.split("configuration", 1)[1]
    assert "random:none" in table and "random:median:1" in table and "±" in table, printed


PARETO = SCRIPT.parent / "pareto.py"


def test_pareto_mode_prints_hypervolume_epochs_and_trials_with_and_without_pruning(archive: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(PARETO), "--data", str(archive), "--budget", "6", "--seeds", "0", "--train-subset", "128",
         "--val-subset", "64", "--max-epochs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["pruned"], ["unpruned"]) and "±" in line]
    assert [row[0] for row in table] == ["pruned", "unpruned"], done.stdout
    assert "reference point (2.5, 150000.0)" in done.stdout
    with (tmp_path / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert [r["config"] for r in runs] == ["pruned", "unpruned"]
    for run in runs:
        assert 0.0 <= float(run["hypervolume"]) < 1.0
        assert int(run["epochs_trained"]) <= 2 * int(run["trials_finished"])
    unpruned = runs[1]
    assert float(unpruned["epochs_saved"]) == 0.0 or int(unpruned["trials_finished"]) == 0, "nothing prunes without a pruner"
