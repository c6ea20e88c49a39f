"""The optimizer, the learning-rate schedule and the training loss a trial's hyperparameters ask for."""

from __future__ import annotations

import torch
from torch import nn

from hpo.studyfile.space import Hyperparameters
from hpo.training.backbones import HEAD_ATTRIBUTE, head_parameter_names
from hpo.training.batches import Loss
from hpo.training.config import TrainConfig

# The layers whose running statistics a frozen backbone keeps (eval mode); LayerNorm and GroupNorm have none.
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def parameter_groups(model: nn.Module, hp: Hyperparameters) -> list[dict[str, object]]:
    """The optimizer's parameter groups: one at lr; for a model with a new head (hpo.training.backbones),
    the rest at lr x ``backbone_lr_scale``, then the head at lr (discriminative learning rates)."""
    lr = hp.scaled_lr()
    head = head_parameter_names(model)
    if not head:
        return [{"params": list(model.parameters()), "lr": lr}]
    named = list(model.named_parameters())
    return [
        {"params": [p for name, p in named if name not in head], "lr": lr * hp.backbone_lr_scale},
        {"params": [p for name, p in named if name in head], "lr": lr},
    ]


def freeze_backbone(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) all but a new head; call after ``model.train()`` at the start of every epoch.

    Frozen parameters get no gradient, so no optimizer touches them (weight decay included), and
    frozen BatchNorm layers run in eval mode, so their running statistics stay the pretrained ones.
    The caller decides from the epoch number, so a fit resumed from a checkpoint freezes the same
    epochs.  A model without a new head is left alone.
    """
    head = head_parameter_names(model)
    if not head:
        return
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not frozen or name in head)
    if frozen:
        head_modules = set(model.get_submodule(getattr(model, HEAD_ATTRIBUTE)).modules())
        for module in model.modules():
            if isinstance(module, _BATCH_NORMS) and module not in head_modules:
                module.eval()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    hp, params = config.hp, parameter_groups(model, config.hp)
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
        # Each parameter group peaks at its own lr (a backbone's is lr x backbone_lr_scale).
        return Schedule(
            lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=config.max_epochs * steps_per_epoch,
                pct_start=hp.warmup_fraction, anneal_strategy="linear", cycle_momentum=False,
            ),
            per_batch=True,
        )
    raise ValueError(f"unknown schedule {hp.schedule!r}")


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

