"""THE batch pipeline: uint8 images on the device → shuffled, augmented, normalized float batches.

Everything runs on the training device, batched: a step gathers its images by index, crops and
flips them in one gather (``augment``, crop ``pad``), normalizes them in one multiply-add
(``Normalizer``), or, with crop ``resized``, normalizes them first and then crops, resizes and flips
them in one ``grid_sample`` (``resized_crop``), cuts out a square (``cut_out``) and blends with mixup
(``Mixup``).  No step waits on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hpo.studyfile.space import Hyperparameters
from hpo.training.config import TrainConfig
from hpo.training.splits import Split

# A training loss: (logits, labels) → scalar.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Normalizer:
    """uint8 NHWC batches → float NCHW (channels_last memory) with zero mean and unit variance."""

    def __init__(self, *, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        # Folded into one multiply-add per pixel: x * scale + shift, with the 1/255 inside scale.
        std_t = torch.tensor(std, device=device, dtype=torch.float32)
        mean_t = torch.tensor(mean, device=device, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC permuted to NCHW *is* channels_last; the float conversion keeps that layout.
        return images.permute(0, 3, 1, 2).float() * self.scale + self.shift


def augment(images: torch.Tensor, generator: torch.Generator, augmentation: Hyperparameters) -> torch.Tensor:
    """Per-image random crop (zero padding of ``crop_padding`` pixels) and horizontal flip (``flip``), as one gather.

    torchvision's RandomCrop(padding) + RandomHorizontalFlip.  ``images`` is a uint8 (B, H, W, C)
    batch with any number of channels on any device; no host sync happens here.  With crop ``resized``
    it returns the batch as it is: :func:`resized_crop` crops and flips it after normalization.
    """
    if augmentation.crop != "pad" or (augmentation.crop_padding == 0 and not augmentation.flip):
        return images
    batch, height, width, _ = images.shape
    device = images.device
    pad = augmentation.crop_padding
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # pads W and H of NHWC with zeros
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand((batch, 1), device=device, generator=generator) < (0.5 if augmentation.flip else 0.0)
    rows = dy + torch.arange(height, device=device)
    cols_forward = torch.arange(width, device=device)
    cols = dx + torch.where(flip, width - 1 - cols_forward, cols_forward)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


# RandomResizedCrop's range of box aspect ratios (width / height), and its tries per image before it falls
# back to a centre crop.
ASPECT_RATIOS = (3 / 4, 4 / 3)
_TRIES = 10


@dataclass(frozen=True)
class Boxes:
    """One crop box per image of a batch, in whole pixels: rows top..top+height-1, columns left..left+width-1."""

    top: torch.Tensor  # int64 (B,), on the batch's device
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def _fallback_box(height: int, width: int) -> tuple[int, int]:
    """(h, w) of torchvision's fallback: the whole image, its aspect ratio clamped into ASPECT_RATIOS (centred)."""
    low, high = ASPECT_RATIOS
    if width / height < low:
        return round(width / low), width
    if width / height > high:
        return height, round(height * high)
    return height, width


def random_boxes(
    batch: int, height: int, width: int, generator: torch.Generator, *, scale: float, device: torch.device
) -> Boxes:
    """RandomResizedCrop's boxes for a ``height`` x ``width`` image, one per image, drawn on ``device``.

    Per image, up to 10 tries of an area share uniform in [scale, 1] and an aspect ratio log-uniform
    in [3/4, 4/3]; the first try that fits inside the image is kept, at a uniform position; an image
    whose 10 tries all overflow gets torchvision's centred fallback.  All tries are drawn at once: no host sync.
    """
    shape = (batch, _TRIES)
    share = scale + (1 - scale) * torch.rand(shape, device=device, generator=generator)
    log_low, log_high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    ratio = torch.exp(log_low + (log_high - log_low) * torch.rand(shape, device=device, generator=generator))
    area = height * width * share
    tried_w, tried_h = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
    fits = (tried_w >= 1) & (tried_w <= width) & (tried_h >= 1) & (tried_h <= height)
    tries = torch.arange(_TRIES, device=device).expand(shape)
    first = torch.where(fits, tries, _TRIES).min(1, keepdim=True).values.clamp(max=_TRIES - 1)
    found = fits.any(1)
    fallback_h, fallback_w = _fallback_box(height, width)
    w = torch.where(found, tried_w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, tried_h.gather(1, first).squeeze(1), fallback_h)
    where = torch.rand((batch, 2), device=device, generator=generator)  # uniform positions, as randint draws them
    top = torch.where(found, (where[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (where[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return Boxes(top=top, left=left, height=h, width=w)


def crop_boxes(inputs: torch.Tensor, boxes: Boxes, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box resized back to the image's size (bilinear) and mirrored where ``flip``, in one grid_sample.

    ``inputs`` is a float (B, C, H, W) batch.  The affine map sends the output's edges to the box's
    edges (align_corners=False), as cropping then resizing does; samples within half an output pixel
    of the box's edge read the pixels just outside it (torchvision clamps to the box there), and
    ``border`` padding covers the image's edge.  Returns channels_last, as the Normalizer does.
    """
    batch, channels, height, width = inputs.shape
    theta = torch.zeros((batch, 2, 3), device=inputs.device, dtype=inputs.dtype)
    x_scale = boxes.width.to(inputs.dtype) / width
    theta[:, 0, 0] = torch.where(flip, -x_scale, x_scale)
    theta[:, 0, 2] = (2 * boxes.left + boxes.width).to(inputs.dtype) / width - 1  # the box's centre, in [-1, 1]
    theta[:, 1, 1] = boxes.height.to(inputs.dtype) / height
    theta[:, 1, 2] = (2 * boxes.top + boxes.height).to(inputs.dtype) / height - 1
    grid = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def resized_crop(inputs: torch.Tensor, generator: torch.Generator, augmentation: Hyperparameters) -> torch.Tensor:
    """torchvision's RandomResizedCrop(scale=(crop_scale, 1)) + RandomHorizontalFlip on a normalized float batch.

    After normalization rather than on uint8: interpolation needs floats anyway, and since the
    normalization is affine per channel and bilinear weights sum to 1, the two orders give the same
    values, without a round trip through uint8.
    """
    batch, _, height, width = inputs.shape
    boxes = random_boxes(batch, height, width, generator, scale=augmentation.crop_scale, device=inputs.device)
    flip = torch.rand(batch, device=inputs.device, generator=generator) < (0.5 if augmentation.flip else 0.0)
    return crop_boxes(inputs, boxes, flip)


def cut_out(inputs: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per image of a normalized float (B, C, H, W) batch (zero is the mean).

    The square's centre is uniform over the image, and the square is clipped at the edges, as in
    DeVries and Taylor's cutout; one multiply, no host sync.
    """
    batch, _, height, width = inputs.shape
    device = inputs.device
    cy = torch.randint(0, height, (batch, 1, 1), device=device, generator=generator)
    cx = torch.randint(0, width, (batch, 1, 1), device=device, generator=generator)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return inputs * (~inside)[:, None].to(inputs.dtype)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``n`` images: full batches only, but at least one."""
    return max(1, n // batch_size)


def train_batches(
    split: Split, *, batch_size: int, generator: torch.Generator, augmentation: Hyperparameters | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled uint8 batches; the last partial batch is dropped (BatchNorm needs > 1)."""
    n = len(split)
    order = torch.randperm(n, device=split.labels.device, generator=generator)
    for step in range(steps_per_epoch(n, batch_size)):
        index = order[step * batch_size : (step + 1) * batch_size]
        images = split.images[index]
        if augmentation is not None:
            images = augment(images, generator, augmentation)
        yield images, split.labels[index]


def eval_batches(split: Split, *, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]



def make_augmentation(config: TrainConfig) -> Hyperparameters | None:
    """What augments the training batches: the trial's crop, crop_padding, crop_scale, flip, cutout and mixup_alpha, or nothing."""
    return config.hp if config.augment else None


class Mixup:
    """mixup (Zhang et al., 2018): a batch becomes lam x itself + (1 - lam) x a shuffled copy, and so does its loss.

    lam ~ Beta(alpha, alpha) is drawn on the host from a generator keyed by (seed, epoch), so a
    resumed fit blends exactly as an uninterrupted one and no step waits on the device; the
    shuffle uses the training generator, on the device.
    """

    def __init__(self, alpha: float, *, seed: int, epoch: int) -> None:
        self.alpha = alpha
        self.draws = np.random.default_rng((seed, epoch))

    def blend(self, batch: Batch, generator: torch.Generator) -> Batch:
        lam = float(self.draws.beta(self.alpha, self.alpha))
        partner = torch.randperm(batch.labels.shape[0], device=batch.labels.device, generator=generator)
        inputs = lam * batch.inputs + (1 - lam) * batch.inputs[partner]
        return Batch(inputs=inputs, labels=batch.labels, partner_labels=batch.labels[partner], lam=lam)


@dataclass(frozen=True)
class Batch:
    """One training step's input, normalized and augmented, and how its loss is taken."""

    inputs: torch.Tensor  # float (B, C, H, W), channels_last
    labels: torch.Tensor
    # mixup: the labels of the images blended in, with weight 1 - lam; None without mixup.
    partner_labels: torch.Tensor | None = None
    lam: float = 1.0

    def loss(self, criterion: Loss, logits: torch.Tensor) -> torch.Tensor:
        value = criterion(logits, self.labels)
        if self.partner_labels is None:
            return value
        return self.lam * value + (1 - self.lam) * criterion(logits, self.partner_labels)


def training_batches(
    split: Split, config: TrainConfig, *, generator: torch.Generator, normalize: Normalizer, epoch: int
) -> Iterator[Batch]:
    """One epoch of shuffled batches with the trial's augmentation: crop and flip (padded or resized), cutout, mixup."""
    augmentation = make_augmentation(config)
    mixup = None
    if augmentation is not None and augmentation.mixup_alpha > 0:
        mixup = Mixup(augmentation.mixup_alpha, seed=config.seed, epoch=epoch)
    for images, labels in train_batches(
        split, batch_size=config.hp.batch_size, generator=generator, augmentation=augmentation
    ):
        batch = Batch(inputs=normalize(images), labels=labels)
        if augmentation is not None and augmentation.crop == "resized":
            batch = Batch(inputs=resized_crop(batch.inputs, generator, augmentation), labels=labels)
        if augmentation is not None and augmentation.cutout > 0:
            batch = Batch(inputs=cut_out(batch.inputs, generator, augmentation.cutout), labels=labels)
        yield batch if mixup is None else mixup.blend(batch, generator)

