"""torchvision backbones: pretrained weights from torchvision's cache or a local file, a new head, fine-tuning.

No real pretrained weights can be had here: the "pretrained" weights are a seeded model's state dict,
written where torchvision looks for them (``stand_in_torch_home``) or to a local file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import optuna
import pytest
import torch
import torchvision
from torch import nn

from hpo.errors import DataError, SpecError
from hpo.run import main
from hpo.studyfile.space import Hyperparameters
from hpo.studyfile.spec import load_spec
from hpo.training.backbones import HEAD_ATTRIBUTE, head_parameter_names, pretrained_input
from hpo.training.fit import fit, load_checkpoint
from hpo.training.models import build_model
from hpo.training.optimization import make_optimizer, make_schedule
from hpo.training.recipe import prepare_model, train_config
from hpo.training.splits import Dataset, SearchData, Split

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
RESNET18 = torchvision.models.ResNet18_Weights.DEFAULT


def _expected_cache_path(home: Path) -> Path:
    """Where torchvision's weights API reads ResNet18's DEFAULT weights with TORCH_HOME=home."""
    return home / "hub" / "checkpoints" / Path(urlparse(RESNET18.url).path).name


def _resnet18(hp: Hyperparameters | None = None, *, weights: str | None = "DEFAULT", classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return build_model(
        "torchvision:resnet18", hp or Hyperparameters(), in_channels=3, num_classes=classes, image_size=32, weights=weights
    )


def _study(tmp_path: Path, model: str, space: str = "", max_epochs: int = 2) -> Path:
    path = tmp_path / "ft.toml"
    path.write_text(f"[train]\nmax_epochs = {max_epochs}\ndevice = 'cpu'\n[model]\n{model}\n[space]\n{space}\n")
    return path


def _dataset(channels: int = 3, classes: int = 2, size: int = 32) -> Dataset:
    images = torch.randint(0, 256, (16, size, size, channels), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % classes
    return Dataset(
        name="image_folder", source="generated", classes=tuple(f"c{i}" for i in range(classes)),
        train_images=images, train_labels=labels, test_images=images, test_labels=labels,
        mean=(0.5,) * channels, std=(0.25,) * channels,
    )


def test_default_weights_come_from_torchvisions_cache_and_only_the_head_is_new(
    stand_in_torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(stand_in_torch_home))
    saved = torch.load(_expected_cache_path(stand_in_torch_home), weights_only=True)
    model = _resnet18(classes=3)
    state = model.state_dict()
    assert getattr(model, HEAD_ATTRIBUTE) == "fc" and model.fc.out_features == 3
    assert head_parameter_names(model) == {"fc.weight", "fc.bias"}
    body = [key for key in saved if not key.startswith("fc.")]
    assert len(body) == len(state) - 2 and all(torch.equal(state[key], saved[key]) for key in body)
    random = _resnet18(weights=None)
    assert not torch.equal(random.state_dict()["conv1.weight"], saved["conv1.weight"]), "the file's weights, not a seed's"


def test_a_pretrained_model_sees_its_weights_normalization_and_other_models_the_datasets(
    stand_in_torch_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(stand_in_torch_home))
    transforms = RESNET18.transforms()
    expected = (tuple(transforms.mean), tuple(transforms.std))
    described = pretrained_input("resnet18", "DEFAULT")
    assert described is not None and (described.mean, described.std) == expected
    assert (described.image_size, described.weights) == (224, "ResNet18_Weights.IMAGENET1K_V1")
    prepared = prepare_model(load_spec(_study(tmp_path, 'name = "torchvision:resnet18"\nweights = "DEFAULT"')), _dataset())
    assert (prepared.mean, prepared.std) == expected
    for model in ('name = "torchvision:resnet18"', 'name = "cnn"'):  # random weights: the dataset's own statistics
        prepared = prepare_model(load_spec(_study(tmp_path, model)), _dataset())
        assert (prepared.mean, prepared.std) == ((0.5,) * 3, (0.25,) * 3)


def test_a_local_weights_file_of_another_class_count_loads_into_another_arch(tmp_path: Path) -> None:
    torch.manual_seed(2)
    saved = torchvision.models.mobilenet_v3_small(num_classes=7).state_dict()
    path = tmp_path / "mine.pth"
    torch.save(saved, path)
    model = build_model("torchvision:mobilenet_v3_small", Hyperparameters(), in_channels=3, num_classes=2, image_size=32, weights=str(path))
    state = model.state_dict()
    assert getattr(model, HEAD_ATTRIBUTE) == "classifier.3" and model.classifier[3].out_features == 2
    body = [key for key in saved if not key.startswith("classifier.3.")]
    assert len(body) == len(state) - 2 and all(torch.equal(state[key], saved[key]) for key in body)
    described = pretrained_input("mobilenet_v3_small", str(path))
    assert described is not None and described.mean == (0.485, 0.456, 0.406), "a file expects the DEFAULT weights' input"


def test_init_reinitializes_only_the_new_head_of_a_pretrained_model(stand_in_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(stand_in_torch_home))
    kept, head_init = _resnet18(Hyperparameters(init="kaiming")), _resnet18()
    assert torch.equal(kept.conv1.weight, head_init.conv1.weight), "the pretrained conv is not re-initialized"
    assert (kept.fc.bias == 0).all() and not (head_init.fc.bias == 0).all()


def test_random_weights_take_one_channel_images_and_the_head_is_found_generically() -> None:
    model = build_model("torchvision:squeezenet1_1", Hyperparameters(), in_channels=1, num_classes=4, image_size=48)
    assert getattr(model, HEAD_ATTRIBUTE) == "classifier.1" and model.classifier[1].out_channels == 4
    assert model.eval()(torch.randn(2, 1, 48, 48)).shape == (2, 4)


@pytest.mark.parametrize("offline", [True, False])
def test_missing_weights_offline_are_one_line_naming_them_and_their_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], offline: bool
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    attempts: list[str] = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    if offline:
        monkeypatch.setenv("HPO_OFFLINE", "1")
    else:
        monkeypatch.delenv("HPO_OFFLINE")
    with pytest.raises(DataError) as caught:
        _resnet18()
    message = str(caught.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and str(_expected_cache_path(tmp_path / "empty-home")) in message
    assert "\n" not in message
    assert attempts == ([] if offline else [RESNET18.url])
    assert ("HPO_OFFLINE=1" if offline else "Temporary failure in name resolution") in message
    # hpo.run says so in one line, exit code 2, before the storage is created.
    folder = tmp_path / "images"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(2):
                torchvision.utils.save_image(torch.rand(3, 8, 8), folder / split / label / f"{i}.png")
    study = _study(tmp_path, 'name = "torchvision:resnet18"\nweights = "DEFAULT"')
    study.write_text(study.read_text() + f'[data]\ndataset = "image_folder"\ndata_dir = "{folder}"\n')
    database = tmp_path / "hpo.db"
    capsys.readouterr()
    assert main(["--study", str(study), "--n-trials", "1", "--storage", f"sqlite:///{database}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(study) in err and str(_expected_cache_path(tmp_path / "empty-home")) in err
    assert not database.exists()


BAD_MODELS = [
    ('name = "torchvision:res-net"', "", r"\[model\]: name must be torchvision:<arch> .*got 'torchvision:res-net'"),
    ('name = "vgg"', "", r"\[model\]: name must be a built-in model .*, torchvision:<arch> \(e.g. 'torchvision:resnet18'\), .*got 'vgg'"),
    ('name = "cnn"\nweights = "DEFAULT"', "", r"\[model\]: weights is for torchvision:<arch> models only, got name 'cnn'"),
    ('name = "torchvision:resnet18"\nweights = "imagenet"', "", r"\[model\]: weights must be \"DEFAULT\", a weights name"),
    ('name = "cnn"', "freeze_epochs = 1", r"\[space\] freeze_epochs fine-tunes torchvision:<arch> models only, not model 'cnn'"),
    ('name = "resnet18"', "backbone_lr_scale = 0.1", r"\[space\] backbone_lr_scale fine-tunes torchvision:<arch> models only"),
    ('name = "torchvision:resnet18"', "depth = 3", r"\[space\] depth shapes the cnn model only; model 'torchvision:resnet18'"),
    ('name = "torchvision:resnet18"', "backbone_lr_scale = 0", r"\[space\] backbone_lr_scale must be in \(0, 1\], got 0"),
]


@pytest.mark.parametrize(("model", "space", "message"), BAD_MODELS, ids=[m for _, _, m in BAD_MODELS])
def test_bad_model_in_the_study_file_is_one_line_naming_the_file(tmp_path: Path, model: str, space: str, message: str) -> None:
    path = _study(tmp_path, model, space)
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


BAD_BACKBONES = [
    ('name = "torchvision:resnet19"', 3, r"torchvision has no classification model 'resnet19'; e\.g\. resnet18"),
    ('name = "torchvision:resnet18"\nweights = "IMAGENET1K_V9"', 3, r"has no weights 'IMAGENET1K_V9'; it has IMAGENET1K_V1, DEFAULT"),
    ('name = "torchvision:resnet18"\nweights = "missing/resnet.pth"', 3, r"weights: no such file missing/resnet\.pth"),
    ('name = "torchvision:resnet18"\nweights = "DEFAULT"', 1, r"takes RGB images, the data has 1 channel; set \[data\] channels = 3"),
    ('name = "torchvision:vit_b_16"', 3, r"torchvision:vit_b_16 cannot take 32 x 32 px images"),
    ('name = "torchvision:resnet18"\nweights = "not-weights.pt"', 3, r"weights: not-weights\.pt is not a state dict \(a dict of tensors"),
    ('name = "torchvision:resnet18"\nweights = "mobilenet.pt"', 3, r"mobilenet\.pt is not a state dict of torchvision:resnet18 \(\d+ missing and \d+ unexpected"),
]


@pytest.mark.parametrize(("model", "channels", "message"), BAD_BACKBONES, ids=[m for _, _, m in BAD_BACKBONES])
def test_a_model_that_cannot_be_built_is_one_line_naming_the_file_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in_torch_home: Path, model: str, channels: int, message: str
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(stand_in_torch_home))
    monkeypatch.chdir(tmp_path)
    torch.save({"epochs": 3}, "not-weights.pt")
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), "mobilenet.pt")
    path = _study(tmp_path, model)
    with pytest.raises((SpecError, DataError), match=message) as caught:
        prepare_model(load_spec(path), _dataset(channels=channels))
    assert str(caught.value).startswith(f"{path}: [model] ") and "\n" not in str(caught.value)


def _config(tmp_path: Path, hp: Hyperparameters, max_epochs: int = 2):  # type: ignore[no-untyped-def]
    return train_config(load_spec(_study(tmp_path, 'name = "torchvision:resnet18"', max_epochs=max_epochs)), hp, seed=0, device=CPU)


def test_the_backbone_learns_at_lr_times_backbone_lr_scale_and_the_head_at_lr(tmp_path: Path) -> None:
    hp = Hyperparameters(lr=0.01, backbone_lr_scale=0.1, optimizer="sgd", schedule="onecycle")
    model = _resnet18(hp, weights=None)
    optimizer = make_optimizer(model, _config(tmp_path, hp))
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (pytest.approx(0.001), 0.01)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(backbone["params"]) == len(list(model.parameters())) - 2
    make_schedule(optimizer, _config(tmp_path, hp), steps_per_epoch=4)
    assert [group["max_lr"] for group in optimizer.param_groups] == [pytest.approx(0.001), 0.01], "one-cycle peaks per group"
    cnn = build_model("cnn", hp, in_channels=3, num_classes=3, image_size=32)
    assert [group["lr"] for group in make_optimizer(cnn, _config(tmp_path, hp)).param_groups] == [0.01]


def _search_data(classes: int = 2) -> SearchData:
    dataset = _dataset(classes=classes)
    split = Split(images=dataset.train_images, labels=dataset.train_labels)
    return SearchData(train=split, val=split, mean=dataset.mean, std=dataset.std, num_classes=classes, image_shape=(3, 32, 32))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.slow
def test_only_the_head_trains_during_the_freeze_epochs_then_everything(
    tmp_path: Path, stand_in_torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(stand_in_torch_home))
    hp = Hyperparameters(lr=0.01, batch_size=8, optimizer="adamw", weight_decay=0.1, freeze_epochs=1, backbone_lr_scale=0.5)
    model = _resnet18(hp, classes=2)
    states = [_snapshot(model)]
    fit(model, _search_data(), _config(tmp_path, hp), lambda result: states.append(_snapshot(model)))
    start, after_1, after_2 = states
    head = {"fc.weight", "fc.bias"}
    running = [key for key in start if "running_" in key]  # BatchNorm statistics
    assert running and all(torch.equal(after_1[key], start[key]) for key in start if key not in head), \
        "epoch 1: no backbone weight (weight decay included) and no BatchNorm statistic changed"
    assert all(not torch.equal(after_1[key], start[key]) for key in head), "epoch 1: the head trained"
    assert not torch.equal(after_2["conv1.weight"], after_1["conv1.weight"]), "epoch 2: the backbone trains"
    assert not torch.equal(after_2["bn1.running_mean"], after_1["bn1.running_mean"]), "and its BatchNorm statistics move"
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_a_resumed_fit_freezes_the_same_epochs(tmp_path: Path) -> None:
    hp = Hyperparameters(lr=0.01, batch_size=8, optimizer="sgd", freeze_epochs=2, backbone_lr_scale=0.5)
    config, data = _config(tmp_path, hp, max_epochs=3), _search_data()
    whole = _resnet18(hp, weights=None, classes=2)
    fit(whole, data, config)
    interrupted, checkpoint = _resnet18(hp, weights=None, classes=2), tmp_path / "trial.pt"
    fit(interrupted, data, config, checkpoint=checkpoint, stop_after=1)
    resumed = _resnet18(hp, weights=None, classes=2)
    fit(resumed, data, config, resume=load_checkpoint(checkpoint))  # epochs 2 (still frozen) and 3
    for key, value in whole.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[key].float()), key


@pytest.mark.slow
def test_the_finetune_study_runs_with_stand_in_weights(tmp_path: Path, stand_in_torch_home: Path) -> None:
    """python -m hpo.run on studies/finetune.toml made tiny: 2 trials of 2 epochs on 20 generated 32 px images."""
    text = (ROOT / "studies" / "finetune.toml").read_text()
    assert "image_size = 144" in text
    study = tmp_path / "finetune.toml"
    study.write_text(text.replace("image_size = 144", "image_size = 32"))
    folder = tmp_path / "images"
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 10), ("test", 1)):
        for label in ("ants", "bees"):
            (folder / split / label).mkdir(parents=True)
            for i in range(count):
                torchvision.utils.save_image(torch.rand(3, 40, 40, generator=generator), folder / split / label / f"{i}.png")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = {**os.environ, "TORCH_HOME": str(stand_in_torch_home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "hpo.run", "--study", str(study), "--n-trials", "2", "--max-epochs", "2", "--storage", url,
         "--data-dir", str(folder), "--device", "cpu", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="finetune", storage=url).trials
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)
    assert all({"freeze_epochs", "backbone_lr_scale", "lr"} <= set(t.params) for t in trials)


def test_a_pretrained_model_without_an_image_size_gets_its_weights_native_size(tmp_path: Path) -> None:
    """[data] image_size unset: 224 px for ImageNet weights (what the features were learned at), the dataset's own
    size for random weights and the other models; a size in the study file always wins."""
    from hpo.studyfile.spec import load_spec
    from hpo.training.recipe import model_image_size

    pretrained = tmp_path / "p.toml"
    pretrained.write_text('[model]\nname = "torchvision:resnet18"\nweights = "DEFAULT"\n')
    assert model_image_size(load_spec(pretrained)) == 224
    pretrained.write_text('[model]\nname = "torchvision:mobilenet_v3_small"\nweights = "IMAGENET1K_V1"\n')
    assert model_image_size(load_spec(pretrained)) == 224
    random = tmp_path / "r.toml"
    random.write_text('[model]\nname = "torchvision:resnet18"\n')
    assert model_image_size(load_spec(random)) is None
    random.write_text('[model]\nname = "cnn"\n')
    assert model_image_size(load_spec(random)) is None
