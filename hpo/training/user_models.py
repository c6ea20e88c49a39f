"""The user's own models: found by import path, entry point or registered name, and tried once before a search.

The builder contract, one for every door::

    def build(in_channels: int, num_classes: int, image_size: int, **params) -> torch.nn.Module

``params`` are the model's own hyperparameters from ``[model.space]``, sampled per trial; the model
takes a float batch (N, in_channels, image_size, image_size), normalized, and returns logits
(N, num_classes).  hpo's training hyperparameters (lr, batch size, optimizer, schedule,
augmentation...) apply as to every model.

The three doors: ``[model] name = "package.module:build"`` (importable from the working directory or
an installed package); a name an installed package lists in the ``hpo.models`` entry-point group;
a name registered in this process with ``@hpo.register_model("mynet")``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping

import torch
from torch import nn

from hpo.errors import SpecError, first_line
from hpo.studyfile import names

UserBuilder = Callable[..., nn.Module]

# Builders registered in this process with @hpo.register_model, by name.
REGISTERED: dict[str, UserBuilder] = {}


def register(name: str, builder: UserBuilder) -> None:
    """Register a user builder under ``name``; registering a name again replaces it (a notebook cell run twice)."""
    names.declare_model(name, f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', builder)!s}")
    REGISTERED[name] = builder


def _import(path: str, where: str) -> object:
    """The object an import path "package.module:attr.attr" names; SpecError saying which part failed."""
    module_name, _, attributes = path.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # "importable from the working directory", as python -m would make it
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the user's module: any error it raises is theirs
        raise SpecError(f"{where} name {path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {first_line(exc)})") from None
    for attribute in attributes.split("."):
        if not hasattr(found, attribute):
            raise SpecError(f"{where} name {path!r}: module {module_name!r} has no attribute {attributes!r}")
        found = getattr(found, attribute)
    return found


def resolve(name: str, where: str) -> UserBuilder:
    """The builder ``name`` names (registered, entry point or import path); SpecError naming ``where`` if none."""
    if name in REGISTERED:
        return REGISTERED[name]
    entry = names.entry_point_models().get(name)
    builder = _import(entry if entry is not None else name, where)
    if not callable(builder):
        raise SpecError(f"{where} name {name!r}: {type(builder).__name__} is not callable; expected a model builder")
    return builder  # type: ignore[return-value]


def build_user_model(
    name: str, params: Mapping[str, object], *, in_channels: int, num_classes: int, image_size: int, where: str = "[model]"
) -> nn.Module:
    builder = resolve(name, where)
    model = builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **params)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{where} name {name!r}: the builder returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_signature(name: str, builder: UserBuilder, params: Mapping[str, object], where: str) -> None:
    """The builder takes the contract's arguments and every [model.space] name (or **kwargs)."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        return  # a builtin or C callable: calling it will tell
    accepted = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    wanted = ["in_channels", "num_classes", "image_size", *params]
    missing = [argument for argument in wanted if argument not in accepted]
    if missing:
        role = "a [model.space] hyperparameter" if missing[0] in params else "part of the builder contract"
        raise SpecError(
            f"{where} name {name!r}: the builder takes no argument {missing[0]!r} ({role}); "
            "expected build(in_channels, num_classes, image_size, **params)"
        )


def check_user_model(
    name: str, params: Mapping[str, object], *, in_channels: int, num_classes: int, image_size: int, where: str
) -> None:
    """Build the model once with ``params`` and run a dummy batch of 2 images: SpecError (one line) on any problem.

    Run before anything is stored, so a broken model never leaves a study behind.
    """
    _check_signature(name, resolve(name, where), params, where)
    try:
        model = build_user_model(
            name, params, in_channels=in_channels, num_classes=num_classes, image_size=image_size, where=where
        )
    except SpecError:
        raise
    except Exception as exc:  # the user's builder: whatever it raises is reported in one line
        raise SpecError(f"{where} name {name!r}: building the model raised {type(exc).__name__}: {first_line(exc)}") from None
    batch = torch.zeros(2, in_channels, image_size, image_size)
    try:
        with torch.no_grad():
            output = model.eval()(batch)
    except Exception as exc:
        raise SpecError(
            f"{where} name {name!r}: the model failed on a batch of 2 images of {in_channels}x{image_size}x{image_size}: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (2, num_classes):
        raise SpecError(
            f"{where} name {name!r}: the model gives {shape} for a batch of 2 images of "
            f"{in_channels}x{image_size}x{image_size}; expected (2, {num_classes}): one logit per class"
        )


def reference(builder: UserBuilder) -> str:
    """The ``[model] name`` for a builder passed from Python: its import path when that imports back to it
    (so hpo.best finds it later), else a name registered in this process (a notebook's function)."""
    module, qualname = getattr(builder, "__module__", None), getattr(builder, "__qualname__", "")
    path = f"{module}:{qualname}"
    if module not in (None, "__main__") and names.IMPORT_PATH.match(path):
        try:
            if _import(path, "[model]") is builder:
                return path
        except SpecError:
            pass
    name = re.sub(r"\W", "_", getattr(builder, "__name__", "model")).strip("_") or "model"
    name = name if name[0].isalpha() else f"model_{name}"
    register(name, builder)
    return name
