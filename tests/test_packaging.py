"""The installed package: the wheel carries the shipped studies, ``hpo COMMAND`` runs the commands, ``--version``.

The slow test builds the wheel from a copy of the checkout, installs it into a fresh virtual environment
outside the checkout (its dependencies come from this environment's site-packages: nothing is downloaded) and
runs the quick study by name from an empty folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

import hpo
from conftest import random_image_folder
from hpo.__main__ import COMMANDS
from hpo.__main__ import main as hpo_main
from hpo.cli import version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_lists_every_package_and_ships_the_studies() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hpo").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"hpo.studies"}, "a new sub-package must be listed in pyproject.toml"
    assert setuptools["package-dir"] == {"hpo.studies": "studies"}
    assert setuptools["package-data"]["hpo.studies"] == ["*.toml"]


def test_the_licence_is_stated_and_shipped() -> None:
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_console_command_names_each_command_module() -> None:
    assert PYPROJECT["project"]["scripts"] == {"hpo": "hpo.__main__:main"}
    assert set(COMMANDS) == {"run", "best", "report", "dashboard", "submit"}
    assert all((ROOT / "hpo" / f"{name}.py").is_file() for name in COMMANDS)


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        expected = importlib.metadata.version("hpo")
    except importlib.metadata.PackageNotFoundError:
        expected = hpo.__version__
    assert version() == expected
    assert hpo_main(["--version"]) == 0
    assert capsys.readouterr().out == f"hpo {expected}\n"
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exited:
            hpo_main([name, "--version"])
        assert exited.value.code == 0
        assert capsys.readouterr().out == f"hpo {expected}\n", name


def test_hpo_without_a_known_command_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert hpo_main(["rnu", "--study", "quick"]) == 2
    err = capsys.readouterr().err
    assert err == "hpo: error: no command 'rnu' (choose from run, best, report, dashboard, submit)\n"
    assert hpo_main([]) == 2
    assert "usage: hpo COMMAND" in capsys.readouterr().err


def test_hpo_command_passes_its_arguments_to_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert hpo_main(["run", "--study", "quick", "--n-trials", "0"]) == 2
    assert capsys.readouterr().err == "hpo.run: error: argument --n-trials: must be a positive integer, got '0'\n"


def _copy_sources(destination: Path) -> Path:
    """What the wheel is built from, copied: building in the checkout would leave build/ and *.egg-info there."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, destination / name)
    for folder in ("hpo", "studies"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def _fresh_venv(folder: Path) -> Path:
    """A venv whose own site-packages comes first, then this environment's (torch, Optuna...) through a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "borrowed-site-packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
def test_the_built_wheel_runs_the_quick_study_by_name_outside_the_checkout(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    sources = _copy_sources(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPO_DATA_ARCHIVE")}
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(sources)]
    subprocess.run([sys.executable, "-m", "pip", *build], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("hpo-*.whl")
    python = _fresh_venv(tmp_path / "venv")
    install = ["--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run([sys.executable, "-m", "pip", *install], check=True, env=env)
    hpo_command = tmp_path / "venv" / "bin" / "hpo"
    work = tmp_path / "elsewhere"
    images = random_image_folder(work / "images", train=4, test=1, size=32, classes=tuple(f"c{i}" for i in range(10)))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(hpo_command), *args], cwd=work, env=env, check=False, capture_output=True, text=True, timeout=600
        )

    where = subprocess.run(
        [python, "-c", "import hpo; print(hpo.__file__)"], cwd=work, env=env, capture_output=True, text=True,
        check=False,
    )
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    assert run("--version").stdout == f"hpo {hpo.__version__}\n"
    searched = run(
        "run", "--study", "quick", "--n-trials", "1", "--max-epochs", "1", "--device", "cpu", "--data-dir", str(images),
        "--storage", f"sqlite:///{work / 'hpo.db'}", "--quiet",
    )
    assert searched.returncode == 0, searched.stderr[-3000:]
    assert "Traceback" not in searched.stderr
    storage = f"sqlite:///{work / 'hpo.db'}"
    reported = run("report", "--study", "quick", "--storage", storage, "--out", "report", "--quiet")
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert (work / "report" / "report.html").is_file()
    unknown = run("run", "--study", "nosuch", "--n-trials", "1")
    assert unknown.returncode == 2
    assert "available: cifar, cifar-resnet18, cifar-resnet9, cifar100" in unknown.stderr  # the shipped studies, found
    assert str(tmp_path / "venv") in unknown.stderr  # ... in the installed package
