"""What a model costs, whatever its weights: parameters, multiply-accumulates and inference latency.

These are the objectives ``params``, ``macs`` and ``latency_ms`` of a multi-objective study
(hpo.studyfile.spec.OBJECTIVES).  Training does not change them, so a trial measures them before its
first epoch, and one over a constraint is recorded infeasible without training.  Measuring works on a
copy of the model and feeds it zeros: the trial's model, and the random state its training draws
from, are left as they were, so a trial trains the same whether or not it measured.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hpo.training.models import count_parameters

# Forward passes timed for latency_ms (the median is kept), after as many untimed warm-up passes: the
# first passes pay for allocation, cuDNN's algorithm search and lazy initialization.
LATENCY_RUNS = 15
LATENCY_WARMUP = 5
# Images per timed forward pass: one, as a deployed classifier sees them; a trial's training batch_size
# would make latency a function of a training hyperparameter.
LATENCY_BATCH = 1


@contextmanager
def _inference_copy(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """A copy of ``model`` on ``device`` (channels-last, as training lays it out), in eval mode, without autograd."""
    twin = copy.deepcopy(model).to(device=device, memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            yield twin
    finally:
        del twin
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _zeros(image_shape: tuple[int, int, int], device: torch.device, batch: int = 1) -> torch.Tensor:
    # Zeros, not random images: no draw from torch's random state, which the trial's training uses.
    return torch.zeros((batch, *image_shape), device=device).contiguous(memory_format=torch.channels_last)


def count_macs(model: nn.Module, image_shape: tuple[int, int, int], device: torch.device | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image: torch's FLOP counter (convolutions and
    matrix products) halved; additions of biases, normalization and activations are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    device = device or torch.device("cpu")
    with _inference_copy(model, device) as twin:
        counter = FlopCounterMode(display=False)
        with counter:
            twin(_zeros(image_shape, device))
    return int(counter.get_total_flops()) // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(
    model: nn.Module, image_shape: tuple[int, int, int], device: torch.device, *, runs: int = LATENCY_RUNS,
    warmup: int = LATENCY_WARMUP,
) -> float:
    """Median milliseconds of one forward pass of ``LATENCY_BATCH`` image(s) on ``device``, in fp32, after
    ``warmup`` untimed passes; on CUDA each pass is timed to its end (synchronized)."""
    with _inference_copy(model, device) as twin:
        images = _zeros(image_shape, device, LATENCY_BATCH)
        for _ in range(warmup):
            twin(images)
        times = []
        for _ in range(runs):
            _sync(device)
            start = time.perf_counter()
            twin(images)
            _sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure_costs(
    model: nn.Module, names: Collection[str], *, image_shape: tuple[int, int, int], device: torch.device
) -> dict[str, float]:
    """The costs named in ``names`` (of "params", "macs", "latency_ms"; others are ignored), by name."""
    costs: dict[str, float] = {}
    if "params" in names:
        costs["params"] = count_parameters(model)
    if "macs" in names:
        costs["macs"] = count_macs(model, image_shape, device)
    if "latency_ms" in names:
        costs["latency_ms"] = latency_ms(model, image_shape, device)
    return costs
