"""bench/overhead.py on a tiny setting: it runs this tree, the older hpo it names and plain Optuna, and tables them.

Never asserts a speed: only that each variant ran its trials and that the table holds what it says.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
ROOT = SCRIPT.parent.parent


@pytest.mark.slow
def test_overhead_bench_tables_this_tree_an_older_one_and_plain_optuna(tmp_path: Path) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "fe8a730^{commit}"], capture_output=True).returncode:
        pytest.skip("the older revision the bench compares with is not in this clone's history")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--backends", "sqlite", "--sizes", "0", "12", "--trials", "3", "--epochs", "2",
         "--epoch-seconds", "0.01", "--sqlite-path", str(tmp_path / "bench.db")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split()[:3] == ["backend", "size", "variant"]
    rows = [line.split() for line in table[1:]]
    assert [(row[1], row[2]) for row in rows] == [
        (size, variant) for size in ("0", "12") for variant in ("hpo", "hpo@fe8a730", "optuna")
    ]
    for row in rows:
        calls, epochs = float(row[3]), float(row[8])
        assert calls > 0 and 1 <= epochs <= 2, f"every variant stored its trials and their epochs: {row}"
        # The time columns are printed in their units; what they say is the bench's business, not this test's.
        assert (row[5], row[7], row[10]) == ("ms", "ms", "s"), row
        assert row[-1].endswith("x")
    assert all(row[-1] == "1.00x" for row in rows if row[2] == "optuna")
