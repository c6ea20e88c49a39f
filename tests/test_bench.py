"""The benchmark script runs end to end in a CI-sized form; it asserts nothing about speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"


def _bench(archive: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--data", str(archive), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_pipeline_mode_prints_both_pipelines_and_the_ratio(archive: Path) -> None:
    out = _bench(archive, "pipeline", "--images", "256", "--val-images", "64", "--epochs", "1", "--num-workers", "1")
    assert "reference (DataLoader, 1 workers)" in out and "1.00x" in out
    hpo_line = next(line for line in out.splitlines() if line.startswith("hpo "))
    assert hpo_line.split()[2].endswith("x"), "hpo's images/s is shown as a ratio to the reference"
    assert "%" in hpo_line, "validation accuracy is shown next to the speed"


def test_workers_mode_prints_trials_per_hour_per_k(archive: Path) -> None:
    out = _bench(archive, "workers", "--k", "1", "2", "--n-trials", "2", "--images", "128", "--val-images", "64", "--epochs", "1")
    assert "K=1:" in out and "trials/hour" in out and "K=2: " in out and "the trials/hour of K=1" in out


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
