"""Every shipped study runs: one trial of one epoch through ``python -m hpo.run`` on a tiny data set of its shape.

CIFAR-10 studies get a few generated JPEGs per class; the other datasets, which cannot be had offline, get
generated images of their channels, size and class count; pretrained weights,
which cannot be had offline either, a seeded stand-in (``stand_in_torch_home``).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import image_folder
from hpo.run import main
from hpo.studyfile.names import DATASETS
from hpo.studyfile.spec import load_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STUDIES = sorted((ROOT / "studies").glob("*.toml"))
# Classes of the generated stand-ins; image folders get the Intel set's 6.
CLASSES = {"cifar100": 100, "mnist": 10, "fashion_mnist": 10, "image_folder": 6}


def _save(root: Path, split: str, label: str, name: str, pixels: torch.Tensor) -> None:
    from PIL import Image

    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    array = pixels.numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{name}.png")


@pytest.fixture(scope="session")
def cifar_tiny(jpegs: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 training and 1 test image per class, 10 classes of generated 32 px JPEGs, as an image folder: CIFAR-10's
    shape (a study runs on it; what it learns is not checked here)."""
    names = tuple(f"class{k}" for k in range(10))
    return image_folder(tmp_path_factory.mktemp("cifar10-tiny"), jpegs, per_class=5, classes=names)


def _generated(root: Path, *, classes: int, channels: int, size: int, per_class: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("test", 1)):
        for label in range(classes):
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, channels), dtype=torch.uint8, generator=generator)
                _save(root, split, f"class{label:03d}", str(i), pixels)
    return root


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_shipped_study_runs_one_trial(path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    spec = load_spec(path)
    dataset = spec.data.dataset
    if dataset == "cifar10":
        data_dir = request.getfixturevalue("cifar_tiny")
    else:
        info = DATASETS[dataset]
        data_dir = _generated(
            tmp_path / "images",
            classes=CLASSES[dataset],
            channels=spec.data.channels or info.channels or 3,
            size=info.image_size,  # resized to [data] image_size on loading, as real images are
            per_class=2 if CLASSES[dataset] > 10 else 5,
        )
    if spec.model.weights is not None:  # pretrained weights: a seeded stand-in in torch.hub's cache
        request.getfixturevalue("monkeypatch").setenv("TORCH_HOME", str(request.getfixturevalue("stand_in_torch_home")))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    argv = ["--study", str(path), "--n-trials", "1", "--max-epochs", "1", "--storage", url, "--data-dir", str(data_dir)]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    (trial,) = optuna.load_study(study_name=spec.study.name, storage=url).trials
    if spec.study.multi_objective and trial.state == TrialState.PRUNED:  # over a constraint: never trained
        assert trial.user_attrs["pruned_reason"].startswith("infeasible before training: params ")
        return
    # A multi-objective trial records its learning curve as a user attr (Optuna refuses trial.report there).
    epochs = range(1, len(trial.user_attrs["curve"]) + 1) if spec.study.multi_objective else trial.intermediate_values
    assert trial.state == TrialState.COMPLETE and sorted(epochs) == [1]
    assert set(trial.params) <= set(spec.space.searched()) and trial.params
    assert trial.user_attrs["params"] > 0 and trial.user_attrs["worker"]["trial"] == trial.number
