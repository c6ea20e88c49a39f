"""The ``optuna`` line of bench/search.py: plain Optuna as optuna-examples writes it (pytorch_simple.py), same task.

What is the examples': a torchvision Dataset behind a DataLoader (``num_workers=0``, DataLoader's default
and the examples'), RandomCrop(size, padding) + RandomHorizontalFlip when the study augments, then
ToTensor + Normalize, in fp32 with contiguous (NCHW) tensors, ``loss.item()`` after every step; the
validation loss and accuracy after every epoch, the study's metric reported to the pruner and the pruner
asked after every epoch (the last one included, as the examples do; hpo asks no verdict after the last);
``TPESampler(seed=seed)`` and ``MedianPruner()`` with Optuna's defaults; ``study.optimize(objective,
timeout=budget)`` on an in-memory study, so that no database is in the loop.  The finished study is then
copied into bench.db (``optuna.copy_study``), where it is scored like hpo's runs.

What is hpo's, so that only the pipeline and the search differ: the images (the study's training and
validation parts, subsets included: ``carve_validation``), the search space and its sampling
(``hpo.tuning.objective.suggest``), the model (hpo's builder, its initial weights drawn from the trial's
seed as hpo's trials draw them), the optimizer, learning-rate schedule and training loss
(``hpo.training.optimization``), the batches (full ones only, as hpo's), and the trial's value: the study's
metric at its best epoch.  Each trial stores its ``seed``, ``epochs`` and ``val_accuracy`` (at the best
epoch) as hpo's trials do, so that ``retrain_trial`` retrains the chosen one exactly as it retrains hpo's.
"""

from __future__ import annotations

import logging
import time

import optuna
import torch
from throughput import ArrayDataset
from torch import nn

from hpo.studyfile.space import Hyperparameters
from hpo.studyfile.spec import StudySpec
from hpo.training.batches import Loss
from hpo.training.config import EpochResult, TrainConfig
from hpo.training.optimization import Schedule, make_loss, make_optimizer, make_schedule
from hpo.training.recipe import best_epoch, score, seeded_model, train_config, trial_seed
from hpo.training.splits import Dataset, SearchData, carve_validation
from hpo.tuning.objective import suggest

logger = logging.getLogger(__name__)

# The config name of this line in bench/search.py's --configs.
NAME = "optuna"


def _unsupported(hp: Hyperparameters) -> str | None:
    """Why the examples' torchvision pipeline cannot train ``hp`` as hpo would, or None."""
    if hp.crop != "pad":
        return f"crop = {hp.crop!r}"
    if hp.cutout > 0 or hp.mixup_alpha > 0:
        return "cutout or mixup"
    return None


def _transforms(data: SearchData, hp: Hyperparameters, *, augment: bool) -> tuple[object, object]:
    """(training transform, validation transform): torchvision's, per PIL image, on the CPU."""
    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    augmentation: list[object] = []
    if augment and hp.crop_padding > 0:
        augmentation.append(transforms.RandomCrop(data.image_shape[1], padding=hp.crop_padding))
    if augment and hp.flip:
        augmentation.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*augmentation, *normalize]), transforms.Compose(normalize)


class ReferenceObjective:
    """optuna-examples' objective over the study's space and images: sample, build, train, report, maybe prune."""

    def __init__(self, spec: StudySpec, data: SearchData, device: torch.device) -> None:
        self.spec = spec
        self.data = data  # on the CPU: the DataLoader reads it image by image
        self.device = device

    def loaders(self, hp: Hyperparameters, seed: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
        train_transform, val_transform = _transforms(self.data, hp, augment=self.spec.train.augment)
        pin = self.device.type == "cuda"
        train = torch.utils.data.DataLoader(
            ArrayDataset(self.data.train.images, self.data.train.labels, train_transform), batch_size=hp.batch_size,
            shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed), pin_memory=pin,
        )
        val = torch.utils.data.DataLoader(
            ArrayDataset(self.data.val.images, self.data.val.labels, val_transform), batch_size=hp.batch_size, pin_memory=pin,
        )
        return train, val

    def __call__(self, trial: optuna.Trial) -> float:
        spec, metric = self.spec, self.spec.study.metric
        hp = suggest(trial, spec.space, spec.model.space)
        problem = _unsupported(hp)
        if problem is not None:
            raise SystemExit(f"--configs {NAME}: the torchvision reference pipeline has no {problem}; leave {NAME} out")
        seed = trial_seed(spec.study.seed, trial.number)
        trial.set_user_attr("seed", seed)
        model = seeded_model(spec, hp, self.data, seed).to(self.device)  # fp32, NCHW: the examples' model
        config = train_config(spec, hp, seed=seed, device=self.device)
        train_loader, val_loader = self.loaders(hp, seed)
        optimizer = make_optimizer(model, config)
        schedule = make_schedule(optimizer, config, steps_per_epoch=len(train_loader))
        criterion = make_loss(model, config, self.data.train.labels.to(self.device), self.data.num_classes)
        history: list[EpochResult] = []
        for epoch in range(1, config.max_epochs + 1):
            start = time.perf_counter()
            train_loss, seen = _train_epoch(model, train_loader, criterion, optimizer, schedule, config)
            train_seconds = time.perf_counter() - start
            val_loss, val_accuracy = _evaluate(model, val_loader, self.device)
            history.append(EpochResult(
                epoch=epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=val_accuracy,
                train_seconds=train_seconds, seconds=time.perf_counter() - start, images_per_second=seen / train_seconds,
            ))
            trial.report(score(history[-1], metric), epoch)
            if trial.should_prune():
                _record(trial, history, metric)
                raise optuna.TrialPruned()
        return _record(trial, history, metric)


def _record(trial: optuna.Trial, history: list[EpochResult], metric: str) -> float:
    """Store what hpo's trials store for the bench and for retraining; the trial's value (its best epoch's)."""
    best = best_epoch(history, metric)
    trial.set_user_attr("epochs", history[-1].epoch)
    trial.set_user_attr("best_epoch", best.epoch)
    trial.set_user_attr("val_accuracy", best.val_accuracy)
    return score(best, metric)


def _train_epoch(
    model: nn.Module, loader: torch.utils.data.DataLoader, criterion: Loss, optimizer: torch.optim.Optimizer,
    schedule: Schedule, config: TrainConfig,
) -> tuple[float, int]:
    """One epoch as the examples train it: (mean training loss, images seen)."""
    model.train()
    loss_sum, seen = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(config.device, non_blocking=True), labels.to(config.device, non_blocking=True)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.after_step()
        loss_sum += loss.item() * len(labels)  # the usual per-step read, which waits for the device
        seen += len(labels)
    schedule.after_epoch()
    return loss_sum / max(1, seen), seen


@torch.no_grad()
def _evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the validation part, batch by batch as the examples do."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss_sum / max(1, count), correct / max(1, count)


def search(
    spec: StudySpec, dataset: Dataset, *, storage: optuna.storages.BaseStorage, budget_s: float, device: torch.device,
) -> optuna.Study:
    """Run the reference search for ``budget_s`` seconds in memory; the study as copied into ``storage``."""
    data = carve_validation(dataset, spec.data)
    memory = optuna.storages.InMemoryStorage()
    study = optuna.create_study(
        storage=memory, study_name=spec.study.name, direction=spec.study.direction,
        sampler=optuna.samplers.TPESampler(seed=spec.study.seed), pruner=optuna.pruners.MedianPruner(),
    )
    study.optimize(ReferenceObjective(spec, data, device), timeout=budget_s)
    optuna.copy_study(from_study_name=spec.study.name, from_storage=memory, to_storage=storage)
    logger.info("%s: %d trials copied into the bench's storage", spec.study.name, len(study.trials))
    return optuna.load_study(study_name=spec.study.name, storage=storage)
