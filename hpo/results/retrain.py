"""Retraining a trial's configuration: on training + validation data, tested once and saved; or replayed.

:func:`retrain` is the Python entry point; ``python -m hpo.best`` is a shell over it.  A trial is
retrained for as many epochs as it ran, with its stored seed, its learning-rate schedule spanning
the epochs it had planned; the test set is evaluated once, after training.  The result is a
:class:`SavedModel`: weights, configuration and test figures, which ``torch.load(path,
weights_only=True)`` reads back.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.errors import DataError, UsageError
from hpo.studyfile.spec import Overrides, StudySpec, direction_sign, spec_for_study, with_model
from hpo.studyfile.stored import STARTED_WITH_ATTR, with_stored

if TYPE_CHECKING:
    import optuna
    import torch
    from torch import nn

    from hpo.studyfile.space import Hyperparameters
    from hpo.training.arrays import ArrayData
    from hpo.training.config import EpochResult, TrainConfig
    from hpo.training.memory import Placement
    from hpo.training.splits import Dataset, SearchData
    from hpo.training.user_models import UserBuilder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedModel:
    """Everything needed to rebuild, trust and use the retrained model, in plain types and tensors."""

    state_dict: Mapping[str, torch.Tensor]  # on the CPU
    hyperparameters: Hyperparameters
    model: str  # name in the model registry (hpo.training.models)
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
    test_images: int | None = None  # images tested on (None in files saved before hpo 0.2 recorded it)

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
        from hpo.studyfile.space import Hyperparameters

        values = dict(blob)
        values["hyperparameters"] = Hyperparameters(**values["hyperparameters"])  # type: ignore[arg-type]
        for key in ("classes", "image_shape", "mean", "std"):
            values[key] = tuple(values[key])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


    def build(self) -> nn.Module:
        """The trained model, on the CPU, in eval mode."""
        from hpo.training.models import build_model

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


def model_path(out: Path, saved: SavedModel) -> Path:
    """Where ``python -m hpo.best --out OUT`` saves a retrained model."""
    return out / f"{saved.study}-trial{saved.trial}.pt"


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The trial to retrain: number ``number``, else the best; it must have finished with a stored seed."""
    from optuna.trial import TrialState

    from hpo.tuning.budget import FINISHED_STATES

    trials = study.get_trials(deepcopy=False)
    if number is None:
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise UsageError(f"--study: study {study.study_name!r} has no completed trial yet; give --trial N or run more trials")
        if len(study.directions) > 1:
            raise UsageError(no_single_best(study))
        trial = study.best_trial
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise UsageError(f"--trial: study {study.study_name!r} has no trial {number} (it has {len(trials)} trials, numbered from 0)")
        trial = found[0]
    if trial.state not in FINISHED_STATES:
        raise UsageError(f"--trial: trial {trial.number} is {trial.state.name}; only complete or pruned trials can be retrained")
    if not isinstance(trial.user_attrs.get("seed"), int) or not _curve(trial):
        raise UsageError(f"--trial: trial {trial.number} has no stored seed or epochs (not a trial of hpo.run, or one that never trained)")
    return trial


def _curve(trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    from hpo.tuning.pareto import curve  # imports optuna: not before a command needs it

    return curve(trial)


def no_single_best(study: optuna.Study) -> str:
    """Why a multi-objective study has no one trial to retrain, and which trials it could be (its Pareto front)."""
    from hpo.tuning.pareto import objective_names, pareto_front, values_text

    front = "; ".join(f"#{t.number} ({values_text(study, t)})" for t in pareto_front(study)) or "none yet (no feasible trial)"
    return (
        f"--trial: study {study.study_name!r} has {len(study.directions)} objectives ({', '.join(objective_names(study))}) "
        f"and no single best trial; give --trial N, one of its Pareto front: {front}"
    )


def trial_epochs(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs the trial trained: the last it reported (hpo 0.2 also stored them as the ``epochs`` user attr)."""
    from hpo.tuning.records import epochs_trained  # imports optuna: not before a command needs it

    epochs = trial.user_attrs.get("epochs")
    return epochs if isinstance(epochs, int) else epochs_trained(trial)


def train_like(
    trial: optuna.trial.FrozenTrial, spec: StudySpec, model: nn.Module, data: SearchData, config: TrainConfig,
    *, evaluate_each_epoch: bool = True,
) -> list[EpochResult]:
    """Train for the trial's epochs, with the schedule over as many epochs as the trial had planned.

    A complete trial ran all its epochs; a pruned one had planned the study file's ``max_epochs``.
    """
    from hpo.training.fit import fit

    epochs = trial_epochs(trial)
    planned = epochs if trial.state.name == "COMPLETE" else max(epochs, spec.train.max_epochs)

    def on_epoch_end(result: EpochResult) -> None:
        logger.debug("epoch %d: train_loss %.4f (%.1f s)", result.epoch, result.train_loss, result.seconds)

    result = fit(
        model, data, dataclasses.replace(config, max_epochs=planned), on_epoch_end,
        stop_after=epochs, evaluate_each_epoch=evaluate_each_epoch,
    )
    return list(result.epochs)


@dataclass(frozen=True)
class _Prepared:
    """What retraining and replay both start from: the study file, the trial, the device, the whole dataset."""

    spec: StudySpec
    trial: optuna.trial.FrozenTrial
    device: torch.device
    dataset: Dataset


def _prepare(
    study: optuna.Study, trial: int | None, *, study_file: str | Path | None, device: str | None, data_dir: str | None,
    model: UserBuilder | None = None,
    data: ArrayData | None = None,
) -> _Prepared:
    from hpo.training.device import resolve_device
    from hpo.training.memory import Placement
    from hpo.training.recipe import prepare_model
    from hpo.tuning.study import MODEL_ATTR

    if data is not None and data_dir is not None:
        raise UsageError("argument data_dir: not allowed with data (the arrays replace the study file's dataset)")
    # The values the study was started with (epochs, subsets, split, seed...), not those of a study file edited since.
    spec = with_stored(spec_for_study(study.study_name, study_file), study.user_attrs.get(STARTED_WITH_ATTR))
    spec = Overrides(device=device, data_dir=data_dir).apply(spec)
    if model is not None:
        from hpo.training.user_models import reference

        spec = with_model(spec, reference(model))
    stored = study.user_attrs.get(MODEL_ATTR)
    if stored is not None and stored != spec.model.name:
        raise UsageError(
            f"--study: study {study.study_name!r} was searched with model {stored!r}, but {spec.path} names "
            f"{spec.model.name!r}"
        )
    picked = pick_trial(study, trial)
    resolved = resolve_device(spec.train.device, "--device" if device else f"{spec.path}: [train] device")
    dataset = prepare_model(spec, _dataset(study, spec, data, Placement(devices=(resolved,))))
    return _Prepared(spec=spec, trial=picked, device=resolved, dataset=dataset)


def _dataset(study: optuna.Study, spec: StudySpec, data: ArrayData | None, placement: Placement) -> Dataset:
    """The images the study was searched on: the arrays it recorded (given again as ``data``), else its study file's dataset."""
    from hpo.training.arrays import ARRAY_DATA_ATTR, ArrayData, array_dataset, array_summary
    from hpo.training.datasets import load_dataset
    from hpo.training.recipe import model_image_size

    if data is not None and not isinstance(data, ArrayData):
        raise UsageError(f"argument data: must be an hpo.ArrayData, got {type(data).__name__}")
    searched_on = study.user_attrs.get(ARRAY_DATA_ATTR)
    if data is None:
        if searched_on is not None:
            raise UsageError(
                f"--study: study {study.study_name!r} was searched on arrays given in Python (hpo.ArrayData); "
                "pass the same arrays again: hpo.retrain(study, data=...)"
            )
        return load_dataset(spec.data, placement=placement, default_image_size=model_image_size(spec))
    if searched_on is None:
        raise UsageError(f"argument data: study {study.study_name!r} was searched on its study file's dataset, not on arrays")
    dataset = array_dataset(data, spec.data, placement=placement, default_image_size=model_image_size(spec))
    given = array_summary(dataset)
    differs = [key for key in given if given[key] != searched_on.get(key)]
    if differs:
        key = differs[0]
        raise UsageError(
            f"argument data: not the arrays study {study.study_name!r} was searched on: "
            f"{key} {searched_on.get(key)!r}, got {given[key]!r}"
        )
    return dataset


# Called with the re-evaluations (best mean first) and the trial they chose, before it is retrained.
ReevaluationListener = Callable[[list["Reevaluation"], "optuna.trial.FrozenTrial"], None]


def retrain(
    study: optuna.Study,
    trial: int | None = None,
    *,
    top: int = 1,
    seeds: int = 0,
    study_file: str | Path | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    on_reevaluated: ReevaluationListener | None = None,
    before_training: Callable[[], None] | None = None,
    model: UserBuilder | None = None,
    data: ArrayData | None = None,
) -> SavedModel:
    """Retrain trial number ``trial`` of ``study`` (default: the best) on training + validation data; test it once.

    ``top=K, seeds=S``: first re-evaluate the K best complete trials with S extra seeds each on the
    search's training/validation split (:func:`reevaluate`, stored in the study's user attrs) and
    retrain the one with the best mean instead; ``on_reevaluated`` sees the comparison.
    ``before_training`` runs once every input is checked and before anything trains (hpo.best checks
    its output folder there).  ``model``: the builder a study searched through ``hpo.search(..., model=)``.
    ``study_file`` defaults to the study file named like the study (``cifar`` for study ``cifar``);
    ``device`` and ``data_dir`` replace the study file's.  A study searched on arrays in memory
    (``hpo.search(..., data=hpo.ArrayData(...))``) needs the same arrays again as ``data``.  Save the
    result with :func:`save_model`.
    """
    from hpo.studyfile.space import from_params

    check_reevaluation(top=top, seeds=seeds, trial=trial)
    if seeds > 0 and len(study.directions) > 1:
        raise UsageError(
            f"argument --seeds: re-evaluation ranks trials by one objective; study {study.study_name!r} has "
            f"{len(study.directions)}: give --trial N instead"
        )
    prepared = _prepare(study, trial, study_file=study_file, device=device, data_dir=data_dir, model=model, data=data)
    spec, picked = prepared.spec, prepared.trial
    check_test_images(prepared.dataset)
    if before_training is not None:
        before_training()
    if seeds > 0:
        results = reevaluate(study, spec, prepared.dataset, prepared.device, top=top, seeds=seeds)
        picked = pick_trial(study, results[0].trial)
        if on_reevaluated is not None:
            on_reevaluated(results, picked)
    return retrain_trial(spec, picked, from_params(picked.params, spec.space, spec.model.space), prepared.dataset, prepared.device)


@dataclass(frozen=True)
class Replay:
    """A trial trained again exactly as the search trained it, beside what it stored."""

    trial: optuna.trial.FrozenTrial
    device: str
    metric: str
    epochs: list[ReplayedEpoch]


def replay(
    study: optuna.Study,
    trial: int | None = None,
    *,
    study_file: str | Path | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    model: UserBuilder | None = None,
    data: ArrayData | None = None,
) -> Replay:
    """Retrain trial ``trial`` (default: the best) as the search did: training part, same validation split,
    seed and epochs; its recomputed metric per epoch beside the stored one.  Nothing is saved.
    ``data``: the arrays a study searched on arrays was given."""
    from hpo.studyfile.space import from_params

    prepared = _prepare(study, trial, study_file=study_file, device=device, data_dir=data_dir, model=model, data=data)
    spec, picked = prepared.spec, prepared.trial
    epochs = replay_trial(spec, picked, from_params(picked.params, spec.space, spec.model.space), prepared.dataset, prepared.device)
    return Replay(trial=picked, device=str(prepared.device), metric=spec.study.metric, epochs=epochs)


def check_reevaluation(*, top: int, seeds: int, trial: int | None, replay: bool = False) -> None:
    """``--top`` and ``--seeds`` make sense together, and not with a trial named by hand."""
    if top < 1:
        raise UsageError(f"argument --top: must be a positive integer, got {top!r}")
    if seeds < 0:
        raise UsageError(f"argument --seeds: must be an integer >= 0, got {seeds!r}")
    if top > 1 and seeds == 0:
        raise UsageError(f"argument --top: comparing the top {top} trials needs extra seeds (--seeds S, S >= 1)")
    if seeds > 0 and (trial is not None or replay):
        raise UsageError(f"argument --seeds: not allowed with {'--replay' if replay else '--trial'} (it chooses the trial itself)")


# The study user attr that holds a trial's re-evaluations (shown by optuna-dashboard under the study's user attributes).
REEVALUATION_KEY = "reevaluated:trial{number}"


@dataclass(frozen=True)
class Reevaluation:
    """A trial's configuration trained with several seeds on the search's training/validation split."""

    trial: int
    seeds: tuple[int, ...]  # the trial's own seed first, then the extra ones
    values: tuple[float, ...]  # the study's metric per seed, best over the epochs (as a trial's value is)
    val_accuracies: tuple[float, ...]  # fractions, at those best epochs

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def val_accuracy(self) -> float:
        return statistics.fmean(self.val_accuracies)


def extra_seeds(seed: int, count: int) -> tuple[int, ...]:
    """The seeds a trial is re-evaluated with: derived from its own, so asking again finds the stored results."""
    return tuple((seed + 104_729 * i) % 2**31 for i in range(1, count + 1))  # 104,729: a prime, far from 1


def best_first(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The complete ones of ``trials``, best first by the study's objective (computed on validation data only)."""
    from optuna.trial import TrialState

    sign = direction_sign(study.direction.name.lower())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return sorted(complete, key=lambda t: sign * float(t.value))  # type: ignore[arg-type]


def top_trials(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` best complete trials of hpo.run (with a stored seed); fewer if fewer completed."""
    ours = [t for t in study.get_trials(deepcopy=False) if isinstance(t.user_attrs.get("seed"), int) and _curve(t)]
    return best_first(study, ours)[:top]


def reevaluate(
    study: optuna.Study, spec: StudySpec, dataset: Dataset, device: torch.device, *, top: int, seeds: int
) -> list[Reevaluation]:
    """Train each of the ``top`` best complete trials with ``seeds`` extra seeds, exactly as the search did
    (training part, validation split, epochs, schedule); best first by the mean over all its seeds.

    Each trial's results are stored as the study user attr ``reevaluated:trial<N>`` once it is done,
    and results already stored for a seed are read back instead of trained again.  The test set is
    not touched.
    """
    from hpo.studyfile.space import from_params
    from hpo.training.recipe import best_epoch, score, seeded_model, train_config
    from hpo.training.splits import carve_validation

    metric = spec.study.metric
    data = carve_validation(dataset, spec.data).to(device)
    results = []
    for trial in top_trials(study, top):
        key = REEVALUATION_KEY.format(number=trial.number)
        stored = study.user_attrs.get(key, {})
        known = dict(zip(stored.get("seeds", ()), zip(stored.get("values", ()), stored.get("val_accuracies", ()))))
        own = trial.user_attrs["seed"]
        known[own] = (float(trial.value), float(trial.user_attrs.get("val_accuracy", float("nan"))))  # type: ignore[arg-type]
        wanted = (own, *extra_seeds(own, seeds))
        hp = from_params(trial.params, spec.space, spec.model.space)
        for seed in wanted:
            if seed in known:
                continue
            logger.info("re-evaluating trial %d with seed %d", trial.number, seed)
            epochs = train_like(trial, spec, seeded_model(spec, hp, data, seed), data, train_config(spec, hp, seed=seed, device=device))
            best = best_epoch(epochs, metric)
            known[seed] = (score(best, metric), best.val_accuracy)
        result = Reevaluation(
            trial=trial.number, seeds=wanted,
            values=tuple(known[s][0] for s in wanted), val_accuracies=tuple(known[s][1] for s in wanted),
        )
        study.set_user_attr(key, {
            "seeds": list(result.seeds), "values": list(result.values), "val_accuracies": list(result.val_accuracies),
            "metric": metric, "mean": result.mean, "sd": result.sd,
        })
        results.append(result)
    sign = direction_sign(spec.study.direction or "minimize")
    return sorted(results, key=lambda r: sign * r.mean)


def check_test_images(dataset: Dataset) -> None:
    from hpo.training.arrays import ARRAYS_NAME

    if len(dataset.test_labels) == 0:
        if dataset.name == ARRAYS_NAME:
            raise DataError("ArrayData: no test_images: the retrained model is tested on them")
        raise DataError(f"data_dir: no test images in {dataset.source} (test/<class>/): the retrained model is tested on them")


def retrain_trial(
    spec: StudySpec, trial: optuna.trial.FrozenTrial, hp: Hyperparameters, dataset: Dataset, device: torch.device
) -> SavedModel:
    """Train ``hp`` on training + validation data for the trial's epochs and seed; test once."""
    from hpo.training.batches import Normalizer
    from hpo.training.fit import evaluate
    from hpo.training.recipe import seeded_model, train_config
    from hpo.training.splits import retraining_data

    data = retraining_data(dataset, spec.data).to(device)
    seed = trial.user_attrs["seed"]
    epochs = trial_epochs(trial)
    model = seeded_model(spec, hp, data, seed)
    logger.info("retraining trial %d on %d images for %d epochs on %s", trial.number, len(data.train), epochs, device)
    # data.val is the test set here: it is looked at once, after training, not after every epoch.
    train_like(trial, spec, model, data, train_config(spec, hp, seed=seed, device=device), evaluate_each_epoch=False)
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
        test_images=len(data.val),
        dataset=dataset.name,
        classes=dataset.classes,
        image_shape=data.image_shape,
        mean=data.mean,
        std=data.std,
    )


@dataclass(frozen=True)
class ReplayedEpoch:
    epoch: int
    stored: float | None  # the metric the trial reported for this epoch; None if it reported none
    replayed: float


def replay_trial(
    spec: StudySpec, trial: optuna.trial.FrozenTrial, hp: Hyperparameters, dataset: Dataset, device: torch.device
) -> list[ReplayedEpoch]:
    """Retrain as the search did (training part, same validation split, seed and epochs); the metric per epoch."""
    from hpo.training.recipe import score, seeded_model, train_config
    from hpo.training.splits import carve_validation

    data = carve_validation(dataset, spec.data).to(device)
    seed = trial.user_attrs["seed"]
    config = train_config(spec, hp, seed=seed, device=device)
    results = train_like(trial, spec, seeded_model(spec, hp, data, seed), data, config)
    return [
        ReplayedEpoch(epoch=r.epoch, stored=_curve(trial).get(r.epoch), replayed=score(r, spec.study.metric))
        for r in results
    ]
