"""Your own model: by import path, by entry point, by @hpo.register_model and by hpo.search(model=...).

The models live in modules the tests write into a temporary folder; the images are a tiny generated
image folder, so nothing here needs the CIFAR-10 archive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch

import hpo
from conftest import random_image_folder
from hpo.errors import SpecError
from hpo.results.retrain import load_model
from hpo.run import main as run_main
from hpo.studyfile.spec import load_spec
from hpo.training import user_models

# Writes the keyword arguments of every build to $RECORD (one JSON line each), so tests see what reached it.
MODEL_MODULE = '''
import json, os
from torch import nn

def build(in_channels, num_classes, image_size, *, width, blocks):
    if os.environ.get("RECORD"):
        with open(os.environ["RECORD"], "a") as handle:
            handle.write(json.dumps({"width": width, "blocks": blocks, "image_size": image_size}) + "\\n")
    layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(blocks - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''

STUDY = """
[study]
name = "{name}"
[data]
dataset = "image_folder"
data_dir = "{data_dir}"
image_size = 16
val_fraction = 0.25
[train]
max_epochs = 1
device = "cpu"
[model]
name = "{model}"
[model.space]
width = {{ choices = [4, 8] }}
blocks = {{ low = 1, high = 2 }}
[space]
lr = {{ low = 1e-3, high = 1e-1, log = true }}
batch_size = 8
[sampler]
type = "random"
[pruner]
type = "none"
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/ with 12 random 20 px images per class, test/<class>/ with 3."""
    return random_image_folder(tmp_path_factory.mktemp("photos"), train=12, test=3, size=20, classes=("cat", "dog"))


def _study(folder: Path, photos: Path, *, model: str, name: str = "mine", module: str | None = MODEL_MODULE) -> Path:
    if module is not None:
        (folder / "mymodels.py").write_text(module)
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, data_dir=photos.as_posix(), model=model))
    return path


@pytest.mark.slow
def test_a_user_model_by_import_path_is_searched_retrained_and_reported_from_the_command_line(
    tmp_path: Path, photos: Path
) -> None:
    study_file = _study(tmp_path, photos, model="mymodels:build")
    record = tmp_path / "builds.jsonl"
    env = dict(os.environ, RECORD=str(record), PYTHONPATH=os.pathsep.join(sys.path))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"

    def hpo_command(*argv: str) -> subprocess.CompletedProcess[str]:
        # cwd = the folder of mymodels.py: "importable from the working directory".
        return subprocess.run([sys.executable, "-m", *argv, "--storage", url], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    done = hpo_command("hpo.run", "--study", str(study_file), "--n-trials", "3", "-q")
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="mine", storage=url)
    assert study.user_attrs["model"] == "mymodels:build"
    built = [json.loads(line) for line in record.read_text().splitlines()]
    for trial in study.trials:
        assert set(trial.params) >= {"width", "blocks", "lr"}
        # Sampled, stored, and what reached the builder (the first build is the check before the study).
        assert {"width": trial.params["width"], "blocks": trial.params["blocks"], "image_size": 16} in built[1:]
    assert len(built) == 1 + len(study.trials)

    done = hpo_command("hpo.best", "--study", str(study_file), "--out", str(tmp_path / "out"), "-q")
    assert done.returncode == 0, done.stderr
    saved = load_model(tmp_path / "out" / f"mine-trial{study.best_trial.number}.pt")
    assert saved.model == "mymodels:build"
    assert dict(saved.hyperparameters.model_params) == {k: study.best_trial.params[k] for k in ("width", "blocks")}

    done = hpo_command("hpo.report", "--study", str(study_file), "--out", str(tmp_path / "report"), "-q")
    assert done.returncode == 0, done.stderr
    columns = (tmp_path / "report" / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"width", "blocks"} <= set(columns)


@pytest.mark.slow
def test_a_builder_from_python_and_a_registered_name_are_searched_and_retrained(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    study_file = _study(tmp_path, photos, model="cnn-placeholder", module=MODEL_MODULE)
    study_file.write_text(study_file.read_text().replace('name = "cnn-placeholder"', 'name = "tinynet"'))
    from mymodels import build  # type: ignore[import-not-found]

    hpo.register_model("tinynet")(build)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = hpo.search(study_file, n_trials=2, storage=url)
    assert study.user_attrs["model"] == "tinynet" and {"width", "blocks"} <= set(study.best_trial.params)
    assert hpo.retrain(study, study_file=study_file).model == "tinynet"

    def notebook_model(in_channels: int, num_classes: int, image_size: int, *, width: int, blocks: int) -> torch.nn.Module:
        return build(in_channels, num_classes, image_size, width=width, blocks=blocks)

    notebook_model.__module__ = "__main__"  # as a function typed into a notebook is
    study = hpo.search(study_file, n_trials=2, storage=url, study_name="from-python", model=notebook_model)
    assert study.user_attrs["model"] == "notebook_model"
    saved = hpo.retrain(study, study_file=study_file, model=notebook_model)
    assert saved.build()(torch.zeros(1, 3, 16, 16)).shape == (1, 2)


def test_an_installed_package_registers_a_model_through_the_entry_point_group(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "epmodels.py").write_text(MODEL_MODULE)
    info = tmp_path / "epmodels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epmodels\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hpo.models]\nepnet = epmodels:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec(_study(tmp_path, photos, model="epnet", module=None))
    assert spec.model.name == "epnet"
    user_models.check_user_model("epnet", {"width": 4, "blocks": 1}, in_channels=3, num_classes=2, image_size=16, where="[model]")
    model = user_models.build_user_model("epnet", {"width": 4, "blocks": 2}, in_channels=3, num_classes=5, image_size=16)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 5)


def test_a_registered_name_is_valid_in_a_study_file_only_once_registered(tmp_path: Path, photos: Path) -> None:
    study_file = _study(tmp_path, photos, model="lateblooming")
    with pytest.raises(SpecError, match="name must be a built-in model .* got 'lateblooming'"):
        load_spec(study_file)
    hpo.register_model("lateblooming")(lambda in_channels, num_classes, image_size, **params: torch.nn.Identity())
    assert load_spec(study_file).model.name == "lateblooming"
    with pytest.raises(ValueError, match="taken"):
        hpo.register_model("pkg.mod:build")(lambda **kwargs: torch.nn.Identity())


BAD_MODELS = [
    ("nosuchmodule:build", None, "cannot import module 'nosuchmodule' (ModuleNotFoundError"),
    ("mymodels:build", "raise RuntimeError('boom at import')", "cannot import module 'mymodels' (RuntimeError: boom at import)"),
    ("mymodels:nothing", "def build(**kw): pass", "module 'mymodels' has no attribute 'nothing'"),
    ("mymodels:build", "build = 3", "int is not callable"),
    ("mymodels:build", "def build(in_channels, num_classes, image_size, **p):\n    raise ValueError('no such width')",
     "building the model raised ValueError: no such width"),
    ("mymodels:build", "def build(in_channels, num_classes, image_size, **p):\n    return 7",
     "the builder returned int, not a torch.nn.Module"),
    ("mymodels:build", "from torch import nn\ndef build(in_channels, num_classes, image_size, **p):\n"
     "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, 3))",
     "the model gives (2, 3) for a batch of 2 images of 3x16x16; expected (2, 2): one logit per class"),
    ("mymodels:build", "from torch import nn\ndef build(in_channels, num_classes, image_size, **p):\n"
     "    return nn.Linear(5, num_classes)", "the model failed on a batch of 2 images of 3x16x16: RuntimeError"),
    ("mymodels:build", "from torch import nn\ndef build(in_channels, num_classes, image_size, *, width):\n"
     "    return nn.Identity()", "the builder takes no argument 'blocks' (a [model.space] hyperparameter)"),
]


@pytest.mark.parametrize(("model", "module", "message"), BAD_MODELS, ids=[m for _, _, m in BAD_MODELS])
def test_a_broken_user_model_is_one_line_exit_2_and_nothing_stored(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    model: str, module: str | None, message: str,
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    study_file = _study(tmp_path, photos, model=model, module=textwrap.dedent(module) if module else None)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert run_main(["--study", str(study_file), "--n-trials", "1", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hpo.run: error: {study_file}: [model] name {model!r}: "), err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "hpo.db").exists()


def test_a_study_searched_with_one_model_is_not_resumed_with_another(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpo.studyfile.spec import with_model
    from hpo.tuning.storage import open_storage
    from hpo.tuning.study import open_study

    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec(_study(tmp_path, photos, model="mymodels:build"))
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", "--storage")
    assert open_study(spec, storage).user_attrs["model"] == "mymodels:build"
    hpo.register_model("othernet")(lambda in_channels, num_classes, image_size, **params: torch.nn.Identity())
    with pytest.raises(Exception, match="already exists with model 'mymodels:build', not 'othernet'"):
        open_study(with_model(spec, "othernet"), storage)
