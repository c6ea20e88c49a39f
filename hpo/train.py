"""THE training loop: ``fit(model, data, config, on_epoch_end) -> FitResult``. It knows nothing of Optuna.

Data stays on the device; each step gathers, augments and normalizes its batch there.  Losses and
correct counts accumulate in device tensors and are read once per epoch, so the host never waits
on the GPU inside an epoch.  Activations are channels_last; the forward pass runs in bf16 autocast
on CUDA and on CPUs with native bf16 (``[train] precision = "auto"``), otherwise in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpo.data import Normalizer, SearchData, Split, cut_out, eval_batches, steps_per_epoch, train_batches
from hpo.space import Hyperparameters

# Images per forward pass when evaluating; bounded so that big models still fit in memory.
EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class TrainConfig:
    hp: Hyperparameters  # the trial's configuration: everything the optimizer, schedule, loss and batches read
    max_epochs: int
    augment: bool  # false: no augmentation whatever hp says
    seed: int
    device: torch.device
    compile: bool = False
    precision: str = "auto"  # auto, bf16 or fp32: see uses_bf16


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float
    val_accuracy: float  # fraction in [0, 1]
    train_seconds: float  # wall time of the training pass alone
    seconds: float  # wall time of training and evaluation
    images_per_second: float  # training images per second of train_seconds


@dataclass(frozen=True)
class FitResult:
    epochs: tuple[EpochResult, ...]


EpochCallback = Callable[[EpochResult], None]


@dataclass(frozen=True)
class Checkpoint:
    """Training state at the end of an epoch, enough to continue as if never stopped."""

    epochs: tuple[EpochResult, ...]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, object]
    generator: torch.Tensor  # the shuffling/augmentation RNG state
    schedule: dict[str, object] = dataclasses.field(default_factory=dict)  # the LR scheduler's state; {} without one

    @property
    def epoch(self) -> int:
        return len(self.epochs)


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None when there is none (or only a half-written one)."""
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(
        epochs=tuple(EpochResult(**e) for e in blob["epochs"]),
        model=blob["model"],
        optimizer=blob["optimizer"],
        generator=blob["generator"],
        schedule=blob.get("schedule", {}),
    )


def _save_checkpoint(
    path: Path, *, epochs: list[EpochResult], model: nn.Module, optimizer: torch.optim.Optimizer,
    schedule: Schedule, generator: torch.Generator,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "epochs": [dataclasses.asdict(e) for e in epochs],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
    }
    # Write then rename: a worker killed mid-write leaves the previous epoch's checkpoint intact.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(blob, partial)
    partial.replace(path)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    hp, params = config.hp, model.parameters()
    lr = hp.scaled_lr()
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0, weight_decay=hp.weight_decay,
        )
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}")


class Schedule:
    """The learning-rate schedule, stepped per batch (one-cycle) or per epoch (the others)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, per_batch: bool) -> None:
        self.scheduler = scheduler
        self.per_batch = per_batch

    def after_step(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict[str, object]:
        return {} if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int) -> Schedule:
    lr_scheduler, hp = torch.optim.lr_scheduler, config.hp
    if hp.schedule == "none":
        return Schedule(None, per_batch=False)
    if hp.schedule == "step":
        return Schedule(lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma), per_batch=False)
    if hp.schedule == "cosine":
        # Down to 0 at the end of max_epochs; a trial pruned earlier never gets there.
        return Schedule(lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs), per_batch=False)
    if hp.schedule == "onecycle":
        # Linear warm-up from lr/25 to lr over warmup_fraction of all steps, then linear decay to
        # lr/25/1e4, as in Page's ResNet-9 recipe; momentum stays the momentum hyperparameter.
        return Schedule(
            lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.scaled_lr(), total_steps=config.max_epochs * steps_per_epoch,
                pct_start=hp.warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
            ),
            per_batch=True,
        )
    raise ValueError(f"unknown schedule {hp.schedule!r}")


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(model: nn.Module, config: TrainConfig, train_labels: torch.Tensor, num_classes: int) -> Loss:
    """The training loss: cross-entropy with label smoothing and class weights, plus the L1 penalty.

    Validation always uses plain cross-entropy, so that trials stay comparable.  The class weights
    are computed once here on the device; the L1 term is a device tensor, so no step waits on the host.
    """
    hp, weight = config.hp, None
    if hp.class_weighting == "balanced":
        # n / (classes * count): each class contributes as if the classes were balanced.
        counts = torch.bincount(train_labels, minlength=num_classes).float()
        weight = len(train_labels) / (num_classes * counts.clamp(min=1))
    weights = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights, no biases or norms

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=hp.label_smoothing)
        if hp.l1 > 0:
            value = value + hp.l1 * torch.stack([w.abs().sum() for w in weights]).sum()
        return value

    return loss


def make_augmentation(config: TrainConfig) -> Hyperparameters | None:
    """What augments the training batches: the trial's crop_padding, flip, cutout and mixup_alpha, or nothing."""
    return config.hp if config.augment else None


class Mixup:
    """mixup (Zhang et al., 2018): a batch becomes lam x itself + (1 - lam) x a shuffled copy, and so does its loss.

    lam ~ Beta(alpha, alpha) is drawn on the host from a generator keyed by (seed, epoch), so a
    resumed fit blends exactly as an uninterrupted one and no step waits on the device; the
    shuffle uses the training generator, on the device.
    """

    def __init__(self, alpha: float, *, seed: int, epoch: int) -> None:
        self.alpha = alpha
        self.draws = np.random.default_rng((seed, epoch))

    def blend(self, batch: Batch, generator: torch.Generator) -> Batch:
        lam = float(self.draws.beta(self.alpha, self.alpha))
        partner = torch.randperm(batch.labels.shape[0], device=batch.labels.device, generator=generator)
        inputs = lam * batch.inputs + (1 - lam) * batch.inputs[partner]
        return Batch(inputs=inputs, labels=batch.labels, partner_labels=batch.labels[partner], lam=lam)


@dataclass(frozen=True)
class Batch:
    """One training step's input, normalized and augmented, and how its loss is taken."""

    inputs: torch.Tensor  # float (B, C, H, W), channels_last
    labels: torch.Tensor
    # mixup: the labels of the images blended in, with weight 1 - lam; None without mixup.
    partner_labels: torch.Tensor | None = None
    lam: float = 1.0

    def loss(self, criterion: Loss, logits: torch.Tensor) -> torch.Tensor:
        value = criterion(logits, self.labels)
        if self.partner_labels is None:
            return value
        return self.lam * value + (1 - self.lam) * criterion(logits, self.partner_labels)


def training_batches(
    split: Split, config: TrainConfig, *, generator: torch.Generator, normalize: Normalizer, epoch: int
) -> Iterator[Batch]:
    """One epoch of shuffled batches with the trial's augmentation: crop and flip, cutout, mixup."""
    augmentation = make_augmentation(config)
    mixup = None
    if augmentation is not None and augmentation.mixup_alpha > 0:
        mixup = Mixup(augmentation.mixup_alpha, seed=config.seed, epoch=epoch)
    for images, labels in train_batches(
        split, batch_size=config.hp.batch_size, generator=generator, augmentation=augmentation
    ):
        batch = Batch(inputs=normalize(images), labels=labels)
        if augmentation is not None and augmentation.cutout > 0:
            batch = Batch(inputs=cut_out(batch.inputs, generator, augmentation.cutout), labels=labels)
        yield batch if mixup is None else mixup.blend(batch, generator)


def _cpu_has_bf16() -> bool:
    try:  # private, but the check PyTorch itself uses; absent on some builds
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` ("auto", "bf16", "fp32") means bf16 autocast on ``device``.

    "auto": on CUDA, and on CPUs with native bf16 (AVX-512 BF16 or AMX) — on the 2-core AVX-512 BF16
    development CPU a training step of the default CNN ran 2.1x faster than in fp32. Elsewhere fp32.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16())


def _autocast(device: torch.device, bf16: bool) -> torch.autocast:
    # bf16 keeps fp32's exponent range, so no loss scaling is needed.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, normalize: Normalizer, device: torch.device, *, bf16: bool = False
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over ``split``, in bf16 autocast if asked; one host read at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in eval_batches(split, batch_size=EVAL_BATCH_SIZE):
        with _autocast(device, bf16):
            logits = model(normalize(images))
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    n = max(1, len(split))
    return loss_sum.item() / n, correct.item() / n


def _train_epoch(
    step_model: nn.Module, batches: Iterator[Batch], *, criterion: Loss, optimizer: torch.optim.Optimizer,
    schedule: Schedule, device: torch.device, bf16: bool,
) -> tuple[float, int]:
    """One pass over ``batches``: (mean training loss, images seen); the loss is read from the device once."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    for batch in batches:
        with _autocast(device, bf16):
            logits = step_model(batch.inputs)
        loss = batch.loss(criterion, logits.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.after_step()
        loss_sum += loss.detach() * batch.labels.shape[0]
        seen += batch.labels.shape[0]
    schedule.after_epoch()
    return loss_sum.item() / max(1, seen), seen  # the epoch's one host read of training state


def fit(
    model: nn.Module,
    data: SearchData,
    config: TrainConfig,
    on_epoch_end: EpochCallback | None = None,
    *,
    checkpoint: Path | None = None,
    resume: Checkpoint | None = None,
    stop_after: int | None = None,
    evaluate_each_epoch: bool = True,
) -> FitResult:
    """Train ``model`` on ``data.train`` for up to ``config.max_epochs``, evaluating on ``data.val``.

    ``on_epoch_end`` sees every new epoch's result; an exception it raises (to prune, say) ends
    training and propagates to the caller.  ``data`` must already be on ``config.device``.
    With ``checkpoint``, the state is saved there after every epoch (before ``on_epoch_end``);
    with ``resume``, training continues after that checkpoint's last epoch, whose results are
    included in the returned ``FitResult``.  ``stop_after``: train that many epochs only, with the
    learning-rate schedule still spanning ``config.max_epochs`` (as a trial pruned there did).
    ``evaluate_each_epoch=False`` skips ``data.val`` (its loss and accuracy are then NaN), for a
    caller that looks at held-out data once, after training.
    """
    device = config.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the conv algorithms once
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    bf16 = uses_bf16(config.precision, device)
    schedule = make_schedule(optimizer, config, steps_per_epoch=steps_per_epoch(len(data.train), config.hp.batch_size))
    criterion = make_loss(model, config, data.train.labels, data.num_classes)
    # The compiled module shares its parameters with ``model``; state dicts stay those of ``model``.
    step_model = torch.compile(model) if config.compile else model
    normalize = Normalizer(mean=data.mean, std=data.std, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    epochs: list[EpochResult] = []
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
        generator.set_state(resume.generator)
        epochs = list(resume.epochs)
    last = config.max_epochs if stop_after is None else min(stop_after, config.max_epochs)
    for epoch in range(len(epochs) + 1, last + 1):
        start = time.perf_counter()
        model.train()
        batches = training_batches(data.train, config, generator=generator, normalize=normalize, epoch=epoch)
        train_loss, seen = _train_epoch(
            step_model, batches, criterion=criterion, optimizer=optimizer, schedule=schedule, device=device, bf16=bf16
        )
        train_seconds = time.perf_counter() - start
        val_loss, val_accuracy = math.nan, math.nan
        if evaluate_each_epoch:
            val_loss, val_accuracy = evaluate(step_model, data.val, normalize, device, bf16=bf16)
        _sync(device)
        result = EpochResult(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            train_seconds=train_seconds,
            seconds=time.perf_counter() - start,
            images_per_second=seen / train_seconds if train_seconds > 0 else 0.0,
        )
        epochs.append(result)
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint, epochs=epochs, model=model, optimizer=optimizer, schedule=schedule, generator=generator
            )
        if on_epoch_end is not None:
            on_epoch_end(result)
        if not math.isfinite(train_loss):
            break  # diverged: more epochs only spend time
    return FitResult(epochs=tuple(epochs))
