"""Side-by-side speed of hpo's training pipeline, in one run, with ratios.

Mode ``pipeline`` trains the same CNN with the same batch size and epochs through
  (a) hpo's pipeline: data on the device once, per-image crop+flip and normalization batched on the
      device, bf16 autocast and channels_last on CUDA, one host read per epoch (hpo.training.fit.fit), and
  (b) the common way: a torchvision-style Dataset over the same uint8 arrays with RandomCrop(32,
      padding=4), RandomHorizontalFlip, ToTensor and Normalize behind a DataLoader (num_workers,
      pin_memory), fp32, ``loss.item()`` every step,
and prints training images/s of both and their ratio, peak GPU memory and validation accuracy.
With ``--compile`` it adds (a) under torch.compile, with the compile time it costs.

Mode ``workers`` runs a short study with K = 1, 2, 4 worker processes per GPU (``--workers-per-gpu``)
and prints finished trials per hour for each, and the ratio to K = 1.

Mode ``finetune`` trains a ``torchvision:<arch>`` model (``--arch``, random weights: speed does not
depend on them) through hpo's pipeline at each of ``--sizes`` px on random images, once with every
layer training and once with the backbone frozen (``freeze_epochs``), and prints training images/s and
seconds per epoch of ``--images`` images, and the CPU seconds per epoch this process used (steadier than
wall time on a machine shared with other work; on idle cores, wall time is about CPU time / cores).

    python bench/throughput.py pipeline --data ../shared/data/cifar10-jpg.tar.gz
    python bench/throughput.py workers --data ../shared/data/cifar10-jpg.tar.gz --k 1 2 4 --n-trials 24
    python bench/throughput.py finetune --arch resnet18 --sizes 32 128 --images 512 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpo.studyfile.space import Hyperparameters  # noqa: E402
from hpo.studyfile.spec import DataSection  # noqa: E402
from hpo.training.config import TrainConfig  # noqa: E402
from hpo.training.datasets import load_dataset  # noqa: E402
from hpo.training.fit import fit  # noqa: E402
from hpo.training.models import build_model  # noqa: E402
from hpo.training.splits import SearchData, Split, carve_validation  # noqa: E402

# The CNN both pipelines train: the default cifar configuration's shape.
MODEL = Hyperparameters(lr=2e-3, batch_size=256, kernel_size=3, weight_decay=5e-4, depth=3, base_width=32, optimizer="adamw")


@dataclass(frozen=True)
class Measurement:
    name: str
    images_per_second: float  # training images per second, epochs after the first
    first_epoch_seconds: float  # includes cudnn autotuning, worker start-up, compilation
    val_accuracy: float
    peak_memory_mib: float | None


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_hpo(data: SearchData, device: torch.device, *, epochs: int, compile_model: bool) -> Measurement:
    _reset_memory(device)
    torch.manual_seed(0)
    model = build_model(
        "cnn", MODEL, in_channels=data.image_shape[0], num_classes=data.num_classes, image_size=data.image_shape[1]
    )
    config = TrainConfig(hp=MODEL, max_epochs=epochs, augment=True, seed=0, device=device, compile=compile_model)
    result = fit(model, data.to(device), config)
    later = result.epochs[1:] or result.epochs
    return Measurement(
        name="hpo + torch.compile" if compile_model else "hpo",
        images_per_second=float(np.mean([e.images_per_second for e in later])),
        first_epoch_seconds=result.epochs[0].train_seconds,
        val_accuracy=result.epochs[-1].val_accuracy,
        peak_memory_mib=_peak_memory(device),
    )


class ArrayDataset(torch.utils.data.Dataset):
    """The common way: one PIL image per item, transformed on the CPU by torchvision."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: object) -> None:
        self.images = images.numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = self.images[index]
        # PIL takes a grey image as (H, W), not (H, W, 1).
        return self.transform(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)), int(self.labels[index])


def run_reference(data: SearchData, device: torch.device, *, epochs: int, num_workers: int) -> Measurement:
    from torchvision import transforms

    _reset_memory(device)
    normalize = transforms.Normalize(data.mean, data.std)
    train_set = ArrayDataset(
        data.train.images, data.train.labels,
        transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]),
    )
    val_set = ArrayDataset(data.val.images, data.val.labels, transforms.Compose([transforms.ToTensor(), normalize]))
    loader_args = {"num_workers": num_workers, "pin_memory": device.type == "cuda", "persistent_workers": num_workers > 0}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=MODEL.batch_size, shuffle=True, drop_last=True, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=1024, **loader_args)
    torch.manual_seed(0)
    model = build_model(
        "cnn", MODEL, in_channels=data.image_shape[0], num_classes=data.num_classes, image_size=data.image_shape[1]
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL.lr, weight_decay=MODEL.weight_decay)
    rates, first_epoch = [], 0.0
    for epoch in range(epochs):
        model.train()
        start, seen, running_loss = time.perf_counter(), 0, 0.0
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()  # the usual per-step read, which waits for the GPU
            seen += len(labels)
        seconds = time.perf_counter() - start
        if epoch == 0:
            first_epoch = seconds
        if epoch > 0 or epochs == 1:
            rates.append(seen / seconds)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in val_loader:
            correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
    return Measurement(
        name=f"reference (DataLoader, {num_workers} workers)",
        images_per_second=float(np.mean(rates)),
        first_epoch_seconds=first_epoch,
        val_accuracy=correct / len(val_set),
        peak_memory_mib=_peak_memory(device),
    )


def pipeline(args: argparse.Namespace) -> None:
    device = _device(args.device)
    dataset = load_dataset(DataSection(data_dir=args.data))
    data = carve_validation(dataset, DataSection(data_dir=args.data, train_subset=args.images, val_subset=args.val_images))
    workers = args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; {len(data.train)} training / {len(data.val)} validation images; "
          f"batch {MODEL.batch_size}; {args.epochs} epochs; model cnn depth {MODEL.depth} width {MODEL.base_width}")
    results = [run_reference(data, device, epochs=args.epochs, num_workers=workers), run_hpo(data, device, epochs=args.epochs, compile_model=False)]
    if args.compile:
        results.append(run_hpo(data, device, epochs=args.epochs, compile_model=True))
    base = results[0].images_per_second
    print(f"{'pipeline':<34} {'images/s':>10} {'ratio':>7} {'1st epoch s':>12} {'val acc':>8} {'peak MiB':>9}")
    for r in results:
        memory = f"{r.peak_memory_mib:9.0f}" if r.peak_memory_mib is not None else f"{'n/a':>9}"
        print(f"{r.name:<34} {r.images_per_second:10.0f} {r.images_per_second / base:6.2f}x {r.first_epoch_seconds:12.2f} {r.val_accuracy:8.2%} {memory}")


BENCH_STUDY = """
[study]
name = "bench-k{k}"
[data]
data_dir = "{data}"
train_subset = {images}
val_subset = {val_images}
[train]
max_epochs = {epochs}
[sampler]
type = "random"
[pruner]
type = "none"
[space]
lr = {{ low = 1e-3, high = 1e-2, log = true }}
batch_size = {batch_size}
depth = {depth}
base_width = {base_width}
"""


def workers(args: argparse.Namespace) -> None:
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            study = Path(tmp) / f"bench-k{k}.toml"
            study.write_text(BENCH_STUDY.format(
                k=k, data=Path(args.data).resolve().as_posix(), images=args.images, val_images=args.val_images,
                epochs=args.epochs, batch_size=MODEL.batch_size, depth=MODEL.depth, base_width=MODEL.base_width,
            ))
            command = [
                sys.executable, "-m", "hpo.run", "--study", str(study), "--n-trials", str(args.n_trials),
                "--workers-per-gpu", str(k), "--storage", f"sqlite:///{tmp}/k{k}.db", "--quiet",
            ]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"K={k} failed:\n{done.stdout}\n{done.stderr}")
            rates[k] = args.n_trials / seconds * 3600
            print(f"K={k}: {args.n_trials} trials in {seconds:.1f} s (start-up included) = {rates[k]:.0f} trials/hour")
    base = rates[args.k[0]]
    for k, rate in rates.items():
        print(f"K={k}: {rate / base:.2f}x the trials/hour of K={args.k[0]}")


def finetune(args: argparse.Namespace) -> None:
    device = _device(args.device)
    classes, batch_size = 10, 64
    print(f"device: {device}; torch {torch.__version__}; torchvision:{args.arch}; {args.images} random images; "
          f"batch {batch_size}; {args.epochs} epochs, images/s of all but the first")
    for size in args.sizes:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.images, size, size, 3), dtype=torch.uint8, generator=generator)
        split = Split(images=images, labels=torch.arange(args.images) % classes)
        data = SearchData(
            train=split, val=split, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=classes,
            image_shape=(3, size, size),
        ).to(device)
        for frozen in (False, True):
            hp = Hyperparameters(lr=1e-3, batch_size=batch_size, optimizer="sgd", freeze_epochs=args.epochs if frozen else 0)
            torch.manual_seed(0)
            model = build_model(f"torchvision:{args.arch}", hp, in_channels=3, num_classes=classes, image_size=size)
            config = TrainConfig(hp=hp, max_epochs=args.epochs, augment=True, seed=0, device=device)
            cpu_marks: list[float] = []  # process CPU seconds at the end of each epoch (evaluation skipped)
            result = fit(model, data, config, lambda _: cpu_marks.append(time.process_time()), evaluate_each_epoch=False)
            rate = float(np.mean([e.images_per_second for e in result.epochs[1:]]))
            cpu = (cpu_marks[-1] - cpu_marks[0]) / (len(cpu_marks) - 1)
            what = "backbone frozen" if frozen else "every layer"
            print(f"{size:>4} px {what:<16} {rate:8.0f} images/s {args.images / rate:8.1f} s per epoch of {args.images} images"
                  f" {cpu:8.1f} CPU-s per epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["pipeline", "workers", "finetune"])
    parser.add_argument("--data", default=os.environ.get("HPO_DATA_ARCHIVE", str(ROOT.parent / "shared/data/cifar10-jpg.tar.gz")))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=45000, help="training images (a random subset)")
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs; images/s averages all but the first")
    parser.add_argument("--num-workers", type=int, help="reference DataLoader workers (default: cores, at most 8)")
    parser.add_argument("--compile", action="store_true", help="also time hpo's pipeline under torch.compile")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="workers per GPU to compare")
    parser.add_argument("--n-trials", type=int, default=24, help="trials per K in workers mode")
    parser.add_argument("--arch", default="resnet18", help="torchvision model in finetune mode")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="image sides in px in finetune mode")
    args = parser.parse_args()
    {"pipeline": pipeline, "workers": workers, "finetune": finetune}[args.mode](args)


if __name__ == "__main__":
    main()
