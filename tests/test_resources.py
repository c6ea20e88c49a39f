"""A run says what it could not test: the missing-resources block at the end, and strict mode's failures.

Each case runs pytest in a subprocess, with tests/conftest.py as its plugin, on two tests that each need a resource
this run lacks: the dataset (the archive pointed at a file that does not exist) and a MySQL server (no URL).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
NEEDING = """
from conftest import missing


def test_needs_the_archive(archive):
    pass


def test_needs_mysql():
    missing("mysql", "HPO_TEST_MYSQL_URL is not set")
"""


def _pytest(tmp_path: Path, *args: str, strict_env: bool = False) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_needing.py").write_text(NEEDING)
    env = {**os.environ, "HPO_DATA_ARCHIVE": str(tmp_path / "absent.tar.gz"), "PYTHONPATH": str(TESTS)}
    env.pop("HPO_TEST_STRICT", None)
    if strict_env:
        env["HPO_TEST_STRICT"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "test_needing.py", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_each_missing_resource_is_named_at_the_end_with_the_tests_it_skipped(tmp_path: Path) -> None:
    done = _pytest(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    block = done.stdout[done.stdout.index("missing resources: these tests did not run"):]
    assert "dataset        1 tests skipped; needs the CIFAR-10 archive: set HPO_DATA_ARCHIVE" in block, block
    assert "mysql          1 tests skipped; needs a MySQL or MariaDB server: set HPO_TEST_MYSQL_URL" in block, block
    assert "--strict-resources or HPO_TEST_STRICT=1" in block


def test_strict_mode_makes_each_skip_a_failure_naming_the_resource(tmp_path: Path) -> None:
    for done in (_pytest(tmp_path, "--strict-resources"), _pytest(tmp_path, strict_env=True)):
        assert done.returncode == 1, done.stdout[-3000:]
        assert f"missing resource dataset: no CIFAR-10 archive at {tmp_path / 'absent.tar.gz'}" in done.stdout
        assert "missing resource mysql: HPO_TEST_MYSQL_URL is not set (strict mode" in done.stdout
        assert done.stdout.splitlines()[-1].startswith("1 failed, 1 error"), done.stdout[-500:]
