"""``python -m hpo.best``: retrain a trial's configuration, test it once, save the model; or replay a trial.

Default: the study's best trial is retrained on the training and validation parts together, for as
many epochs as the trial ran and with the trial's stored seed, then evaluated once on the held-out
test set; weights, configuration and test figures are saved in one checkpoint that
``torch.load(path, weights_only=True)`` reads.  ``--trial N`` does the same for any trial.

``--replay`` retrains a trial exactly as the search did (training part only, same validation
split, same seed, same epochs) and prints its recomputed per-epoch values next to the stored ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.cli import Parser, add_study_flags, guarded, non_negative_int
from hpo.cli import device as device_flag
from hpo.errors import UsageError
from hpo.spec import StudySpec, find_study, load_spec

if TYPE_CHECKING:
    import optuna
    import torch
    from torch import nn

    from hpo.data import Dataset, SearchData
    from hpo.space import Hyperparameters
    from hpo.train import EpochResult, TrainConfig

logger = logging.getLogger("hpo.best")  # not __name__: that is "__main__" under python -m

PROG = "hpo.best"
DEFAULT_OUT = "checkpoints"


@dataclass(frozen=True)
class SavedModel:
    """Everything needed to rebuild, trust and use the retrained model, in plain types and tensors."""

    state_dict: Mapping[str, torch.Tensor]  # on the CPU
    hyperparameters: Hyperparameters
    model: str  # name in the model registry (hpo/models.py)
    study: str
    trial: int  # the trial whose configuration this is
    epochs: int
    seed: int
    test_accuracy: float  # fraction in [0, 1], on the whole test set
    test_loss: float  # mean cross-entropy on the test set
    train_images: int  # images trained on (training + validation parts)
    dataset: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (channels, height, width)
    # Per-channel normalization in [0, 1] units: x = (pixel / 255 - mean) / std.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        """Only tensors, dicts, lists, str, int and float: what ``weights_only=True`` loads."""
        blob = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        blob["state_dict"] = dict(self.state_dict)
        blob["hyperparameters"] = dataclasses.asdict(self.hyperparameters)
        for key in ("classes", "image_shape", "mean", "std"):
            blob[key] = list(blob[key])  # type: ignore[call-overload]
        return blob

    @classmethod
    def from_dict(cls, blob: Mapping[str, object]) -> SavedModel:
        from hpo.space import Hyperparameters

        values = dict(blob)
        values["hyperparameters"] = Hyperparameters(**values["hyperparameters"])  # type: ignore[arg-type]
        for key in ("classes", "image_shape", "mean", "std"):
            values[key] = tuple(values[key])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


    def build(self) -> nn.Module:
        """The trained model, on the CPU, in eval mode."""
        from hpo.models import build_model

        channels, height, _ = self.image_shape
        model = build_model(
            self.model, self.hyperparameters, in_channels=channels, num_classes=len(self.classes), image_size=height
        )
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_model(saved: SavedModel, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved.to_dict(), path)


def load_model(path: Path) -> SavedModel:
    """Read a checkpoint written by hpo.best; no pickled code runs (``weights_only=True``)."""
    import torch

    return SavedModel.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"python -m {PROG}",
        description="Retrain the best (or any) trial on training + validation data, test it once and save it; or replay a trial.",
    )
    add_study_flags(parser)
    parser.add_argument("--trial", type=non_negative_int, help="trial number (default: the study's best trial)")
    parser.add_argument(
        "--replay", action="store_true",
        help="retrain exactly as the trial did (training part, same seed) and compare with its stored values; saves nothing",
    )
    parser.add_argument("--device", type=device_flag, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the checkpoint (default: {DEFAULT_OUT}/)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
    # hpo.run's flags that this command does not take: a trial is retrained with its own seed and epochs.
    parser.set_defaults(seed=None, max_epochs=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        from hpo.run import apply_overrides, configure_logging

        args = build_parser().parse_args(argv)
        spec = apply_overrides(load_spec(find_study(args.study)), args)
        configure_logging(verbose=args.verbose, quiet=args.quiet)
        return _best(spec, args)

    return guarded(PROG, body)


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The trial to retrain: number ``number``, else the best; it must have finished with a stored seed."""
    from optuna.trial import TrialState

    from hpo.study import FINISHED_STATES

    trials = study.get_trials(deepcopy=False)
    if number is None:
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise UsageError(f"--study: study {study.study_name!r} has no completed trial yet; give --trial N or run more trials")
        trial = study.best_trial
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise UsageError(f"--trial: study {study.study_name!r} has no trial {number} (it has {len(trials)} trials, numbered from 0)")
        trial = found[0]
    if trial.state not in FINISHED_STATES:
        raise UsageError(f"--trial: trial {trial.number} is {trial.state.name}; only complete or pruned trials can be retrained")
    if not isinstance(trial.user_attrs.get("seed"), int) or not trial.intermediate_values:
        raise UsageError(f"--trial: trial {trial.number} has no stored seed or epochs (not a trial of hpo.run)")
    return trial


def trial_epochs(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs the trial trained: its ``epochs`` user attr, else the epochs it reported."""
    epochs = trial.user_attrs.get("epochs")
    return epochs if isinstance(epochs, int) else max(trial.intermediate_values)


class _Enough(Exception):
    """Raised after the trial's last epoch: fit stops there, its LR schedule still spanning the trial's."""


def train_like(
    trial: optuna.trial.FrozenTrial, spec: StudySpec, model: nn.Module, data: SearchData, config: TrainConfig
) -> list[EpochResult]:
    """Train for the trial's epochs, with the schedule over as many epochs as the trial had planned.

    A complete trial ran all its epochs; a pruned one had planned the study file's ``max_epochs``.
    """
    from hpo.train import fit

    epochs = trial_epochs(trial)
    planned = epochs if trial.state.name == "COMPLETE" else max(epochs, spec.train.max_epochs)
    results: list[EpochResult] = []

    def on_epoch_end(result: EpochResult) -> None:
        results.append(result)
        logger.debug("epoch %d: train_loss %.4f (%.1f s)", result.epoch, result.train_loss, result.seconds)
        if result.epoch >= epochs:
            raise _Enough

    try:
        fit(model, data, dataclasses.replace(config, max_epochs=planned), on_epoch_end)
    except _Enough:
        pass
    return results


def _best(spec: StudySpec, args: argparse.Namespace) -> int:
    from hpo.data import load_dataset
    from hpo.run import resolve_device
    from hpo.space import from_params
    from hpo.study import load_existing_study, resolve_storage

    url, source = resolve_storage(args.storage)
    study = load_existing_study(url, source, spec.study.name, flag="--study-name" if args.study_name else "--study")
    trial = pick_trial(study, args.trial)
    device = resolve_device(spec.train.device, "--device" if args.device else f"{spec.path}: [train] device")
    hp = from_params(trial.params, spec.space)
    dataset = load_dataset(spec.data)
    if args.replay:
        return replay(spec, trial, hp, dataset, device)
    saved = retrain(spec, trial, hp, dataset, device)
    path = Path(args.out) / f"{spec.study.name}-trial{trial.number}.pt"
    save_model(saved, path)
    print(
        f"Trial {trial.number} of study {spec.study.name!r} retrained on {saved.train_images} images "
        f"for {saved.epochs} epochs (seed {saved.seed}): test accuracy {saved.test_accuracy:.2%}, "
        f"test loss {saved.test_loss:.4f} on {len(dataset.test_labels)} test images"
    )
    accuracy = trial.user_attrs.get("val_accuracy")
    if isinstance(accuracy, float):
        print(f"(The trial itself, trained on the training part only: {accuracy:.2%} validation accuracy.)")
    print(f"Checkpoint: {path}")
    return 0


def retrain(
    spec: StudySpec, trial: optuna.trial.FrozenTrial, hp: Hyperparameters, dataset: Dataset, device: torch.device
) -> SavedModel:
    """Train ``hp`` on training + validation data for the trial's epochs and seed; test once."""
    from hpo.data import Normalizer, Split, retraining_data
    from hpo.objective import seeded_model, train_config
    from hpo.train import evaluate

    data = retraining_data(dataset, spec.data).to(device)
    seed = trial.user_attrs["seed"]
    epochs = trial_epochs(trial)
    model = seeded_model(spec, hp, data, seed)
    # fit evaluates data.val after every epoch; the test set is looked at once, after training,
    # so fit gets no validation images.
    no_val = Split(images=data.val.images[:0], labels=data.val.labels[:0])
    logger.info("retraining trial %d on %d images for %d epochs on %s", trial.number, len(data.train), epochs, device)
    train_like(trial, spec, model, dataclasses.replace(data, val=no_val), train_config(spec, hp, seed=seed, device=device))
    test_loss, test_accuracy = evaluate(model, data.val, Normalizer(mean=data.mean, std=data.std, device=device), device)
    return SavedModel(
        state_dict={name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        hyperparameters=hp,
        model=spec.model.name,
        study=spec.study.name,
        trial=trial.number,
        epochs=epochs,
        seed=seed,
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        train_images=len(data.train),
        dataset=dataset.name,
        classes=dataset.classes,
        image_shape=data.image_shape,
        mean=data.mean,
        std=data.std,
    )


def replay(
    spec: StudySpec, trial: optuna.trial.FrozenTrial, hp: Hyperparameters, dataset: Dataset, device: torch.device
) -> int:
    """Retrain as the search did and print the recomputed metric per epoch beside the stored one."""
    from hpo.data import carve_validation
    from hpo.objective import score, seeded_model, train_config

    metric = spec.study.metric
    data = carve_validation(dataset, spec.data).to(device)
    seed = trial.user_attrs["seed"]
    config = train_config(spec, hp, seed=seed, device=device)
    results = train_like(trial, spec, seeded_model(spec, hp, data, seed), data, config)
    print(f"Replay of trial {trial.number} of study {spec.study.name!r} ({trial.state.name}, seed {seed}) on {device}:")
    print(f"  epoch  stored {metric}  replayed {metric}  difference")
    differences = []
    for result in results:
        stored = trial.intermediate_values.get(result.epoch)
        replayed = score(result, metric)
        if stored is None:
            print(f"  {result.epoch:5d}  {'-':>{7 + len(metric)}}  {replayed:>{9 + len(metric)}.6f}")
            continue
        differences.append(abs(replayed - stored))
        print(f"  {result.epoch:5d}  {stored:>{7 + len(metric)}.6f}  {replayed:>{9 + len(metric)}.6f}  {replayed - stored:+.2e}")
    if differences:
        print(f"Largest difference: {max(differences):.2e} over {len(differences)} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
