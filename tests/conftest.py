"""Shared fixtures: the CIFAR-10 archive, a per-session decode cache, tiny study files, stand-in pretrained weights;
and what the run could not test: each missing resource, named at the end, or a failure in strict mode.

A test that needs something outside the checkout (the dataset archive, a database server, Slurm, a browser) calls
``missing(resource, why)`` when it is absent, never ``pytest.skip`` directly: the skip then counts towards that
resource in the block printed at the end of the run, and with ``--strict-resources`` (or ``HPO_TEST_STRICT=1``;
``.ci/run`` uses it) it is a failure instead, so that CI cannot pass by testing less.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent

# What a test may need from outside the checkout, and how to provide it.
RESOURCES = {
    "dataset": "the CIFAR-10 archive: set HPO_DATA_ARCHIVE, or put ../shared/data/cifar10-jpg.tar.gz beside "
    "the checkout",
    "postgresql": "a PostgreSQL server: set HPO_TEST_POSTGRES_URL (throwaway servers: PostgreSQL 15's binaries)",
    "mysql": "a MySQL or MariaDB server: set HPO_TEST_MYSQL_URL",
    "slurm": "a Slurm cluster that takes jobs: .ci/slurm-up installs and starts one on this machine",
    "browser": "headless Chromium: apt-get install chromium",
    "pgbouncer": "PgBouncer's binary: apt-get install pgbouncer (each test starts its own in front of PostgreSQL)",
}
_PREFIX = "missing resource "  # how a skip says it is one of ours: "missing resource <name>: <why>"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-resources", action="store_true",
        help="fail, not skip, a test whose resource (dataset, PostgreSQL, MySQL, Slurm, browser) is missing; "
        "also HPO_TEST_STRICT=1",
    )


def _strict(config: pytest.Config) -> bool:
    return bool(config.getoption("--strict-resources")) or os.environ.get("HPO_TEST_STRICT") == "1"


_config: list[pytest.Config] = []  # this run's config, for missing(), which tests call without a request


def pytest_configure(config: pytest.Config) -> None:
    _config[:] = [config]


def missing(resource: str, why: str) -> NoReturn:
    """Skip the calling test (fail it in strict mode) because ``resource`` (a key of RESOURCES) is missing: ``why``."""
    assert resource in RESOURCES, resource
    message = f"{_PREFIX}{resource}: {why}"
    if _config and _strict(_config[0]):
        pytest.fail(f"{message} (strict mode: --strict-resources or HPO_TEST_STRICT=1)", pytrace=False)
    pytest.skip(message)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """One block at the end: each missing resource, the tests it skipped, and how to provide it."""
    counts: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report).removeprefix("Skipped: ")
        if reason.startswith(_PREFIX):
            counts[reason.removeprefix(_PREFIX).split(":", 1)[0]] += 1
    if not counts:
        return
    terminalreporter.section("missing resources: these tests did not run", sep="=", yellow=True, bold=True)
    for resource, count in sorted(counts.items()):
        terminalreporter.line(f"{resource:<11} {count:>4} tests skipped; needs {RESOURCES[resource]}")
    terminalreporter.line("(--strict-resources or HPO_TEST_STRICT=1 makes each of these skips a failure)")


def _archive() -> Path | None:
    if os.environ.get("HPO_DATA_ARCHIVE"):
        return Path(os.environ["HPO_DATA_ARCHIVE"])
    shared = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
    return shared if shared.is_file() else None


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decode the archive at most once per test session, never into the user's cache, never online."""
    os.environ["HPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HPO_OFFLINE"] = "1"
    os.environ.pop("HPO_STORAGE", None)
    # torch.hub's cache (pretrained weights): an empty one, never the user's; stand_in_torch_home holds one file.
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))


@pytest.fixture(scope="session")
def archive() -> Path:
    path = _archive()
    if path is None or not path.is_file():
        missing("dataset", f"no CIFAR-10 archive at {path}" if path else "HPO_DATA_ARCHIVE is unset and ../shared is absent")
    return path


TINY_STUDY = """
[study]
name = "{name}"
seed = 0

[data]
dataset = "cifar10"
data_dir = "{data_dir}"
val_fraction = 0.1
train_subset = {train_subset}
val_subset = 128

[train]
max_epochs = {max_epochs}
device = "cpu"
augment = true

[sampler]
type = "{sampler}"

[pruner]
{pruner}

[space]
lr = {lr}
batch_size = {{ choices = [32, 64] }}
depth = {{ low = 1, high = 2 }}
base_width = 8
optimizer = {{ choices = ["sgd", "adamw"] }}
"""


def write_study(
    folder: Path,
    *,
    archive: Path,
    name: str = "tiny",
    max_epochs: int = 2,
    sampler: str = "random",
    pruner: str = 'type = "none"',
    lr: str = "{ low = 1e-3, high = 1e-1, log = true }",
    train_subset: int = 256,
) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        TINY_STUDY.format(
            name=name, data_dir=archive.as_posix(), max_epochs=max_epochs, sampler=sampler, pruner=pruner, lr=lr,
            train_subset=train_subset,
        )
    )
    return path


@dataclass(frozen=True)
class FinishedStudy:
    """A real tiny study in SQLite, with completed and pruned trials; tests read it and never change it."""

    study_file: Path
    url: str
    name: str


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory, image_archive: Path) -> FinishedStudy:
    """5 trials of 2 epochs on the generated images: the median pruner starts after 2 completed trials; with seed 0
    trials 0-3 complete and trial 4 is pruned (its epoch-1 loss, 2.33, is 0.05 above the median of the others' 2.27,
    far beyond run-to-run noise; measured on the 2-core development CPU)."""
    from hpo.run import main

    folder = tmp_path_factory.mktemp("finished")
    study_file = write_study(
        folder, archive=image_archive, max_epochs=2, pruner='type = "median"\nn_startup_trials = 2\nn_warmup_steps = 0',
        lr="{ low = 1e-5, high = 1e-1, log = true }",
    )
    url = f"sqlite:///{folder / 'hpo.db'}"
    assert main(["--study", str(study_file), "--n-trials", "5", "--storage", url, "--quiet"]) == 0
    return FinishedStudy(study_file=study_file, url=url, name="tiny")


@pytest.fixture(scope="session")
def told_study(tmp_path_factory: pytest.TempPathFactory) -> FinishedStudy:
    """A study shaped like ``finished_study`` (3 complete trials of 2 epochs, 2 pruned after 1), told by hand:
    for tests of reading a study, which need no training."""
    folder = tmp_path_factory.mktemp("told")
    study_file = write_study(folder, archive=folder / "no-data.tar.gz", max_epochs=2)
    url = f"sqlite:///{folder / 'hpo.db'}"
    study = optuna.create_study(study_name="tiny", storage=url)
    study.set_metric_names(["val_loss"])
    distributions = {
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([32, 64]),
    }
    for number, (lr, losses) in enumerate([(1e-2, [2.1, 1.9]), (1e-3, [2.2, 2.0]), (1e-4, [2.4]), (3e-3, [2.0, 1.8]), (1e-5, [2.5])]):
        trial = study.ask(distributions)
        trial.set_user_attr("seed", number)
        for epoch, loss in enumerate(losses, start=1):
            trial.report(loss, epoch)
        trial.set_user_attr("val_accuracy", 0.3)
        trial.set_user_attr("best_epoch", len(losses))
        if len(losses) == 2:
            study.tell(trial, losses[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return FinishedStudy(study_file=study_file, url=url, name="tiny")


def synthetic_jpegs(count: int, *, size: int = 32, classes: int = 10, seed: int = 0) -> list[bytes]:
    """``count`` JPEG files of ``size`` px RGB: image ``i`` is class ``i % classes``'s own colour under noise, so a
    small CNN tells the classes apart within an epoch or two.  For tests that need images, not CIFAR-10's content."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, (classes, 3))  # one mean colour per class, 0-255
    found = []
    for i in range(count):
        pixels = palette[i % classes] + rng.normal(0, 35, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        found.append(buffer.getvalue())
    return found


@pytest.fixture(scope="session")
def jpegs() -> list[bytes]:
    """210 generated JPEG files (:func:`synthetic_jpegs`), for image folders built by the tests."""
    return synthetic_jpegs(210)


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .tar.gz of ``train/<class>/`` (170 JPEGs per class) and ``test/<class>/`` (10), as the CIFAR-10 archive, of
    10 classes of 32 px generated images (:func:`synthetic_jpegs`; 2.3 MB, made in about a second): a stand-in for
    the CIFAR-10 archive wherever a test needs images of CIFAR's shape, not its content, so that it runs on a fresh
    clone.  1,530 training images after the validation part: as many as the tests' ``train_subset`` asks for."""
    import tarfile

    root = tmp_path_factory.mktemp("image-archive")
    names = [f"class{k}" for k in range(10)]
    images = iter(synthetic_jpegs(1800, classes=10, seed=1))
    for split, per_class in (("train", 170), ("test", 10)):
        for index in range(per_class):
            for name in names:  # class after class, so the i-th image is class i % 10 as generated
                path = root / "images" / split / name / f"{index:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(next(images))
    archive = root / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / "images" / split, arcname=split)
    return archive


def image_folder(root: Path, jpegs: list[bytes], *, per_class: int, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """``root/train/<class>/`` with ``per_class`` real JPEGs per class and ``root/test/<class>/`` with one."""
    files = iter(jpegs)
    for split, count in (("train", per_class), ("test", 1)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:04d}.jpg").write_bytes(next(files))
    return root


@pytest.fixture
def record_evaluations(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[str]]:
    """``record_evaluations(test_images)`` records every later ``hpo.training.fit.evaluate`` call, in order: "test" for a
    split of ``test_images`` images (the test set), "val" for any other. The real evaluation still runs."""
    import hpo.training.fit

    def start(test_images: int) -> list[str]:
        evaluated: list[str] = []
        real_evaluate = hpo.training.fit.evaluate

        def recording_evaluate(model, split, *args, **kwargs):  # type: ignore[no-untyped-def]
            evaluated.append("test" if len(split) == test_images else "val")
            return real_evaluate(model, split, *args, **kwargs)

        monkeypatch.setattr(hpo.training.fit, "evaluate", recording_evaluate)
        return evaluated

    return start


@pytest.fixture(scope="session")
def stand_in_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose torch.hub cache holds a stand-in for ResNet18's DEFAULT weights, at the path torchvision
    reads them from: the state dict of a ``torchvision.models.resnet18()`` seeded with 0 (no real weights can be
    downloaded here). Tests point ``TORCH_HOME`` at it with ``monkeypatch.setenv``."""
    from urllib.parse import urlparse

    import torch
    import torchvision

    home = tmp_path_factory.mktemp("torch-home-stand-in")
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    path = home / "hub" / "checkpoints" / Path(urlparse(url).path).name
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return home


def random_image_folder(
    root: Path, *, train: int, test: int, size: int, classes: tuple[str, ...] = ("a", "b"), seed: int = 0
) -> Path:
    """``root/train/<class>/`` with ``train`` random ``size`` px PNGs per class and ``root/test/<class>/`` with ``test``:
    a dataset for tests that need images of some shape but no learnable content."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    return root
