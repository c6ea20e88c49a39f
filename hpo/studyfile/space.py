"""The search space: what a study file may tune, how each entry is sampled, and the typed result.

Every hyperparameter has one name, used unchanged in the study file's ``[space]`` table, in
``trial.params`` (and so in optuna-dashboard and the report) and as a field of
:class:`Hyperparameters`.  An entry in ``[space]`` is either a fixed value or a distribution:

    lr = { low = 1e-4, high = 1e-1, log = true }      # float range
    depth = { low = 2, high = 4 }                      # int range (step defaults to 1)
    batch_size = { choices = [64, 128, 256] }          # categorical
    optimizer = "adamw"                                # fixed: not searched

A hyperparameter missing from ``[space]`` keeps its default.

To add a hyperparameter, declare it as a field of :class:`Hyperparameters` (type, default, domain,
one-line description, the models it shapes, the condition under which it applies), write the code
that acts on it (reading ``hp.<name>`` in hpo.training) and a reach test, and regenerate
the table in docs/study-files.md with :func:`readme_table`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from hpo.studyfile.names import CONFIGURABLE_MODELS, TORCHVISION_MODELS

Value = Union[int, float, str, bool]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
POOLS = ("max", "avg", "none")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "elu", "tanh", "sigmoid")
INITS = ("default", "kaiming", "xavier")
SCHEDULES = ("none", "step", "cosine", "onecycle")
LR_SCALINGS = ("none", "linear")
CLASS_WEIGHTINGS = ("none", "balanced")
CROPS = ("pad", "resized")


@dataclass(frozen=True)
class Fixed:
    """Not searched: every trial uses ``value``."""

    value: Value


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class Choice:
    choices: tuple[Value, ...]


Distribution = Union[Fixed, FloatRange, IntRange, Choice]


@dataclass(frozen=True)
class Domain:
    """The values a hyperparameter may take: a test, and the words for it."""

    ok: Callable[[Any], bool]
    must: str  # completes "<name> must ...", for errors: "be > 0"
    shown: str  # the README's type column; {kind} stands for the type: "{kind} > 0"

    def problem(self, value: Value) -> str | None:
        return None if self.ok(value) else f"must {self.must}"


def _one_of(*allowed: Value) -> Domain:
    if all(isinstance(a, str) for a in allowed):
        return Domain(lambda v: v in allowed, f"be one of {', '.join(map(str, allowed))}", ", ".join(f"`{a}`" for a in allowed))
    words = " or ".join(map(str, allowed))
    return Domain(lambda v: v in allowed, f"be {words}", words)


def _from_to(low: int, high: int) -> Domain:
    return Domain(lambda v: low <= v <= high, f"be from {low} to {high}", f"{{kind}} {low}..{high}")


POSITIVE = Domain(lambda v: v > 0, "be > 0", "{kind} > 0")
NON_NEGATIVE = Domain(lambda v: v >= 0, "be >= 0", "{kind} >= 0")
FRACTION = Domain(lambda v: 0 <= v < 1, "be in [0, 1)", "{kind} in [0, 1)")
OPEN_FRACTION = Domain(lambda v: 0 < v < 1, "be in (0, 1)", "{kind} in (0, 1)")
DECAY = Domain(lambda v: 0 < v <= 1, "be in (0, 1]", "{kind} in (0, 1]")
BOOLEAN = Domain(lambda v: True, "be true or false", "true/false")  # the type check is all there is
# Odd sizes only: padding = k // 2 then keeps the spatial size exactly.
ODD_KERNEL = Domain(lambda v: v in (1, 3, 5, 7, 9, 11), "be an odd size from 1 to 11", "odd {kind} 1..11")

# The models whose builders read the architecture hyperparameters below (hpo.studyfile.names).
CNN = CONFIGURABLE_MODELS
# Every torchvision:<arch> model: the fine-tuning hyperparameters act on its new classifier head and the rest.
TORCHVISION = (TORCHVISION_MODELS,)


@dataclass(frozen=True)
class Parameter:
    """Everything hpo knows about one hyperparameter, declared once as a field of :class:`Hyperparameters`."""

    name: str
    kind: type
    default: Value
    domain: Domain
    help: str  # one line: what it changes, with units
    models: tuple[str, ...] | None = None  # the models it shapes ("family:*" for a family); None: every model
    # Sampled only when another hyperparameter has one of these values (conditional space).
    only_when: tuple[str, tuple[Value, ...]] | None = None


def _declare(
    default: Value, domain: Domain, help: str, *,
    models: tuple[str, ...] | None = None, only_when: tuple[str, tuple[Value, ...]] | None = None,
) -> Any:
    """A field of :class:`Hyperparameters`: its default, and what the study file may say about it."""
    return dataclasses.field(default=default, metadata={"declared": (domain, help, models, only_when)})


@dataclass(frozen=True)
class Hyperparameters:
    """One trial's configuration, and THE declaration of every hyperparameter.

    Each field's name, type, default, domain, description, models and condition are declared here
    and nowhere else: the study file's schema and errors, ``trial.suggest_*``, the docs table and
    what reaches the model, optimizer, loss and batches all follow from it.
    """

    lr: float = _declare(1e-3, POSITIVE, "learning rate (the peak rate under `onecycle`)")
    batch_size: int = _declare(128, POSITIVE, "images per optimizer step")
    kernel_size: int = _declare(3, ODD_KERNEL, "conv kernel width; padding `k // 2` keeps the spatial size", models=CNN)
    weight_decay: float = _declare(0.0, NON_NEGATIVE, "L2 penalty (decoupled for AdamW), on every parameter")
    # Each block halves the spatial size; 5 blocks take 32 px down to 1 px.
    depth: int = _declare(
        3, _from_to(1, 5), "conv blocks (conv → BatchNorm → activation → 2x2 pool → channel dropout)", models=CNN
    )
    base_width: int = _declare(
        16, POSITIVE, "channels of the first block; channels double per block (16 with depth 3: 16 → 32 → 64)", models=CNN
    )
    dropout: float = _declare(0.0, FRACTION, "dropout before each linear layer", models=CNN)
    optimizer: str = _declare("adamw", _one_of(*OPTIMIZERS), "the optimizer")
    momentum: float = _declare(0.9, FRACTION, "momentum of sgd and rmsprop", only_when=("optimizer", ("sgd", "rmsprop")))
    # Architecture of the configurable CNN (see hpo.training.models.conv_net).
    stride: int = _declare(1, _one_of(1, 2), "stride of every conv", models=CNN)
    pool: str = _declare(
        "max", _one_of(*POOLS), "2x2 pool after every conv (rounding up: a 1 px map stays 1 px)", models=CNN
    )
    batch_norm: bool = _declare(
        True, BOOLEAN, "BatchNorm after every conv (the conv has a bias only without it)", models=CNN
    )
    activation: str = _declare(
        "relu", _one_of(*ACTIVATIONS), "nonlinearity of the conv blocks and the dense layer", models=CNN
    )
    conv_dropout: float = _declare(0.0, FRACTION, "channel dropout (`Dropout2d`) after every conv block", models=CNN)
    dense_width: int = _declare(
        0, NON_NEGATIVE,
        "0: global average pool → linear classifier; else the last feature map is flattened → dense layer of "
        "this width → activation → classifier (the tutorials' LeNet head)",
        models=CNN,
    )
    init: str = _declare(
        "default", _one_of(*INITS),
        "conv and linear weights: PyTorch's own, Kaiming normal or Xavier uniform with the activation's gain; biases 0",
    )
    # Optimization.
    nesterov: bool = _declare(
        True, BOOLEAN, "Nesterov momentum (with momentum > 0)", only_when=("optimizer", ("sgd",))
    )
    schedule: str = _declare(
        "none", _one_of(*SCHEDULES),
        "learning-rate schedule: `step` is StepLR per epoch; `cosine` anneals to 0 over `max_epochs` per epoch; "
        "`onecycle` rises linearly from lr/25 to lr, then falls linearly to ~0, per batch, with momentum left as set",
    )
    step_size: int = _declare(5, POSITIVE, "epochs between StepLR decays", only_when=("schedule", ("step",)))
    gamma: float = _declare(0.1, DECAY, "StepLR decay factor", only_when=("schedule", ("step",)))
    warmup_fraction: float = _declare(
        0.3, OPEN_FRACTION, "share of all steps spent rising to lr", only_when=("schedule", ("onecycle",))
    )
    lr_scaling: str = _declare(
        "none", _one_of(*LR_SCALINGS),
        "`linear`: the optimizer gets lr x batch_size / reference_batch_size (Goyal et al.'s rule)",
    )
    reference_batch_size: int = _declare(
        128, POSITIVE, "the batch size at which `lr` applies unscaled", only_when=("lr_scaling", ("linear",))
    )
    l1: float = _declare(
        0.0, NON_NEGATIVE, "L1 penalty: l1 x the sum of \\|w\\| over conv and linear weights is added to the training loss"
    )
    label_smoothing: float = _declare(0.0, FRACTION, "label smoothing of the training loss")
    class_weighting: str = _declare(
        "none", _one_of(*CLASS_WEIGHTINGS),
        "`balanced`: class c's loss weight is n / (classes x count of c in the training part), for imbalanced data",
    )
    # Augmentation (when [train] augment is on).
    crop: str = _declare(
        "pad", _one_of(*CROPS),
        "random crop per image: `pad` cuts the image's own size out of it zero-padded by `crop_padding` px "
        "(torchvision's RandomCrop); `resized` cuts a box of `crop_scale`..1 of the area and aspect ratio 3/4..4/3 "
        "and resizes it back, bilinear (RandomResizedCrop), for photos larger than CIFAR's",
    )
    crop_padding: int = _declare(
        4, _from_to(0, 16), "zero padding in pixels of the random crop; 0: no crop", only_when=("crop", ("pad",))
    )
    # 0.35 rather than torchvision's 0.08 (made for 90-epoch ImageNet runs): a trial trains a few epochs on a
    # small dataset, and an 8 % box of a 64 px image is an 18 px patch blown up 3.5x.
    crop_scale: float = _declare(
        0.35, DECAY, "smallest share of the image's area a `resized` crop keeps (uniform in crop_scale..1)",
        only_when=("crop", ("resized",)),
    )
    flip: bool = _declare(True, BOOLEAN, "random horizontal flip")
    cutout: int = _declare(
        0, _from_to(0, 32), "side in pixels of a square zeroed (after normalization: the mean) at a random centre "
        "of each training image, clipped at its edges (DeVries and Taylor); 0: none"
    )
    mixup_alpha: float = _declare(
        0.0, NON_NEGATIVE, "mixup: each training batch is blended with a shuffled copy of itself, weight ~ "
        "Beta(alpha, alpha) per batch, and so is its loss (Zhang et al.); 0: none"
    )

    # Fine-tuning a torchvision:<arch> model, whose classifier head is new (hpo.training.backbones).
    freeze_epochs: int = _declare(
        0, NON_NEGATIVE,
        "epochs at the start in which only the new classifier head trains: the rest gets no update and its BatchNorm "
        "statistics are kept; then every layer trains (>= max_epochs: the backbone never trains)",
        models=TORCHVISION,
    )
    backbone_lr_scale: float = _declare(
        1.0, DECAY, "every layer but the new head learns at lr x this (discriminative learning rates); the head at lr",
        models=TORCHVISION,
    )
    # The user's own model's hyperparameters ([model.space]), by their own names: what its builder gets
    # as keyword arguments. Not declared here: the study file declares them.
    model_params: Mapping[str, Value] = dataclasses.field(default_factory=dict)

    def scaled_lr(self) -> float:
        """The learning rate the optimizer gets: ``lr`` times batch_size / reference_batch_size when linear scaling is on."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / self.reference_batch_size
        return self.lr


_KINDS: Mapping[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _parameters() -> dict[str, Parameter]:
    declared = {}
    for field in dataclasses.fields(Hyperparameters):
        if "declared" not in field.metadata:
            continue  # model_params: the study file's [model.space] declares those
        domain, help, models, only_when = field.metadata["declared"]
        declared[field.name] = Parameter(
            name=field.name, kind=_KINDS[str(field.type)], default=field.default, domain=domain, help=help,
            models=models, only_when=only_when,
        )
    return declared


# Every hyperparameter by name, in declaration order.
PARAMETERS: Mapping[str, Parameter] = _parameters()


def applies_to(name: str, model: str) -> bool:
    """Whether hyperparameter ``name`` shapes ``model`` (a ``[model] name``); ``family:*`` in ``models`` covers ``family:<any>``."""
    models = PARAMETERS[name].models
    if models is None:
        return True
    return any(model == m or (m.endswith(":*") and model.startswith(m[:-1])) for m in models)


def _shown(value: Value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    return f"{value:g}"


def readme_table() -> str:
    """docs/study-files.md's hyperparameter table, generated from the declaration (tests/test_space.py keeps it in step)."""
    lines = ["| hyperparameter | type | default | models | meaning |", "| --- | --- | --- | --- | --- |"]
    for param in PARAMETERS.values():
        meaning = param.help
        if param.only_when is not None:
            parent, values = param.only_when
            meaning += f"; only when `{parent}` is {' or '.join(f'`{v}`' for v in values)}"
        models = "all" if param.models is None else ", ".join(f"`{m}`" for m in param.models)
        lines.append(f"| `{param.name}` | {param.domain.shown.format(kind=param.kind.__name__)} | {_shown(param.default)} | {models} | {meaning} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SearchSpace:
    """The ``[space]`` table, validated: one distribution per hyperparameter, in declaration order."""

    entries: tuple[tuple[str, Distribution], ...]

    def distribution(self, name: str) -> Distribution:
        return dict(self.entries)[name]

    def searched(self) -> tuple[str, ...]:
        return tuple(name for name, dist in self.entries if not isinstance(dist, Fixed))


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_value(name: str, value: object) -> Value:
    """Type- and domain-check one value of hyperparameter ``name``; raise ValueError naming it."""
    param = PARAMETERS[name]
    if param.kind is bool:
        ok = isinstance(value, bool)
    elif param.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, param.kind) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{name} must be {param.kind.__name__}, got {value!r} ({_type_name(value)})")
    if param.kind is float:
        value = float(value)  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    problem = param.domain.problem(value)  # type: ignore[arg-type]
    if problem:
        raise ValueError(f"{name} {problem}, got {value!r}")
    return value  # type: ignore[return-value]


_RANGE_KEYS = {"low", "high", "log", "step"}


def _parse_entry(name: str, raw: object, kind: type, check: Callable[[object], Value]) -> Distribution:
    """One entry of [space] (or [model.space]): a fixed value, choices or a range of ``kind``, each value ``check``-ed."""
    if not isinstance(raw, dict):
        if isinstance(raw, list):
            raise ValueError(f"{name}: write choices as {{ choices = {raw!r} }}, got a bare list")
        return Fixed(check(raw))
    keys = set(raw)
    if "choices" in keys:
        if keys != {"choices"}:
            extra = ", ".join(sorted(keys - {"choices"}))
            raise ValueError(f"{name}: 'choices' cannot be combined with {extra}")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{name}: choices must be a non-empty list, got {choices!r}")
        checked = tuple(check(c) for c in choices)
        if len(set(checked)) != len(checked):
            raise ValueError(f"{name}: choices repeat a value, got {choices!r}")
        return Choice(checked)
    unknown = keys - _RANGE_KEYS
    if unknown:
        raise ValueError(
            f"{name}: unknown key {', '.join(sorted(unknown))!s}; "
            "expected low, high, log, step or choices"
        )
    if kind in (str, bool):
        raise ValueError(f"{name} is categorical: use {{ choices = [...] }}, got a range")
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"{name}: a range needs both low and high, got {raw!r}")
    low, high = check(raw["low"]), check(raw["high"])
    if not low < high:  # type: ignore[operator]
        raise ValueError(
            f"{name}: low must be < high (use a fixed value for one point), got low={low!r} high={high!r}"
        )
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{name}: log must be true or false, got {log!r}")
    if log and low <= 0:  # type: ignore[operator]
        raise ValueError(f"{name}: a log range needs low > 0, got low={low!r}")
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise ValueError(f"{name}: step must be a number > 0, got {step!r}")
        if log and (kind is float or step != 1):
            raise ValueError(f"{name}: step cannot be combined with log = true")
    if kind is int:
        if step is not None and not isinstance(step, int):
            raise ValueError(f"{name}: step of an int range must be an int, got {step!r}")
        return IntRange(low=int(low), high=int(high), log=log, step=int(step or 1))
    return FloatRange(low=float(low), high=float(high), log=log, step=None if step is None else float(step))


def parse_space(table: Mapping[str, Any]) -> SearchSpace:
    """Validate the ``[space]`` table; raise ValueError with a message naming the key."""
    unknown = [key for key in table if key not in PARAMETERS]
    if unknown:
        raise ValueError(
            f"unknown hyperparameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}"
        )
    entries = []
    for name in PARAMETERS:
        if name in table:
            dist = _parse_entry(name, table[name], PARAMETERS[name].kind, functools.partial(_check_value, name))
        else:
            dist = Fixed(PARAMETERS[name].default)
        entries.append((name, dist))
    chosen = dict(entries)
    for name, dist in entries:
        condition = PARAMETERS[name].only_when
        if condition is None or isinstance(dist, Fixed):
            continue
        parent, applies_for = condition
        parent_dist = chosen[parent]
        possible = parent_dist.choices if isinstance(parent_dist, Choice) else (getattr(parent_dist, "value", None),)
        if not set(possible) & set(applies_for):
            raise ValueError(
                f"{name} is searched but applies only when {parent} is {' or '.join(map(str, applies_for))}, "
                f"and {parent} is never that here (got {parent} = {possible[0] if len(possible) == 1 else list(possible)!r})"
            )
    return SearchSpace(entries=tuple(entries))


def grid(space: SearchSpace | ModelSpace) -> dict[str, tuple[Value, ...]]:
    """Every value of every searched hyperparameter, for Optuna's GridSampler; ValueError on a continuous range.

    A conditional hyperparameter is part of the grid even where it does not apply, so such grid
    points repeat a configuration (Optuna's GridSampler has no conditional grids).
    """
    values: dict[str, tuple[Value, ...]] = {}
    for name, dist in space.entries:
        if isinstance(dist, Choice):
            values[name] = dist.choices
        elif isinstance(dist, IntRange):
            values[name] = tuple(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatRange):
            if dist.step is None:
                raise ValueError(
                    f"{name}: a grid search needs choices or a range with a step, "
                    f"got low={dist.low!r} high={dist.high!r} without step"
                )
            # Rounded so that every point lies on the step grid that suggest_float checks.
            count = math.floor((dist.high - dist.low) / dist.step + 1e-9)
            values[name] = tuple(round(dist.low + i * dist.step, 12) for i in range(count + 1))
    return values


def from_params(params: Mapping[str, Value], space: SearchSpace, model_space: ModelSpace | None = None) -> Hyperparameters:
    """Rebuild a trial's configuration from its stored ``trial.params`` (for replay and retraining)."""
    values: dict[str, object] = {name: dist.value for name, dist in space.entries if isinstance(dist, Fixed)}
    values.update({name: params[name] for name in params if name in PARAMETERS})
    model_params: dict[str, Value] = {}
    for name, dist in (model_space.entries if model_space is not None else ()):
        if name in params:
            model_params[name] = params[name]
        elif isinstance(dist, Fixed):
            model_params[name] = dist.value
    return Hyperparameters(**values, model_params=model_params)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSpace:
    """The ``[model.space]`` table: a user model's own hyperparameters, any names, ``[space]``'s syntax."""

    entries: tuple[tuple[str, Distribution], ...] = ()

    def probe(self) -> dict[str, Value]:
        """One configuration to try the builder with before anything is stored: fixed values, first choices, lows."""
        values: dict[str, Value] = {}
        for name, dist in self.entries:
            values[name] = (
                dist.value if isinstance(dist, Fixed) else dist.choices[0] if isinstance(dist, Choice) else dist.low
            )
        return values


def _free_kind(name: str, raw: object) -> type:
    """The type of an undeclared hyperparameter, from how the study file writes it: 3, 0.5, "relu", true."""
    if isinstance(raw, list):
        raise ValueError(f"{name}: write choices as {{ choices = {raw!r} }}, got a bare list")
    if isinstance(raw, dict):
        values = raw.get("choices") if "choices" in raw else [raw.get("low"), raw.get("high")]
        values = values if isinstance(values, list) else []
    else:
        values = [raw]
    kinds = {bool if isinstance(v, bool) else type(v) for v in values}
    if kinds == {int, float}:
        return float
    if len(kinds) == 1 and kinds <= {bool, int, float, str}:
        return kinds.pop()
    raise ValueError(f"{name}: values must all be integers, numbers, strings or true/false, got {raw!r}")


def _free_check(name: str, kind: type, value: object) -> Value:
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r} ({_type_name(value)})")
    if kind is float:
        value = float(value)  # type: ignore[arg-type]
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    return value  # type: ignore[return-value]


def parse_model_space(table: Mapping[str, Any]) -> ModelSpace:
    """Validate ``[model.space]``; raise ValueError naming the key.  Names are the builder's keyword arguments."""
    entries = []
    for name, raw in table.items():
        if name in PARAMETERS:
            raise ValueError(f"{name} is hpo's own hyperparameter: set it in [space], not [model.space]")
        if not name.isidentifier() or name == "model_params":
            raise ValueError(f"{name!r} is not a Python keyword-argument name")
        kind = _free_kind(name, raw)
        entries.append((name, _parse_entry(name, raw, kind, functools.partial(_free_check, name, kind))))
    return ModelSpace(entries=tuple(entries))
