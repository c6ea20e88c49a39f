"""The benchmark script runs end to end in a CI-sized form; it asserts nothing about speed."""

from __future__ import annotations

import argparse
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


def test_search_bench_configurations_keep_their_old_labels_and_take_the_new_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load_search_bench(monkeypatch)
    for old in ("tpe:none", "tpe:median:2", "tpe:successive_halving:1", "random:median:1"):
        assert bench.parse_config(old).label == old, "stored runs and study names keep their names"
    config = bench.parse_config("tpe:successive_halving:1:startup=10:rf=3")
    assert (config.warmup, config.reduction_factor, config.startup_trials) == (1, 3, 10)
    assert config.label == "tpe:successive_halving:1:rf=3:startup=10"
    assert bench.parse_config("default:rf=2").label == "default:rf=2" and bench.parse_config("optuna").reference
    promoted = bench.parse_config("tpe:promotion_halving:1:rf=2")
    assert promoted.label == "tpe:promotion_halving:1:rf=2"
    spec = bench.configured(bench.load_spec(bench.find_study("quick")), promoted, seed=3)
    assert (type(spec.pruner).__name__, spec.pruner.min_resource, spec.pruner.reduction_factor) == (
        "PromotionHalvingPrunerSpec", 1, 2)
    for wrong in ("tpe:median:rf=2", "random:successive_halving:startup=3", "tpe:hyperband:1:rf=x", "tpe:none:rf=2:rf=3", "optuna:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_config(wrong)


def test_search_bench_counts_a_paused_and_resumed_configuration_once_and_its_epochs_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Promotion halving: a trial paused at epoch 1 and its resumption to epoch 3 are one configuration of 3 epochs."""
    _load_search_bench(monkeypatch)  # puts bench/ on the path
    import search_run

    from hpo.tuning.promotion import PAUSED_ATTR, promote

    study = optuna.create_study()
    paused = study.ask()
    paused.report(0.5, 1)
    paused.set_user_attr(PAUSED_ATTR, 1)
    paused = study.tell(paused, state=TrialState.PRUNED)
    other = study.ask()
    other.report(0.9, 1)
    study.tell(other, state=TrialState.PRUNED)
    promote(study, paused)
    resumed = study.ask()
    resumed.set_user_attr("val_accuracy", 0.4)
    for epoch in (2, 3):
        resumed.report(0.4, epoch)
    study.tell(resumed, 0.4)
    started, trials = search_run.finished_within(study, 3600)
    run = search_run.outcome("x", 0, started=started, trials=trials, chosen=study.trials[2], max_epochs=3, target=0.3,
                             test_accuracy=0.5)
    assert (run.trials_finished, run.trials_complete, run.epochs_trained) == (2, 1, 4)
    assert run.epochs_saved == pytest.approx(1 - 4 / 6)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _assert_per_seed_differences(paired: list[dict[str, str]], runs: list[dict[str, str]]) -> None:
    """Each row of paired.csv: its seeds, wins + ties + losses and mean difference are those of the per-seed
    differences of runs.csv (over the seeds where both runs have the figure)."""
    by_run = {(r["config"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    for row in paired:
        figures = [(by_run[(row["config"], s)][row["metric"]], by_run[(row["baseline"], s)][row["metric"]]) for s in seeds]
        differences = [float(mine) - float(theirs) for mine, theirs in figures if mine and theirs]
        assert int(row["seeds"]) == len(differences), row
        assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == len(differences), row
        if differences:
            assert float(row["mean_difference"]) == pytest.approx(sum(differences) / len(differences)), row


def test_search_bench_pairs_every_configuration_with_the_default_seed_by_seed_beside_the_optuna_line(
    tmp_path: Path, image_archive: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The study file's default, one candidate in the new syntax and the optuna line, 2 seeds of a tiny study: the
    tables, CSVs and paired rows are there, each paired figure is the mean of the per-seed differences in runs.csv,
    and the optuna line's runs are stored and scored like hpo's; a second call with --report-only runs nothing."""
    study_file = write_study(
        tmp_path, archive=image_archive, name="benchy", max_epochs=2, sampler="tpe",
        pruner='type = "successive_halving"\nmin_resource = 1\nreduction_factor = 4',
    )
    out = tmp_path / "out"
    argv = ["--study", str(study_file), "--data", str(image_archive), "--configs", "default", "optuna",
            "tpe:successive_halving:1:rf=2:startup=2", "--seeds", "0", "1", "--budget", "4", "--target", "0.05",
            "--threads", "1", "--out", str(out)]
    bench = _load_search_bench(monkeypatch)
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out

    configs = ["default", "optuna", "tpe:successive_halving:1:rf=2:startup=2"]
    runs = _csv(out / "runs.csv")
    assert [(r["config"], r["seed"]) for r in runs] == [(c, s) for s in ("0", "1") for c in configs]
    assert [r["config"] for r in _csv(out / "summary.csv")] == configs
    storage = f"sqlite:///{out / 'bench.db'}"
    for run in (r for r in runs if r["config"] == "optuna"):
        study = optuna.load_study(study_name=f"optuna/seed{run['seed']}", storage=storage)
        assert study.user_attrs["bench_run"]["chosen_trial"] == int(run["chosen_trial"])
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert complete and all(isinstance(t.user_attrs["seed"], int) and t.user_attrs["epochs"] == 2 for t in complete)
        assert 0 < float(run["test_accuracy"]) < 1, "the optuna line's choice is retrained and tested too"

    paired = _csv(out / "paired.csv")
    assert [(p["config"], p["baseline"], p["metric"]) for p in paired] == [
        (c, "default", m) for c in configs[1:] for m in ("best_val_accuracy", "test_accuracy", "seconds_to_target")
    ] + [("default", "optuna", "best_val_accuracy")], "every configuration against the default, then the goal's row"
    _assert_per_seed_differences(paired, runs)
    assert "paired against default" in printed and "goal of issue 21, default against optuna" in printed, printed
    table = printed.split("configuration", 1)[1]
    assert all(config in table for config in configs), printed

    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: pytest.fail("--report-only ran a run"))
    written = (out / "paired.csv").read_text()
    assert bench.main([*argv, "--report-only"]) == 0
    assert (out / "paired.csv").read_text() == written


def test_search_bench_figure_has_a_line_per_configuration_and_a_picture_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    _load_search_bench(monkeypatch)
    from search_report import write_figure, write_png
    from search_run import Run

    def run(config: str, seed: int, curve: tuple[tuple[float, float], ...]) -> Run:
        return Run(config=config, seed=seed, trials_finished=3, trials_complete=2, epochs_trained=5, epochs_saved=0.2,
                   best_val_accuracy=curve[-1][1], chosen_trial=1, chosen_value=1.5, test_accuracy=0.3,
                   seconds_to_target=None, curve=curve)

    runs = [run("default", 0, ((2.0, 0.2), (8.0, 0.3))), run("default", 1, ((3.0, 0.25),)),
            run("optuna", 0, ((6.0, 0.2),)), run("optuna", 1, ((4.0, 0.1), (9.0, 0.22)))]
    page, png = tmp_path / "best-so-far.html", tmp_path / "best-so-far.png"
    write_figure(page, runs, ["default", "optuna"], budget_s=10)
    assert '"name":"default"' in page.read_text() and '"name":"optuna"' in page.read_text()
    write_png(page, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
