"""Study files: TOML in, frozen dataclasses out, validated before anything trains or touches storage.

Every error names the file, the table and the key, and echoes the bad value.  The sections and
keys are documented in docs/study-files.md; each section is one dataclass below, and a key
is accepted only if it is a field of that dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from hpo.errors import SpecError, UsageError
from hpo.studyfile import names
from hpo.studyfile.samplers import (
    PRUNERS,
    SAMPLERS,
    SINGLE_OBJECTIVE_SAMPLERS,
    GridSamplerSpec,
    PromotionHalvingPrunerSpec,
    PrunerSpec,
    SamplerSpec,
)
from hpo.studyfile.space import (
    PARAMETERS,
    Fixed,
    ModelSpace,
    SearchSpace,
    applies_to,
    grid,
    parse_model_space,
    parse_space,
)

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def check_device(device: str) -> str | None:
    """Return a problem with a device string, or None; shared by the study file and ``--device``."""
    if _DEVICE.match(device):
        return None
    return f"must be auto, cpu, cuda, cuda:N or mps, got {device!r}"


# Each metric's direction, fixed by its meaning.
DIRECTIONS: Mapping[str, str] = {"val_loss": "minimize", "val_accuracy": "maximize"}

# Every objective a study may optimize ([study] objectives), with its direction, fixed by its meaning:
#   val_loss       the best epoch's validation loss (cross-entropy, nats per image)
#   val_accuracy   the best epoch's validation accuracy (fraction in [0, 1])
#   params         parameters of the model, trainable and frozen alike (count)
#   macs           multiply-accumulates of one forward pass of one image (count; FLOPs / 2)
#   latency_ms     median wall time of one forward pass of one image on the trial's device (ms)
#   train_seconds  wall time of the trial's training passes, summed over its epochs (s)
OBJECTIVES: Mapping[str, str] = {
    **DIRECTIONS,
    "params": "minimize",
    "macs": "minimize",
    "latency_ms": "minimize",
    "train_seconds": "minimize",
}
# Objectives that training does not change: measured before the first epoch, so that a trial over a
# constraint on one of them is recorded infeasible without training.
BEFORE_TRAINING = ("params", "macs", "latency_ms")


def direction_sign(direction: str) -> float:
    """+1 for "minimize", -1 for "maximize": the best of many values is the least ``sign x value``."""
    return 1.0 if direction == "minimize" else -1.0


@dataclass(frozen=True)
class StudySection:
    name: str
    # The objective: best validation loss (minimize) or best validation accuracy (maximize); None: val_loss,
    # or the first of ``objectives``.
    metric: Literal["val_loss", "val_accuracy"] | None = None
    direction: Literal["minimize", "maximize"] | None = None
    # Seeds the sampler and every trial's seed (trial seed = f(seed, trial number)).
    seed: int = 0
    # Several objectives (names of OBJECTIVES), the first val_loss or val_accuracy: its learning curve drives
    # the pruner. Empty: the one objective ``metric``; filled in with it.
    objectives: tuple[str, ...] = ()
    # Upper limits of minimized objectives (lower limits of maximized ones), in the objective's units:
    # a trial beyond one is infeasible, recorded through Optuna's constraints and never best.
    constraints: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(OBJECTIVES[name] for name in self.objectives)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if any(not character.isprintable() for character in self.name):
            # A NUL cannot reach a file name (checkpoints are kept per study) nor most databases.
            raise ValueError(f"name must be printable characters only, got {self.name!r}")
        self._fill_objectives()
        assert self.metric is not None
        expected = DIRECTIONS[self.metric]
        if self.direction is None:
            object.__setattr__(self, "direction", expected)
        elif self.direction != expected:
            raise ValueError(
                f"direction {self.direction!r} does not fit metric {self.metric!r} (expected {expected!r})"
            )
        self._check_constraints()

    def _fill_objectives(self) -> None:
        """``metric`` from ``objectives`` or the other way round; each objective checked."""
        objectives = tuple(self.objectives)
        if not objectives:
            object.__setattr__(self, "metric", self.metric or "val_loss")
            object.__setattr__(self, "objectives", (self.metric,))
            return
        for name in objectives:
            _check_name("objectives", name, OBJECTIVES)
        twice = [name for index, name in enumerate(objectives) if name in objectives[:index]]
        if twice:
            raise ValueError(f"objectives names {twice[0]!r} twice, got {list(objectives)!r}")
        if objectives[0] not in DIRECTIONS:
            raise ValueError(
                f"objectives must start with val_loss or val_accuracy (its learning curve drives the pruner), "
                f"got {list(objectives)!r}"
            )
        if self.metric is not None and self.metric != objectives[0]:
            raise ValueError(f"metric {self.metric!r} is not the first of objectives {list(objectives)!r}")
        object.__setattr__(self, "objectives", objectives)
        object.__setattr__(self, "metric", objectives[0])

    def _check_constraints(self) -> None:
        for name, limit in self.constraints.items():
            _check_name("constraints", name, OBJECTIVES)
            if name not in self.objectives:
                raise ValueError(
                    f"constraints: {name} is not measured, it is not one of objectives {list(self.objectives)!r}; "
                    f"add it there, got {name} = {limit!r}"
                )
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
                raise ValueError(f"constraints: {name} must be a number > 0, got {limit!r}")


@dataclass(frozen=True)
class DataSection:
    # A key of hpo.studyfile.names.DATASETS.
    dataset: str = "cifar10"
    # Folder torchvision downloads into, a folder with train/<class>/ and test/<class>/ images,
    # or a .tar.gz of such a folder. Relative paths are relative to the working directory.
    data_dir: str = "data"
    # Share of the training set held out for validation (model selection); the test set is
    # never used by a search.
    val_fraction: float = 0.1
    # Random subsets of the training and validation parts (None: all of it), for quick studies.
    train_subset: int | None = None
    val_subset: int | None = None
    # Side in pixels that images are resized to (an image folder's photos: the shorter side, then a
    # centre crop); None: what the model asks for (hpo.training.datasets.load_dataset's
    # default_image_size), else the dataset's own (CIFAR 32, MNIST 28, image folders 32).
    image_size: int | None = None
    # Colour channels, 1 (grayscale) or 3 (RGB); None: the dataset's own (MNIST 1, CIFAR 3), and
    # for image folders 1 when every training image is gray, else 3.
    channels: int | None = None
    # Seeds the train/validation split; the same for every trial so that trials are comparable.
    split_seed: int = 0

    def __post_init__(self) -> None:
        _check_name("dataset", self.dataset, names.DATASETS)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for key in ("train_subset", "val_subset"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value!r}")
        if self.image_size is not None and not 8 <= self.image_size <= 512:
            raise ValueError(f"image_size must be from 8 to 512, got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")


@dataclass(frozen=True)
class TrainSection:
    max_epochs: int = 10
    device: str = "auto"
    # Random crop and horizontal flip of training images, on the device; their kind and strength are the
    # crop, crop_padding, crop_scale and flip hyperparameters of [space]. false: no augmentation whatever
    # [space] says.
    augment: bool = True
    # torch.compile the model. Off by default: every trial pays the compile time again, which
    # faster epochs must repay; bench/throughput.py --compile measures both ways.
    compile: bool = False
    # Autocast: "auto" is bf16 where the device has it natively (CUDA compute capability 8.0 and up, CPUs
    # with AVX-512 BF16 or AMX), fp16 with gradient scaling on older CUDA GPUs (T4, V100), fp32 elsewhere.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs!r}")
        problem = check_device(self.device)
        if problem:
            raise ValueError(f"device {problem}")


@dataclass(frozen=True)
class ModelSection:
    # A built-in model (hpo.studyfile.names.MODELS); "torchvision:<arch>", a classification model of
    # torchvision (hpo.training.backbones); or the user's own: an import path "package.module:build", or a
    # name registered with @hpo.register_model or the hpo.models entry points (hpo.training.user_models).
    name: str = "cnn"
    # torchvision:<arch> only. None: random initialization; "DEFAULT" or a member name of the arch's
    # weights enum ("IMAGENET1K_V1"): torchvision's pretrained weights, from torch.hub's cache
    # ($TORCH_HOME/hub/checkpoints) or downloaded there; a path (relative to the working directory)
    # to a .pth/.pt state dict of the arch.
    weights: str | None = None
    # The user's own model's hyperparameters ([model.space]); its builder gets them as keyword arguments.
    space: ModelSpace = ModelSpace()

    def __post_init__(self) -> None:
        problem = names.model_problem(self.name)
        if problem:
            raise ValueError(problem)
        if self.weights is not None:
            if names.torchvision_arch(self.name) is None:
                raise ValueError(f"weights is for torchvision:<arch> models only, got name {self.name!r}")
            problem = names.weights_problem(self.weights)
            if problem:
                raise ValueError(problem)
        if self.space.entries and not names.is_user_model(self.name):
            raise ValueError(
                f"[model.space] is for your own model's hyperparameters; {self.name!r} is built-in and takes [space]'s"
            )


@dataclass(frozen=True)
class TrackingSection:
    """Experiment trackers that get every finished trial (hpo.tuning.trackers); each key switches one on.

    Each tracker needs its library: ``pip install "hpo[trackers]"``.
    """

    # MLflow tracking URI ("sqlite:///mlflow.db", "http://host:5000"): one run per finished trial, in the
    # experiment named like the study, with its parameters, value, user attrs and the metric of every epoch.
    mlflow: str | None = None
    # A folder (relative to the working directory): TensorBoard event files, one run per finished trial
    # (<folder>/<study>/trial-<N>), with the metric of every epoch and the trial's hyperparameters.
    tensorboard: str | None = None

    def __post_init__(self) -> None:
        for key in ("mlflow", "tensorboard"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key} must not be empty (leave the key out to switch it off)")


def _check_name(key: str, value: str, table: Mapping[str, object]) -> None:
    if value not in table:
        raise ValueError(f"{key} must be one of {', '.join(repr(n) for n in table)}, got {value!r}")


@dataclass(frozen=True)
class StudySpec:
    """A whole study file."""

    path: Path
    study: StudySection
    data: DataSection
    train: TrainSection
    model: ModelSection
    sampler: SamplerSpec
    pruner: PrunerSpec
    space: SearchSpace
    tracking: TrackingSection = TrackingSection()


@dataclass(frozen=True)
class Overrides:
    """Values that replace the study file's (hpo.run's --study-name, --seed, --data-dir, --device,
    --max-epochs); None keeps the file's value."""

    study_name: str | None = None
    seed: int | None = None
    data_dir: str | None = None
    device: str | None = None
    max_epochs: int | None = None

    def apply(self, spec: StudySpec) -> StudySpec:
        """``spec`` with these values in place; a UsageError names the flag of a bad one."""
        study, data, train = spec.study, spec.data, spec.train
        if self.study_name is not None:
            try:
                study = dataclasses.replace(study, name=self.study_name)
            except ValueError as exc:  # the section's own check, as for the study file
                raise UsageError(f"argument --study-name: {str(exc).removeprefix('name ')}") from None
        if self.seed is not None:
            study = dataclasses.replace(study, seed=self.seed)
        if self.data_dir is not None:
            data = dataclasses.replace(data, data_dir=self.data_dir)
        for flag, name, value in (("--device", "device", self.device), ("--max-epochs", "max_epochs", self.max_epochs)):
            if value is not None:
                try:
                    train = dataclasses.replace(train, **{name: value})
                except ValueError as exc:  # the section's own check, as for the study file
                    raise UsageError(f"argument {flag}: {exc}") from None
        return dataclasses.replace(spec, study=study, data=data, train=train)


def _matches(value: object, annotation: Any) -> bool:
    """Whether a TOML value fits a field annotation (bool is never taken for int or float)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin is tuple:  # a TOML array of one type, e.g. tuple[str, ...]
        return isinstance(value, list) and all(_matches(item, typing.get_args(annotation)[0]) for item in value)
    if origin is Mapping:  # a TOML table of one value type, e.g. Mapping[str, float]
        return isinstance(value, dict) and all(_matches(item, typing.get_args(annotation)[1]) for item in value.values())
    if isinstance(value, bool):
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _converted(value: Any, annotation: Any) -> Any:
    """A checked TOML value as the field holds it: ints of float fields as floats, arrays as tuples."""
    if annotation is float:
        return float(value)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return tuple(value)
    if origin is Mapping and typing.get_args(annotation)[1] is float:
        return {key: float(item) for key, item in value.items()}
    return value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is Mapping:
        return f"a table of {_describe(typing.get_args(annotation)[1]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, annotation.__name__
    )


def _build(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """Make dataclass ``cls`` from a TOML table: unknown keys, wrong types and bad values raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise SpecError(f"{where}: unknown key {key!r} (known keys: {known})")
        if not _matches(value, hints[key]):
            raise SpecError(f"{where}: {key} must be {_describe(hints[key])}, got {value!r}")
    values = {key: _converted(v, hints[key]) for key, v in table.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in table]
        raise SpecError(f"{where}: missing key {missing[0]!r}") from exc
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _typed_section(registry: Mapping[str, type], table: Mapping[str, Any], where: str) -> Any:
    kind = table.get("type")
    if kind not in registry:
        raise SpecError(f"{where}: type must be one of {', '.join(registry)}, got {kind!r}")
    options = {k: v for k, v in table.items() if k != "type"}
    return _build(registry[kind], options, f"{where} (type {kind!r})")


DEFAULT_PRUNER = "successive_halving"
_SECTIONS = ("study", "data", "train", "model", "sampler", "pruner", "space", "tracking")


def _space_misfit(given: Iterable[str], model: str) -> str | None:
    """Why hyperparameters ``given`` in [space] do not fit ``model`` (an architecture hyperparameter of another), or None."""
    ignored = [key for key in given if not applies_to(key, model)]
    if not ignored:
        return None
    models = PARAMETERS[ignored[0]].models or ()
    if models == (names.TORCHVISION_MODELS,):
        return f"{ignored[0]} fine-tunes torchvision:<arch> models only, not model {model!r}"
    kind = "your own model (its hyperparameters go in [model.space])" if names.is_user_model(model) else "a fixed architecture"
    return f"{ignored[0]} shapes the {' and '.join(models)} model only; model {model!r} is {kind}"


def with_model(spec: StudySpec, name: str) -> StudySpec:
    """``spec`` training model ``name`` instead (``hpo.search(..., model=builder)``), checked as the study file is."""
    try:
        model = ModelSection(name=name, space=spec.model.space)
    except ValueError as exc:
        raise SpecError(f"{spec.path}: [model] {exc}") from exc
    given = [key for key, dist in spec.space.entries if dist != Fixed(PARAMETERS[key].default)]
    problem = _space_misfit(given, name)
    if problem:
        raise SpecError(f"{spec.path}: [space] {problem}")
    return dataclasses.replace(spec, model=model)


def _model_section(path: Path, table: Mapping[str, Any]) -> ModelSection:
    """[model] with its [model.space] sub-table parsed like [space]."""
    table = dict(table)
    raw_space = table.pop("space", {})
    if not isinstance(raw_space, dict):
        raise SpecError(f"{path}: [model] space must be a table [model.space], got {raw_space!r}")
    try:
        space = parse_model_space(raw_space)
    except ValueError as exc:
        raise SpecError(f"{path}: [model.space] {exc}") from exc
    return _build(ModelSection, {**table, "space": space}, f"{path}: [model]")


def _study_section(path: Path, table: Mapping[str, Any], sampler: SamplerSpec) -> StudySection:
    """[study], named like the file unless it says otherwise; its objectives checked against the sampler."""
    if "objectives" in table and "metric" in table:
        raise SpecError(
            f"{path}: [study] give objectives or metric, not both (the first objective is the metric), "
            f"got metric = {table['metric']!r} and objectives = {table['objectives']!r}"
        )
    study = _build(StudySection, {"name": path.stem, **table}, f"{path}: [study]")
    kind = next(name for name, cls in SAMPLERS.items() if isinstance(sampler, cls))
    if study.multi_objective and kind in SINGLE_OBJECTIVE_SAMPLERS:
        raise SpecError(
            f"{path}: [sampler] type {kind!r} optimizes one objective, got objectives {list(study.objectives)!r} "
            "(for several: tpe, nsga2, random, gp, qmc or grid)"
        )
    return study


def load_spec(path: Path) -> StudySpec:
    """Read and validate a study file; every problem raises SpecError naming the file and key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read study file: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from exc
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise SpecError(f"{path}: unknown table [{key}] (known tables: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise SpecError(f"{path}: {key} must be a table [{key}], got {value!r}")
    train = _build(TrainSection, raw.get("train", {}), f"{path}: [train]")
    # Without a [pruner] table: successive halving, the winner of bench/search.py (docs/benchmarks.md, "Choosing sampler and pruner").
    # Hyperband's max_resource, when not given, is filled in from max_epochs when the pruner is made
    # (hpo.tuning.study), after --max-epochs has replaced the file's.
    pruner = _typed_section(PRUNERS, {"type": DEFAULT_PRUNER, **raw.get("pruner", {})}, f"{path}: [pruner]")
    try:
        space = parse_space(raw.get("space", {}))
    except ValueError as exc:
        raise SpecError(f"{path}: [space] {exc}") from exc
    model = _model_section(path, raw.get("model", {}))
    problem = _space_misfit(raw.get("space", {}), model.name)
    if problem:
        raise SpecError(f"{path}: [space] {problem}")
    sampler = _typed_section(SAMPLERS, {"type": "tpe", **raw.get("sampler", {})}, f"{path}: [sampler]")
    study = _study_section(path, raw.get("study", {}), sampler)
    if isinstance(pruner, PromotionHalvingPrunerSpec) and study.multi_objective:
        raise SpecError(
            f'{path}: [pruner] type = "promotion_halving" ranks one value per rung; this study has objectives '
            f"{list(study.objectives)!r} (use successive_halving, which judges the first objective's curve)"
        )
    if isinstance(sampler, GridSamplerSpec):
        try:
            grid(space)
            grid(model.space)
        except ValueError as exc:
            raise SpecError(f"{path}: [space] {exc}") from exc
    return StudySpec(
        path=path,
        study=study,
        data=_build(DataSection, raw.get("data", {}), f"{path}: [data]"),
        train=train,
        model=model,
        sampler=sampler,
        pruner=pruner,
        space=space,
        tracking=_build(TrackingSection, raw.get("tracking", {}), f"{path}: [tracking]"),
    )


def shipped_studies() -> Path:
    """The study files that come with hpo: studies/ at the top of a source checkout (an editable install too), else
    hpo/studies/ inside the installed package, where the wheel carries them as package data (pyproject.toml)."""
    root = Path(__file__).resolve().parents[2]  # hpo/studyfile/spec.py → the repository root, or site-packages
    if (root / "pyproject.toml").is_file() and (root / "studies").is_dir():
        return root / "studies"
    return Path(str(importlib.resources.files("hpo").joinpath("studies")))  # pip installs files: a real path


def studies_dirs() -> tuple[Path, ...]:
    """Where ``--study NAME`` looks: ./studies, then the study files shipped with hpo."""
    shipped = shipped_studies()
    local = Path("studies").resolve()
    return (local,) if local == shipped else (local, shipped)


def find_study(name_or_path: str) -> Path:
    """Resolve ``--study``: a path to a .toml file, or a name looked up in the studies folders."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.is_file():
        if not candidate.is_file():
            raise SpecError(f"--study: no such study file: {name_or_path}")
        return candidate
    for folder in studies_dirs():
        path = folder / f"{name_or_path}.toml"
        if path.is_file():
            return path
    available = sorted({p.stem for folder in studies_dirs() if folder.is_dir() for p in folder.glob("*.toml")})
    looked = ", ".join(str(d) for d in studies_dirs())
    raise SpecError(
        f"--study: unknown study {name_or_path!r}; available: {', '.join(available) or 'none'} (looked in {looked})"
    )


def spec_for_study(study_name: str, study_file: str | Path | None) -> StudySpec:
    """The study file of a stored study: ``study_file`` (a name in studies/ or a path), else the file named
    like the study; its ``[study] name`` is the stored study's."""
    return Overrides(study_name=study_name).apply(load_spec(find_study(str(study_file or study_name))))
