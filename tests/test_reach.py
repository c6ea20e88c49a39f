"""Every hyperparameter reaches what it claims to change: the built model, optimizer, schedule, loss or batches.

Each check goes the way a trial does: a ``[space]`` table → ``suggest`` → ``build_model`` /
``hpo.training.recipe.train_config`` → the ``hpo.training`` factories, and inspects the resulting objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from hpo.studyfile import names
from hpo.studyfile.names import DATASETS
from hpo.studyfile.space import PARAMETERS, Hyperparameters, parse_space
from hpo.studyfile.spec import load_spec
from hpo.training.batches import Batch, Normalizer, make_augmentation, train_batches, training_batches
from hpo.training.models import MODELS, build_model, count_parameters, register_model
from hpo.training.optimization import make_loss, make_optimizer, make_schedule
from hpo.training.recipe import train_config
from hpo.training.splits import Split
from hpo.tuning.objective import suggest

CPU = torch.device("cpu")


def _hp(**fixed: object) -> Hyperparameters:
    """The configuration a trial gets from a [space] table of fixed values."""
    study = optuna.create_study()
    return suggest(study.ask(), parse_space(fixed))


def _model(hp: Hyperparameters, name: str = "cnn", *, channels: int = 3, size: int = 32) -> nn.Module:
    return build_model(name, hp, in_channels=channels, num_classes=10, image_size=size)


def _optimizer(hp: Hyperparameters, tmp_path: Path) -> torch.optim.Optimizer:
    return make_optimizer(_model(hp), _config(hp, tmp_path))


def _config(hp: Hyperparameters, tmp_path: Path, max_epochs: int = 10):
    study_file = tmp_path / "s.toml"
    study_file.write_text(f"[train]\nmax_epochs = {max_epochs}\n")
    return train_config(load_spec(study_file), hp, seed=0, device=CPU)


def _layers(model: nn.Module, kind: type) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


# name → (a [space] table, a check on the model built from it)
MODEL_CHECKS: dict[str, tuple[dict, Callable[[nn.Module], bool]]] = {
    "kernel_size": ({"kernel_size": 5}, lambda m: all(c.kernel_size == (5, 5) and c.padding == (2, 2) for c in _layers(m, nn.Conv2d))),
    "depth": ({"depth": 4}, lambda m: len(_layers(m, nn.Conv2d)) == 4),
    "base_width": ({"base_width": 8, "depth": 3}, lambda m: [c.out_channels for c in _layers(m, nn.Conv2d)] == [8, 16, 32]),
    "dropout": ({"dropout": 0.3}, lambda m: [d.p for d in _layers(m, nn.Dropout)] == [0.3]),
    "stride": ({"stride": 2}, lambda m: all(c.stride == (2, 2) for c in _layers(m, nn.Conv2d))),
    "pool": ({"pool": "avg"}, lambda m: len(_layers(m, nn.AvgPool2d)) == 3 and not _layers(m, nn.MaxPool2d)),
    "batch_norm": ({"batch_norm": False}, lambda m: not _layers(m, nn.BatchNorm2d) and all(c.bias is not None for c in _layers(m, nn.Conv2d))),
    "activation": ({"activation": "gelu"}, lambda m: len(_layers(m, nn.GELU)) == 3 and not _layers(m, nn.ReLU)),
    "conv_dropout": ({"conv_dropout": 0.2}, lambda m: [d.p for d in _layers(m, nn.Dropout2d)] == [0.2] * 3),
    "dense_width": ({"dense_width": 100}, lambda m: [(l.in_features, l.out_features) for l in _layers(m, nn.Linear)] == [(64 * 4 * 4, 100), (100, 10)]),
}


@pytest.mark.parametrize("name", sorted(MODEL_CHECKS))
def test_architecture_hyperparameter_reaches_the_model(name: str) -> None:
    table, check = MODEL_CHECKS[name]
    default = _model(_hp())
    model = _model(_hp(**table))
    assert check(model), model
    assert not check(default), "the check tells the default model apart"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "elu", "tanh", "sigmoid"])
def test_every_activation_is_built(activation: str) -> None:
    kinds = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    model = _model(_hp(activation=activation, dense_width=32))
    assert len(_layers(model, kinds[activation])) == 4, "3 conv blocks and the dense layer"


def test_the_lenet_setting_is_the_tutorial_network() -> None:
    hp = _hp(depth=3, base_width=16, kernel_size=3, dense_width=500, dropout=0.5, batch_norm=False)
    model = _model(hp)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in _layers(model, nn.Conv2d)] == [
        (3, 16, (3, 3), (1, 1)), (16, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)),
    ]
    assert [(l.in_features, l.out_features) for l in _layers(model, nn.Linear)] == [(1024, 500), (500, 10)]
    assert [d.p for d in _layers(model, nn.Dropout)] == [0.5, 0.5]
    assert len(_layers(model, nn.MaxPool2d)) == 3


def test_downsampling_stops_at_one_pixel() -> None:
    model = _model(_hp(depth=5, stride=2, dense_width=16), size=28)
    assert _layers(model, nn.Linear)[0].in_features == 256 * 1 * 1
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("init", "expected_std"), [("kaiming", (2 / (64 * 9)) ** 0.5), ("xavier", (2 * 2 / (64 * 9 + 128 * 9)) ** 0.5)])
def test_init_reaches_every_weight(init: str, expected_std: float) -> None:
    torch.manual_seed(0)
    model = _model(_hp(init=init, base_width=64, depth=2))
    second_conv = _layers(model, nn.Conv2d)[1]  # 64 → 128 channels, 3x3: fan_in 576, fan_out 1152
    assert second_conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    default_std = _layers(_model(_hp(base_width=64, depth=2)), nn.Conv2d)[1].weight.std().item()
    assert default_std == pytest.approx((1 / (3 * 576)) ** 0.5, rel=0.05), "PyTorch's own init is kept by default"
    assert all((l.bias == 0).all() for l in _layers(model, nn.Linear))


@pytest.mark.parametrize("name", ["resnet18", "resnet9"])
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28)])
def test_residual_nets_classify_small_images(name: str, channels: int, size: int) -> None:
    model = _model(_hp(), name, channels=channels, size=size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_resnet18_has_the_small_image_stem() -> None:
    small = _model(_hp(), "resnet18")
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    large = _model(_hp(), "resnet18", size=128)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    assert 11_000_000 < count_parameters(small) < 11_300_000


def test_resnet9_is_pages_network() -> None:
    model = _model(_hp(), "resnet9")
    assert [c.out_channels for c in _layers(model, nn.Conv2d)] == [64, 128, 128, 128, 256, 512, 512, 512]
    assert len(_layers(model, nn.BatchNorm2d)) == 8 and isinstance(model[-4], nn.AdaptiveMaxPool2d)
    assert 6_500_000 < count_parameters(model) < 6_700_000, "Page's ResNet-9 has about 6.6 M weights"


def test_every_built_in_model_name_has_exactly_one_builder() -> None:
    assert set(MODELS) == set(names.MODELS)
    with pytest.raises(ValueError, match="'cnn' is registered twice"):
        register_model("cnn")(lambda hp, **shape: torch.nn.Identity())


def test_every_torchvision_dataset_name_exists_in_torchvision() -> None:
    import torchvision

    for info in DATASETS.values():
        assert info.torchvision_class is None or hasattr(torchvision.datasets, info.torchvision_class)


# name → (a [space] table, a check on the optimizer built from it)
OPTIMIZER_CHECKS: dict[str, tuple[dict, Callable[[torch.optim.Optimizer], bool]]] = {
    "lr": ({"lr": 0.02}, lambda o: o.param_groups[0]["lr"] == 0.02),
    "weight_decay": ({"weight_decay": 1e-3}, lambda o: o.param_groups[0]["weight_decay"] == 1e-3),
    "optimizer": ({"optimizer": "rmsprop"}, lambda o: isinstance(o, torch.optim.RMSprop)),
    "momentum": ({"optimizer": "sgd", "momentum": 0.8}, lambda o: o.param_groups[0]["momentum"] == 0.8),
    "nesterov": ({"optimizer": "sgd", "nesterov": False}, lambda o: o.param_groups[0]["nesterov"] is False),
    "lr_scaling": ({"lr": 0.1, "lr_scaling": "linear", "batch_size": 512}, lambda o: o.param_groups[0]["lr"] == pytest.approx(0.4)),
    "reference_batch_size": (
        {"lr": 0.1, "lr_scaling": "linear", "batch_size": 512, "reference_batch_size": 256},
        lambda o: o.param_groups[0]["lr"] == pytest.approx(0.2),
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CHECKS))
def test_optimization_hyperparameter_reaches_the_optimizer(name: str, tmp_path: Path) -> None:
    table, check = OPTIMIZER_CHECKS[name]
    assert check(_optimizer(_hp(**table), tmp_path))
    assert not check(_optimizer(_hp(optimizer="sgd"), tmp_path)), "the check tells the default sgd optimizer apart"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_is_built(optimizer: str, tmp_path: Path) -> None:
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    assert type(_optimizer(_hp(optimizer=optimizer), tmp_path)) is kinds[optimizer]


def _lrs(table: dict, tmp_path: Path, *, epochs: int = 4, steps: int = 5) -> list[float]:
    """The learning rate of every optimizer step of a whole training run, as fit steps the schedule."""
    hp = _hp(**table)
    config = _config(hp, tmp_path, max_epochs=epochs)
    optimizer = make_optimizer(_model(hp), config)
    schedule = make_schedule(optimizer, config, steps_per_epoch=steps)
    seen = []
    for _ in range(epochs):
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch()
    return seen


def test_schedules_reach_the_learning_rate(tmp_path: Path) -> None:
    assert set(_lrs({"lr": 0.1}, tmp_path)) == {0.1}
    step = _lrs({"lr": 0.1, "schedule": "step", "step_size": 2, "gamma": 0.5}, tmp_path)
    assert step == pytest.approx([0.1] * 10 + [0.05] * 10), "StepLR: per epoch, every step_size epochs times gamma"
    cosine = _lrs({"lr": 0.1, "schedule": "cosine"}, tmp_path)
    assert cosine[0] == 0.1 and cosine[5] == pytest.approx(0.1 * (1 + 2**-0.5) / 2) and len(set(cosine[:5])) == 1
    onecycle = _lrs({"lr": 0.1, "schedule": "onecycle", "warmup_fraction": 0.25}, tmp_path)
    peak = onecycle.index(max(onecycle))
    assert max(onecycle) == pytest.approx(0.1) and peak == 4, "warm-up over a quarter of the 20 steps, per batch"
    assert onecycle[0] == pytest.approx(0.1 / 25) and onecycle[-1] < 0.01


def _loss(table: dict, tmp_path: Path, labels: torch.Tensor) -> tuple[nn.Module, Callable]:
    hp = _hp(**table)
    model = _model(hp)
    return model, make_loss(model, _config(hp, tmp_path), labels, 10)


def test_loss_hyperparameters_reach_the_training_loss(tmp_path: Path) -> None:
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    plain = nn.functional.cross_entropy(logits, labels)
    _, loss = _loss({}, tmp_path, labels)
    assert loss(logits, labels) == pytest.approx(plain.item())
    _, smoothed = _loss({"label_smoothing": 0.2}, tmp_path, labels)
    assert smoothed(logits, labels).item() == pytest.approx(nn.functional.cross_entropy(logits, labels, label_smoothing=0.2).item())
    model, penalized = _loss({"l1": 1e-3}, tmp_path, labels)
    weights = sum(p.abs().sum() for p in model.parameters() if p.ndim > 1)
    assert penalized(logits, labels).item() == pytest.approx((plain + 1e-3 * weights).item(), rel=1e-5)
    penalized(logits, labels).backward()
    assert model[0].weight.grad is not None, "the penalty's gradient reaches the weights"
    imbalanced = torch.tensor([0] * 30 + [1] * 10)
    _, balanced = _loss({"class_weighting": "balanced"}, tmp_path, imbalanced)
    two = torch.tensor([[2.0, 0.0] + [0.0] * 8, [0.0, 2.0] + [0.0] * 8])
    # Class 0 has 3x the images of class 1, so its weight is 1/3 of class 1's: n / (classes * count).
    weight = torch.zeros(10)
    weight[0], weight[1] = 40 / (10 * 30), 40 / (10 * 10)
    expected = nn.functional.cross_entropy(two, torch.tensor([0, 1]), weight=weight[:10])
    assert balanced(two, torch.tensor([0, 1])).item() == pytest.approx(expected.item())


def test_augmentation_hyperparameters_reach_the_batches(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (64, 8, 8, 1), dtype=torch.uint8)
    split = Split(images=images, labels=torch.arange(64))

    def batch(table: dict, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        config = dataclasses.replace(_config(_hp(**table), tmp_path), augment=augment)
        out, labels = next(train_batches(split, batch_size=64, generator=torch.Generator().manual_seed(0), augmentation=make_augmentation(config)))
        return out, images[labels]

    out, original = batch({"crop_padding": 0, "flip": False})
    assert torch.equal(out, original)
    out, original = batch({"crop_padding": 0, "flip": True})
    assert not torch.equal(out, original) and all(torch.equal(o, i) or torch.equal(o, i.flip(1)) for o, i in zip(out, original))
    out, original = batch({"crop_padding": 2, "flip": False})
    assert not torch.equal(out, original) and (out == 0).sum() > (original == 0).sum(), "zero padding shows"
    out, original = batch({}, augment=False)
    assert torch.equal(out, original), "[train] augment = false turns augmentation off"


def _first_batch(table: dict, tmp_path: Path, *, augment: bool = True) -> tuple[Batch, Callable[[torch.Tensor], torch.Tensor]]:
    """The first training batch of a trial with ``table`` (crop and flip off), and the unaugmented inputs of given images."""
    images = torch.randint(0, 256, (16, 8, 8, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    split = Split(images=images, labels=torch.arange(16))
    config = dataclasses.replace(_config(_hp(batch_size=16, crop_padding=0, flip=False, **table), tmp_path), augment=augment)
    normalize = Normalizer(mean=(0.5,), std=(0.25,), device=CPU)
    batch = next(training_batches(split, config, generator=torch.Generator().manual_seed(0), normalize=normalize, epoch=1))
    return batch, lambda labels: normalize(images[labels])


def test_cutout_reaches_the_batches(tmp_path: Path) -> None:
    batch, plain = _first_batch({"cutout": 4}, tmp_path)
    original = plain(batch.labels)
    zeroed = (batch.inputs == 0).flatten(1).sum(1)
    assert ((zeroed >= 2 * 2) & (zeroed <= 4 * 4)).all(), "one 4 x 4 square per image, clipped at the edges to 2 x 2 at least"
    kept = batch.inputs != 0
    assert torch.equal(batch.inputs[kept], original[kept]), "the rest of each image is untouched"
    for table, augment in (({}, True), ({"cutout": 4}, False)):
        batch, plain = _first_batch(table, tmp_path, augment=augment)
        assert torch.equal(batch.inputs, plain(batch.labels)), "no cutout by default or with [train] augment = false"


def test_mixup_reaches_the_batches_and_the_loss(tmp_path: Path) -> None:
    batch, plain = _first_batch({"mixup_alpha": 0.4}, tmp_path)
    assert batch.partner_labels is not None and 0 < batch.lam < 1
    assert not torch.equal(batch.partner_labels, batch.labels)
    blended = batch.lam * plain(batch.labels) + (1 - batch.lam) * plain(batch.partner_labels)
    assert torch.allclose(batch.inputs, blended)
    logits = torch.randn(16, 16)  # the 16 images are 16 classes here
    criterion = make_loss(_model(_hp()), _config(_hp(), tmp_path), batch.labels, 16)
    expected = batch.lam * criterion(logits, batch.labels) + (1 - batch.lam) * criterion(logits, batch.partner_labels)
    assert batch.loss(criterion, logits).item() == pytest.approx(expected.item())
    again, _ = _first_batch({"mixup_alpha": 0.4}, tmp_path)
    assert again.lam == batch.lam, "the blend weights depend on (seed, epoch) only: a resumed fit blends the same"
    for table, augment in (({}, True), ({"mixup_alpha": 0.4}, False)):
        batch, plain = _first_batch(table, tmp_path, augment=augment)
        assert batch.partner_labels is None and torch.equal(batch.inputs, plain(batch.labels))


def test_resized_crop_and_its_scale_reach_the_batches(tmp_path: Path) -> None:
    batch, plain = _first_batch({"crop": "resized", "crop_scale": 0.35}, tmp_path)
    original = plain(batch.labels)
    assert batch.inputs.shape == original.shape and batch.inputs.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(batch.inputs, original, atol=1e-3), "the images are cropped and resized"
    whole, plain = _first_batch({"crop": "resized", "crop_scale": 1.0}, tmp_path)
    assert torch.allclose(whole.inputs, plain(whole.labels), atol=1e-4), "crop_scale 1 keeps the whole (square) image"
    off, plain = _first_batch({"crop": "resized", "crop_scale": 0.35}, tmp_path, augment=False)
    assert torch.equal(off.inputs, plain(off.labels)), "[train] augment = false turns it off"


def test_every_declared_model_exists() -> None:
    declared = {model for param in PARAMETERS.values() for model in param.models or ()}
    assert declared and declared <= set(MODELS) | {names.TORCHVISION_MODELS}


def test_batch_size_reaches_the_batches(tmp_path: Path) -> None:
    config = _config(_hp(batch_size=16), tmp_path)
    split = Split(images=torch.zeros((70, 4, 4, 3), dtype=torch.uint8), labels=torch.zeros(70, dtype=torch.int64))
    sizes = [len(y) for _, y in train_batches(split, batch_size=config.hp.batch_size, generator=torch.Generator(), augmentation=None)]
    assert sizes == [16] * 4


def test_every_hyperparameter_has_a_reach_test() -> None:
    covered = set(MODEL_CHECKS) | set(OPTIMIZER_CHECKS) | {
        "init", "schedule", "step_size", "gamma", "warmup_fraction", "l1", "label_smoothing", "class_weighting",
        "crop_padding", "flip", "batch_size", "cutout", "mixup_alpha", "crop", "crop_scale",
        "freeze_epochs", "backbone_lr_scale",  # tests/test_backbones.py
    }
    assert covered == set(PARAMETERS)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [{"schedule": "step", "step_size": 1, "gamma": 0.5}, {"schedule": "onecycle"}])
def test_a_resumed_fit_continues_the_schedule(schedule: dict, tmp_path: Path) -> None:
    from hpo.training.fit import fit, load_checkpoint
    from hpo.training.splits import SearchData

    generator = torch.Generator().manual_seed(0)
    split = Split(images=torch.randint(0, 256, (32, 8, 8, 1), dtype=torch.uint8, generator=generator), labels=torch.arange(32) % 2)
    data = SearchData(train=split, val=split, mean=(0.5,), std=(0.25,), num_classes=2, image_shape=(1, 8, 8))
    hp = _hp(lr=0.1, batch_size=8, depth=1, base_width=4, **schedule)
    config = _config(hp, tmp_path, max_epochs=3)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return build_model("cnn", hp, in_channels=1, num_classes=2, image_size=8)

    whole = model()
    fit(whole, data, config)

    interrupted, path = model(), tmp_path / "trial.pt"
    assert len(fit(interrupted, data, config, checkpoint=path, stop_after=1).epochs) == 1
    resumed = model()
    fit(resumed, data, config, resume=load_checkpoint(path))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float()), "epochs 2 and 3 ran with the same learning rates as without the stop"


@pytest.mark.slow
def test_fit_stops_where_asked_and_skips_evaluation_when_told(tmp_path: Path) -> None:
    from hpo.training.fit import fit
    from hpo.training.splits import SearchData

    generator = torch.Generator().manual_seed(0)
    split = Split(images=torch.randint(0, 256, (32, 8, 8, 1), dtype=torch.uint8, generator=generator), labels=torch.arange(32) % 2)
    data = SearchData(train=split, val=split, mean=(0.5,), std=(0.25,), num_classes=2, image_shape=(1, 8, 8))
    hp = _hp(lr=0.1, batch_size=8, depth=1, base_width=4, schedule="cosine")
    model = build_model("cnn", hp, in_channels=1, num_classes=2, image_size=8)
    seen = []
    result = fit(model, data, _config(hp, tmp_path, max_epochs=4), lambda r: seen.append(r.epoch), stop_after=2,
                 evaluate_each_epoch=False)
    assert [e.epoch for e in result.epochs] == [1, 2] and seen == [1, 2]
    assert all(e.val_loss != e.val_loss and e.val_accuracy != e.val_accuracy for e in result.epochs), "NaN: not evaluated"
    evaluated = fit(model, data, _config(hp, tmp_path, max_epochs=1))
    assert 0.0 <= evaluated.epochs[0].val_accuracy <= 1.0
