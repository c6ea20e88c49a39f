"""THE training loop: ``fit(model, data, config, on_epoch_end) -> FitResult``. It knows nothing of Optuna.

Data stays on the device; each step gathers, augments and normalizes its batch there.  Losses and
correct counts accumulate in device tensors and are read once per epoch, so the host never waits
on the GPU inside an epoch.  Activations are channels_last; the forward pass runs in the autocast
precision ``[train] precision`` means on the device (``"auto"``: bf16 where native, fp16 with gradient
scaling on older CUDA GPUs, fp32 elsewhere: :func:`hpo.training.device.choose_precision`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpo.training.batches import Batch, Loss, Normalizer, eval_batches, steps_per_epoch, training_batches
from hpo.training.config import EpochResult, TrainConfig
from hpo.training.device import Precision, precision_for
from hpo.training.optimization import Schedule, freeze_backbone, make_loss, make_optimizer, make_schedule
from hpo.training.splits import SearchData, Split

# Images per forward pass when evaluating; bounded so that big models still fit in memory.
EVAL_BATCH_SIZE = 1024


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
    scaler: dict[str, object] = dataclasses.field(default_factory=dict)  # fp16's GradScaler state; {} without one

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
        scaler=blob.get("scaler", {}),
    )


def _save_checkpoint(
    path: Path, *, epochs: list[EpochResult], model: nn.Module, optimizer: torch.optim.Optimizer,
    schedule: Schedule, generator: torch.Generator, scaler: torch.amp.GradScaler,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "epochs": [dataclasses.asdict(e) for e in epochs],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "scaler": scaler.state_dict(),  # {} when disabled (every precision but fp16)
    }
    # Write then rename: a worker killed mid-write leaves the previous epoch's checkpoint intact.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(blob, partial)
    partial.replace(path)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: Precision) -> torch.autocast:
    dtype = _AUTOCAST_DTYPES.get(precision, torch.bfloat16)  # fp32: disabled, the dtype unused
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


def _grad_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler:
    """fp16 needs loss scaling (its 5-bit exponent flushes small gradients to zero); bf16 keeps fp32's exponent
    range and fp32 is fp32, so for them the scaler is disabled and passes the loss and step through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, normalize: Normalizer, device: torch.device, *, precision: Precision = "fp32"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over ``split``, in ``precision``'s autocast; one host read at the end."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in eval_batches(split, batch_size=EVAL_BATCH_SIZE):
        with _autocast(device, precision):
            logits = model(normalize(images))
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    n = max(1, len(split))
    return loss_sum.item() / n, correct.item() / n


def _train_epoch(
    step_model: nn.Module, batches: Iterator[Batch], *, criterion: Loss, optimizer: torch.optim.Optimizer,
    schedule: Schedule, device: torch.device, precision: Precision, scaler: torch.amp.GradScaler,
) -> tuple[float, int]:
    """One pass over ``batches``: (mean training loss, images seen); the loss is read from the device once."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    seen = 0
    for batch in batches:
        with _autocast(device, precision):
            logits = step_model(batch.inputs)
        loss = batch.loss(criterion, logits.float())
        optimizer.zero_grad(set_to_none=True)
        # A disabled scaler (every precision but fp16) is loss.backward() and optimizer.step(); an enabled one
        # skips the step of a batch whose scaled gradients overflowed and lowers the scale.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.after_step()
        loss_sum += loss.detach() * batch.labels.shape[0]
        seen += batch.labels.shape[0]
    schedule.after_epoch()
    return loss_sum.item() / max(1, seen), seen  # the epoch's one host read of training state


@dataclass
class _Training:
    """One fit's moving parts on the device: the model (and its compiled twin), optimizer, schedule, loss, RNG."""

    model: nn.Module
    step_model: nn.Module  # torch.compile(model) or model itself; it shares model's parameters
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: Loss
    normalize: Normalizer
    generator: torch.Generator  # shuffling and augmentation
    precision: Precision  # the autocast precision: precision_for(config.precision, device)
    scaler: torch.amp.GradScaler  # enabled for fp16 only

    @classmethod
    def start(cls, model: nn.Module, data: SearchData, config: TrainConfig, resume: Checkpoint | None) -> _Training:
        device = config.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune the conv algorithms once
        model = model.to(device=device, memory_format=torch.channels_last)
        optimizer = make_optimizer(model, config)
        steps = steps_per_epoch(len(data.train), config.hp.batch_size)
        precision = precision_for(config.precision, device)
        training = cls(
            model=model,
            # The compiled module shares its parameters with ``model``; state dicts stay those of ``model``.
            step_model=torch.compile(model) if config.compile else model,
            optimizer=optimizer,
            schedule=make_schedule(optimizer, config, steps_per_epoch=steps),
            criterion=make_loss(model, config, data.train.labels, data.num_classes),
            normalize=Normalizer(mean=data.mean, std=data.std, device=device),
            generator=torch.Generator(device=device).manual_seed(config.seed),
            precision=precision,
            scaler=_grad_scaler(device, precision),
        )
        if resume is not None:
            model.load_state_dict(resume.model)
            optimizer.load_state_dict(resume.optimizer)
            training.schedule.load_state_dict(resume.schedule)
            training.generator.set_state(resume.generator)
            if resume.scaler:
                training.scaler.load_state_dict(resume.scaler)
        return training

    def epoch(self, epoch: int, data: SearchData, config: TrainConfig, *, evaluate_val: bool) -> EpochResult:
        """Train one epoch on ``data.train`` and, with ``evaluate_val``, evaluate on ``data.val``."""
        device = config.device
        start = time.perf_counter()
        self.model.train()
        # The first freeze_epochs train a new head only (torchvision backbones): by epoch number, so resuming keeps it.
        freeze_backbone(self.model, frozen=epoch <= config.hp.freeze_epochs)
        batches = training_batches(data.train, config, generator=self.generator, normalize=self.normalize, epoch=epoch)
        train_loss, seen = _train_epoch(
            self.step_model, batches, criterion=self.criterion, optimizer=self.optimizer, schedule=self.schedule,
            device=device, precision=self.precision, scaler=self.scaler,
        )
        train_seconds = time.perf_counter() - start
        val_loss, val_accuracy = math.nan, math.nan
        if evaluate_val:
            val_loss, val_accuracy = evaluate(
                self.step_model, data.val, self.normalize, device, precision=self.precision
            )
        _sync(device)
        return EpochResult(
            epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=val_accuracy,
            train_seconds=train_seconds, seconds=time.perf_counter() - start,
            images_per_second=seen / train_seconds if train_seconds > 0 else 0.0,
        )

    def save(self, path: Path, epochs: list[EpochResult]) -> None:
        _save_checkpoint(
            path, epochs=epochs, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
            generator=self.generator, scaler=self.scaler,
        )


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
    before_checkpoint: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` on ``data.train`` for up to ``config.max_epochs``, evaluating on ``data.val``.

    ``on_epoch_end`` sees every new epoch's result; an exception it raises (to prune, say) ends
    training and propagates to the caller.  ``data`` must already be on ``config.device``.
    With ``checkpoint``, the state is saved there after every epoch (before ``on_epoch_end``);
    with ``resume``, training continues after that checkpoint's last epoch, whose results are
    included in the returned ``FitResult``.  ``stop_after``: train that many epochs only, with the
    learning-rate schedule still spanning ``config.max_epochs`` (as a trial pruned there did).
    ``evaluate_each_epoch=False`` skips ``data.val`` (its loss and accuracy are then NaN), for a
    caller that looks at held-out data once, after training.  ``before_checkpoint`` sees every epoch
    before its checkpoint is written; an exception it raises ends training with the previous epoch's
    checkpoint in place.
    """
    training = _Training.start(model, data, config, resume)
    epochs: list[EpochResult] = list(resume.epochs) if resume is not None else []
    last = config.max_epochs if stop_after is None else min(stop_after, config.max_epochs)
    for epoch in range(len(epochs) + 1, last + 1):
        result = training.epoch(epoch, data, config, evaluate_val=evaluate_each_epoch)
        epochs.append(result)
        if before_checkpoint is not None:
            before_checkpoint(result)
        if checkpoint is not None:
            training.save(checkpoint, epochs)
        if on_epoch_end is not None:
            on_epoch_end(result)
        if not math.isfinite(result.train_loss):
            break  # diverged: more epochs only spend time
    return FitResult(epochs=tuple(epochs))
