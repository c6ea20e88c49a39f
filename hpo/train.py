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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpo.data import Augmentation, Normalizer, SearchData, Split, eval_batches, steps_per_epoch, train_batches

# Images per forward pass when evaluating; bounded so that big models still fit in memory.
EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    batch_size: int
    weight_decay: float
    optimizer: str
    momentum: float
    max_epochs: int
    augment: bool
    seed: int
    device: torch.device
    compile: bool = False
    precision: str = "auto"  # auto, bf16 or fp32: see uses_bf16
    # Defaults below are the behaviour before these were hyperparameters.
    nesterov: bool = True  # sgd only, and only with momentum > 0
    schedule: str = "none"  # none, step, cosine or onecycle
    step_size: int = 5  # step: epochs between decays
    gamma: float = 0.1  # step: factor per decay
    warmup_fraction: float = 0.3  # onecycle: share of all steps spent rising to lr
    l1: float = 0.0  # L1 penalty factor on conv and linear weights
    label_smoothing: float = 0.0
    class_weighting: str = "none"  # none or balanced
    crop_padding: int = 4  # pixels; 0: no random crop
    flip: bool = True


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
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


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
    lr_scheduler = torch.optim.lr_scheduler
    if config.schedule == "none":
        return Schedule(None, per_batch=False)
    if config.schedule == "step":
        return Schedule(lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma), per_batch=False)
    if config.schedule == "cosine":
        # Down to 0 at the end of max_epochs; a trial pruned earlier never gets there.
        return Schedule(lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.max_epochs), per_batch=False)
    if config.schedule == "onecycle":
        # Linear warm-up from lr/25 to lr over warmup_fraction of all steps, then linear decay to
        # lr/25/1e4, as in Page's ResNet-9 recipe; momentum stays the momentum hyperparameter.
        return Schedule(
            lr_scheduler.OneCycleLR(
                optimizer, max_lr=config.lr, total_steps=config.max_epochs * steps_per_epoch,
                pct_start=config.warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
            ),
            per_batch=True,
        )
    raise ValueError(f"unknown schedule {config.schedule!r}")


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(model: nn.Module, config: TrainConfig, train_labels: torch.Tensor, num_classes: int) -> Loss:
    """The training loss: cross-entropy with label smoothing and class weights, plus the L1 penalty.

    Validation always uses plain cross-entropy, so that trials stay comparable.  The class weights
    are computed once here on the device; the L1 term is a device tensor, so no step waits on the host.
    """
    weight = None
    if config.class_weighting == "balanced":
        # n / (classes * count): each class contributes as if the classes were balanced.
        counts = torch.bincount(train_labels, minlength=num_classes).float()
        weight = len(train_labels) / (num_classes * counts.clamp(min=1))
    weights = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights, no biases or norms

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = nn.functional.cross_entropy(logits, labels, weight=weight, label_smoothing=config.label_smoothing)
        if config.l1 > 0:
            value = value + config.l1 * torch.stack([w.abs().sum() for w in weights]).sum()
        return value

    return loss


def make_augmentation(config: TrainConfig) -> Augmentation | None:
    return Augmentation(crop_padding=config.crop_padding, flip=config.flip) if config.augment else None


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


def fit(
    model: nn.Module,
    data: SearchData,
    config: TrainConfig,
    on_epoch_end: EpochCallback | None = None,
    *,
    checkpoint: Path | None = None,
    resume: Checkpoint | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train`` for up to ``config.max_epochs``, evaluating on ``data.val``.

    ``on_epoch_end`` sees every new epoch's result; an exception it raises (to prune, say) ends
    training and propagates to the caller.  ``data`` must already be on ``config.device``.
    With ``checkpoint``, the state is saved there after every epoch (before ``on_epoch_end``);
    with ``resume``, training continues after that checkpoint's last epoch, whose results are
    included in the returned ``FitResult``.
    """
    device = config.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the conv algorithms once
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    bf16 = uses_bf16(config.precision, device)
    schedule = make_schedule(optimizer, config, steps_per_epoch=steps_per_epoch(len(data.train), config.batch_size))
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
    for epoch in range(len(epochs) + 1, config.max_epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        for images, labels in train_batches(
            data.train, batch_size=config.batch_size, generator=generator, augmentation=make_augmentation(config)
        ):
            with _autocast(device, bf16):
                logits = step_model(normalize(images))
            loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.after_step()
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
        schedule.after_epoch()
        train_loss = loss_sum.item() / max(1, seen)  # the epoch's one host read of training state
        train_seconds = time.perf_counter() - start
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
