"""The torch device a study trains on (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this
machine), and what it can do: the autocast precision chosen from its capabilities."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

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


# Autocast precisions; "fp16" trains with a GradScaler (fp16's exponent range underflows small gradients).
Precision = Literal["bf16", "fp16", "fp32"]

# CUDA compute capability from which a GPU has native bf16 tensor cores: Ampere (A100 8.0, RTX 30xx 8.6) and
# later.  Before it (V100 7.0, T4 7.5) bf16 runs emulated, slower than fp32, while fp16 has tensor cores.
BF16_CUDA_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Capabilities:
    """What the precision is chosen from: the device type and what it does natively."""

    type: str  # "cuda", "cpu" or "mps"
    cuda_capability: tuple[int, int] | None = None  # (major, minor) of a CUDA GPU, e.g. (7, 5) for a T4
    cpu_bf16: bool = False  # a CPU with native bf16 (AVX-512 BF16 or AMX)


def _cpu_has_bf16() -> bool:
    try:  # private, but the check PyTorch itself uses; absent on some builds
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def capabilities(device: torch.device) -> Capabilities:
    """This machine's capabilities for ``device``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Capabilities(type="cuda", cuda_capability=(major, minor))
    if device.type == "cpu":
        return Capabilities(type="cpu", cpu_bf16=_cpu_has_bf16())
    return Capabilities(type=device.type)


def choose_precision(requested: str, capabilities: Capabilities) -> Precision:
    """The autocast precision ``requested`` ("auto", "bf16", "fp16", "fp32") means on a device with ``capabilities``.

    "auto": bf16 where the device has it natively (CUDA compute capability 8.0 and up; CPUs with AVX-512 BF16 or
    AMX, where a training step of the default CNN ran 2.1x faster than in fp32 on the 2-core development CPU),
    fp16 with gradient scaling on older CUDA GPUs, fp32 elsewhere (other CPUs, MPS).  Any other value is taken
    as asked.
    """
    if requested != "auto":
        return typing.cast(Precision, requested)
    if capabilities.type == "cuda":
        native = capabilities.cuda_capability is not None and capabilities.cuda_capability >= BF16_CUDA_CAPABILITY
        return "bf16" if native else "fp16"
    if capabilities.type == "cpu" and capabilities.cpu_bf16:
        return "bf16"
    return "fp32"


def precision_for(requested: str, device: torch.device) -> Precision:
    """The precision ``requested`` means on ``device`` of this machine: :func:`choose_precision`."""
    return choose_precision(requested, capabilities(device))

