"""The torch device a study trains on: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpo.errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(requested: str, source: str) -> torch.device:
    """The device ``requested`` names (auto: CUDA when there is one); UsageError naming ``source`` if absent here."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{source}: device {requested!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{source}: device {requested!r} does not exist ({torch.cuda.device_count()} GPUs)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{source}: device {requested!r} asked for, but MPS is not available here")
    return device
