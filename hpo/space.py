"""The search space: what a study file may tune, how each entry is sampled, and the typed result.

Every hyperparameter has one name, used unchanged in the study file's ``[space]`` table, in
``trial.params`` (and so in optuna-dashboard and the report) and as a field of
:class:`Hyperparameters`.  An entry in ``[space]`` is either a fixed value or a distribution:

    lr = { low = 1e-4, high = 1e-1, log = true }      # float range
    depth = { low = 2, high = 4 }                      # int range (step defaults to 1)
    batch_size = { choices = [64, 128, 256] }          # categorical
    optimizer = "adamw"                                # fixed: not searched

A hyperparameter missing from ``[space]`` keeps its default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import optuna

Value = Union[int, float, str, bool]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
POOLS = ("max", "avg", "none")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "elu", "tanh", "sigmoid")
INITS = ("default", "kaiming", "xavier")
SCHEDULES = ("none", "step", "cosine", "onecycle")
LR_SCALINGS = ("none", "linear")
CLASS_WEIGHTINGS = ("none", "balanced")
# The hyperparameters that shape the configurable CNN; the fixed architectures ignore them.
CNN_ONLY = (
    "kernel_size", "depth", "base_width", "dropout", "stride", "pool", "batch_norm", "activation",
    "conv_dropout", "dense_width",
)


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
class Hyperparameters:
    """One trial's configuration: everything that the model and the optimizer are built from."""

    lr: float = 1e-3
    batch_size: int = 128
    kernel_size: int = 3
    weight_decay: float = 0.0
    depth: int = 3
    base_width: int = 16
    dropout: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    # Architecture of the configurable CNN (see hpo.models.conv_net).
    stride: int = 1
    pool: str = "max"
    batch_norm: bool = True
    activation: str = "relu"
    conv_dropout: float = 0.0
    dense_width: int = 0
    init: str = "default"
    # Optimization.
    nesterov: bool = True
    schedule: str = "none"
    step_size: int = 5
    gamma: float = 0.1
    warmup_fraction: float = 0.3
    lr_scaling: str = "none"
    reference_batch_size: int = 128
    l1: float = 0.0
    label_smoothing: float = 0.0
    class_weighting: str = "none"
    # Augmentation strength (when [train] augment is on): zero padding in pixels of the random crop.
    crop_padding: int = 4
    flip: bool = True

    def scaled_lr(self) -> float:
        """The learning rate the optimizer gets: ``lr`` times batch_size / reference_batch_size when linear scaling is on."""
        if self.lr_scaling == "linear":
            return self.lr * self.batch_size / self.reference_batch_size
        return self.lr


def _positive(value: Value) -> str | None:
    return None if value > 0 else "must be > 0"  # type: ignore[operator]


def _non_negative(value: Value) -> str | None:
    return None if value >= 0 else "must be >= 0"  # type: ignore[operator]


def _fraction(value: Value) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"  # type: ignore[operator]


def _odd_kernel(value: Value) -> str | None:
    # Odd sizes only: padding = k // 2 then keeps the spatial size exactly.
    return None if value in (1, 3, 5, 7, 9, 11) else "must be an odd size from 1 to 11"


def _depth(value: Value) -> str | None:
    # Each block halves the spatial size; 5 blocks take 32 px down to 1 px.
    return None if 1 <= value <= 5 else "must be from 1 to 5"  # type: ignore[operator]


def _one_of(*allowed: str) -> Callable[[Value], str | None]:
    def check(value: Value) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _any(value: Value) -> str | None:
    return None


def _stride(value: Value) -> str | None:
    return None if value in (1, 2) else "must be 1 or 2"


def _open_fraction(value: Value) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"  # type: ignore[operator]


def _gamma(value: Value) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"  # type: ignore[operator]


def _crop_padding(value: Value) -> str | None:
    return None if 0 <= value <= 16 else "must be from 0 to 16"  # type: ignore[operator]


@dataclass(frozen=True)
class Parameter:
    """What the study file may say about one hyperparameter."""

    kind: type
    check: Callable[[Value], str | None]
    help: str
    # Sampled only when another hyperparameter has one of these values (conditional space).
    only_when: tuple[str, tuple[Value, ...]] | None = None


PARAMETERS: Mapping[str, Parameter] = {
    "lr": Parameter(float, _positive, "learning rate"),
    "batch_size": Parameter(int, _positive, "images per optimizer step"),
    "kernel_size": Parameter(int, _odd_kernel, "conv kernel width; padding keeps the size"),
    "weight_decay": Parameter(float, _non_negative, "L2 penalty (decoupled for AdamW)"),
    "depth": Parameter(int, _depth, "conv blocks; channels double per block"),
    "base_width": Parameter(int, _positive, "channels of the first conv block"),
    "dropout": Parameter(float, _fraction, "dropout before the classifier"),
    "optimizer": Parameter(str, _one_of(*OPTIMIZERS), "sgd, adam, adamw or rmsprop"),
    "momentum": Parameter(
        float, _fraction, "momentum of sgd and rmsprop", only_when=("optimizer", ("sgd", "rmsprop"))
    ),
    "stride": Parameter(int, _stride, "stride of every conv"),
    "pool": Parameter(str, _one_of(*POOLS), "2x2 pool after every conv block"),
    "batch_norm": Parameter(bool, _any, "BatchNorm after every conv"),
    "activation": Parameter(str, _one_of(*ACTIVATIONS), "nonlinearity of the CNN"),
    "conv_dropout": Parameter(float, _fraction, "channel dropout after every conv block"),
    "dense_width": Parameter(int, _non_negative, "hidden dense layer before the classifier (0: none)"),
    "init": Parameter(str, _one_of(*INITS), "weight initialization of conv and linear layers"),
    "nesterov": Parameter(bool, _any, "Nesterov momentum for sgd", only_when=("optimizer", ("sgd",))),
    "schedule": Parameter(str, _one_of(*SCHEDULES), "learning-rate schedule"),
    "step_size": Parameter(int, _positive, "epochs between StepLR decays", only_when=("schedule", ("step",))),
    "gamma": Parameter(float, _gamma, "StepLR decay factor", only_when=("schedule", ("step",))),
    "warmup_fraction": Parameter(
        float, _open_fraction, "one-cycle: share of the steps spent warming up", only_when=("schedule", ("onecycle",))
    ),
    "lr_scaling": Parameter(str, _one_of(*LR_SCALINGS), "linear: lr grows with batch_size / reference_batch_size"),
    "reference_batch_size": Parameter(
        int, _positive, "batch size at which lr applies unscaled", only_when=("lr_scaling", ("linear",))
    ),
    "l1": Parameter(float, _non_negative, "L1 penalty on conv and linear weights"),
    "label_smoothing": Parameter(float, _fraction, "label smoothing of the training loss"),
    "class_weighting": Parameter(str, _one_of(*CLASS_WEIGHTINGS), "balanced: loss weights inverse to class frequency"),
    "crop_padding": Parameter(int, _crop_padding, "zero padding of the random crop, pixels (0: no crop)"),
    "flip": Parameter(bool, _any, "random horizontal flip"),
}
assert tuple(PARAMETERS) == tuple(f.name for f in dataclasses.fields(Hyperparameters))


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
    problem = param.check(value)  # type: ignore[arg-type]
    if problem:
        raise ValueError(f"{name} {problem}, got {value!r}")
    return value  # type: ignore[return-value]


_RANGE_KEYS = {"low", "high", "log", "step"}


def _parse_entry(name: str, raw: object) -> Distribution:
    param = PARAMETERS[name]
    if not isinstance(raw, dict):
        if isinstance(raw, list):
            raise ValueError(f"{name}: write choices as {{ choices = {raw!r} }}, got a bare list")
        return Fixed(_check_value(name, raw))
    keys = set(raw)
    if "choices" in keys:
        if keys != {"choices"}:
            extra = ", ".join(sorted(keys - {"choices"}))
            raise ValueError(f"{name}: 'choices' cannot be combined with {extra}")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{name}: choices must be a non-empty list, got {choices!r}")
        checked = tuple(_check_value(name, c) for c in choices)
        if len(set(checked)) != len(checked):
            raise ValueError(f"{name}: choices repeat a value, got {choices!r}")
        return Choice(checked)
    unknown = keys - _RANGE_KEYS
    if unknown:
        raise ValueError(
            f"{name}: unknown key {', '.join(sorted(unknown))!s}; "
            "expected low, high, log, step or choices"
        )
    if param.kind in (str, bool):
        raise ValueError(f"{name} is categorical: use {{ choices = [...] }}, got a range")
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"{name}: a range needs both low and high, got {raw!r}")
    low, high = _check_value(name, raw["low"]), _check_value(name, raw["high"])
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
        if log and (param.kind is float or step != 1):
            raise ValueError(f"{name}: step cannot be combined with log = true")
    if param.kind is int:
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
            dist = _parse_entry(name, table[name])
        else:
            dist = Fixed(getattr(Hyperparameters(), name))
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


def grid(space: SearchSpace) -> dict[str, tuple[Value, ...]]:
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


def suggest(trial: optuna.Trial, space: SearchSpace) -> Hyperparameters:
    """Sample one configuration; a conditional hyperparameter is sampled only when it applies."""
    values: dict[str, Value] = {}
    for name, dist in space.entries:
        condition = PARAMETERS[name].only_when
        applies = condition is None or values[condition[0]] in condition[1]
        if isinstance(dist, Fixed) or not applies:
            values[name] = dist.value if isinstance(dist, Fixed) else getattr(Hyperparameters(), name)
        elif isinstance(dist, FloatRange):
            values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntRange):
            values[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            values[name] = trial.suggest_categorical(name, dist.choices)  # type: ignore[arg-type]
    return Hyperparameters(**values)  # type: ignore[arg-type]


def from_params(params: Mapping[str, Value], space: SearchSpace) -> Hyperparameters:
    """Rebuild a trial's configuration from its stored ``trial.params`` (for replay and retraining)."""
    values = {name: dist.value for name, dist in space.entries if isinstance(dist, Fixed)}
    values.update({name: params[name] for name in params if name in PARAMETERS})
    return Hyperparameters(**values)  # type: ignore[arg-type]
