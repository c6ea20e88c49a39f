"""Will the dataset fit?  An estimate of its host and device memory, checked before anything is decoded.

A search holds its images as uint8 (N, S, S, C) tensors.  For a dataset of N images (train and test
together), N_s of them in the search's training and validation parts, at side S with C channels:

* host memory, per process that loads the dataset:
  N x S x S x 3 (the decoded images: an image folder decodes every file as RGB straight into one
  preallocated array, the cache; a resized or converted dataset gets one new array at C channels)
  + N_s x S x S x C (``carve_validation``'s copy of the training and validation parts: it stays on
  the host when the device is the CPU, and on CUDA it is the copy that goes to the device)
  + ``WORKING_BYTES`` (the chunked float copies of resizing, channel conversion and statistics, and
  one decoded photo);
* device memory, CUDA only, per process on that device: N_s x S x S x C (the parts moved there once).

It must fit in ``HOST_SHARE`` of the host's available memory (Linux ``MemAvailable``) and in
``DEVICE_SHARE`` of the device's free memory; the rest is left for Python, torch, the model, its
activations and optimizer state.  When it does not fit, a DataError says so in one line, with the
largest ``[data] image_size`` that would fit.  :func:`available_host_bytes` and
:func:`free_device_bytes` are module functions so that tests can pretend a small machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hpo.errors import DataError
from hpo.studyfile.spec import DataSection

GIB = 2**30

# Share of MemAvailable the data may take: the rest is for the interpreter, torch (about 1 GiB with its
# libraries), the model and the page cache of the files being read.
HOST_SHARE = 0.8
# Share of a CUDA device's free memory the data may take: the rest is for the model's weights, its
# activations at the largest batch size and the optimizer state (a trial that still runs out of memory
# ends as FAIL with fail_reason cuda_oom, and the search goes on).
DEVICE_SHARE = 0.75
# Bytes of working copies beside the data: float chunks of resizing, conversion and statistics
# (hpo.training.datasets sizes its chunks to this), and the one photo being decoded.
WORKING_BYTES = 256 * 2**20
# The smallest [data] image_size a study file may give (hpo.studyfile.spec.DataSection).
SMALLEST_SIZE = 8


@dataclass(frozen=True)
class Placement:
    """Where the loaded data will live: on which devices, and how many processes each hold a copy."""

    devices: tuple[torch.device, ...] = ()  # training devices; CUDA ones are checked against their free memory
    processes: int = 1  # processes on this machine that each load the dataset (launched workers)
    per_device: int = 1  # processes that each hold the search's parts on one device (--workers-per-gpu)


# One process, data on the host (or a device that says nothing of its memory): what a bare load_dataset assumes.
HOST_ONLY = Placement()


@dataclass(frozen=True)
class Footprint:
    """What loading a dataset will allocate, in images, before it is allocated."""

    new_images: int  # images decoded, resized or converted into new arrays (0: used as they are in memory)
    new_channels: int  # channels of those new arrays (3 for an image folder's RGB decode)
    searched: int  # images of the search's training and validation parts (carve_validation copies them)
    channels: int  # channels of the data the search trains on
    image_size: int  # side in pixels

    def host_bytes(self, size: int | None = None) -> int:
        side = size or self.image_size
        return side * side * (self.new_images * self.new_channels + self.searched * self.channels) + WORKING_BYTES

    def device_bytes(self, size: int | None = None) -> int:
        side = size or self.image_size
        return side * side * self.searched * self.channels


def searched_images(train: int, section: DataSection) -> int:
    """Images in the training and validation parts that ``carve_validation`` makes of ``train`` training images."""
    val = min(train, max(1, round(train * section.val_fraction)))
    rest = train - val
    if section.train_subset is not None:
        rest = min(rest, section.train_subset)
    if section.val_subset is not None:
        val = min(val, section.val_subset)
    return rest + val


def available_host_bytes() -> int | None:
    """Linux's estimate of the memory that can be allocated without swapping (MemAvailable); None elsewhere."""
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file says kB, and means KiB
    return None


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device; None for the CPU and MPS, whose memory is the host's."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _largest_fitting(bytes_at: Callable[[int], int], budget: float, below: int) -> int | None:
    """The largest side in [SMALLEST_SIZE, below) whose estimate fits ``budget``, or None."""
    for size in range(below - 1, SMALLEST_SIZE - 1, -1):
        if bytes_at(size) <= budget:
            return size
    return None


def _advice(fitting: int | None) -> str:
    if fitting is None:
        return f"not even [data] image_size = {SMALLEST_SIZE} would fit: use fewer images (train_subset, val_subset)"
    return f"[data] image_size = {fitting} would fit"


def check_memory(footprint: Footprint, placement: Placement, *, what: str) -> None:
    """Raise DataError when ``footprint`` will not fit this machine's memory or its devices'; ``what`` names
    the data in the message ("data_dir: 60000 images in /data/photos.tar.gz")."""
    host = available_host_bytes()
    size = footprint.image_size
    if host is not None:
        def host_bytes(side: int) -> int:
            return placement.processes * footprint.host_bytes(side)

        budget = HOST_SHARE * host
        if host_bytes(size) > budget:
            copies = f" ({placement.processes} worker processes each holding a copy)" if placement.processes > 1 else ""
            raise DataError(
                f"{what} at image_size = {size} need about {host_bytes(size) / GIB:.1f} GiB of host memory{copies}, "
                f"more than {HOST_SHARE:.0%} of the {host / GIB:.1f} GiB available; "
                + _advice(_largest_fitting(host_bytes, budget, size))
            )
    _check_devices(footprint, placement, what=what)


def _check_devices(footprint: Footprint, placement: Placement, *, what: str) -> None:
    size = footprint.image_size

    def device_bytes(side: int) -> int:
        return placement.per_device * footprint.device_bytes(side)

    for device in _distinct(placement.devices):
        free = free_device_bytes(device)
        if free is None or device_bytes(size) <= DEVICE_SHARE * free:
            continue
        copies = f" ({placement.per_device} workers each holding a copy)" if placement.per_device > 1 else ""
        raise DataError(
            f"{what} at image_size = {size} need about {device_bytes(size) / GIB:.1f} GiB on {device} for the "
            f"training and validation parts{copies}, more than {DEVICE_SHARE:.0%} of its {free / GIB:.1f} GiB free; "
            + _advice(_largest_fitting(device_bytes, DEVICE_SHARE * free, size))
        )


def _distinct(devices: Sequence[torch.device]) -> list[torch.device]:
    return list(dict.fromkeys(devices))
