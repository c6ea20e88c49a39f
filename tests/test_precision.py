"""The autocast precision ``[train] precision = "auto"`` means on a device, chosen from what the device does natively.

The choice is a pure function of the device's capabilities, so the GPUs this machine lacks are fed in by their
compute capability; ``fit`` is run on the CPU in each precision (CPU autocast has fp16 too), which exercises the
gradient scaling fp16 needs.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hpo
from hpo.studyfile.space import Hyperparameters
from hpo.training.config import TrainConfig
from hpo.training.device import Capabilities, capabilities, choose_precision, precision_for
from hpo.training.fit import fit, load_checkpoint
from hpo.training.models import build_model
from hpo.training.splits import SearchData, Split

# (device, its capabilities, what "auto" must choose): CUDA compute capabilities as NVIDIA lists them.
KNOWN_DEVICES = [
    ("V100", Capabilities(type="cuda", cuda_capability=(7, 0)), "fp16"),
    ("T4", Capabilities(type="cuda", cuda_capability=(7, 5)), "fp16"),
    ("A100", Capabilities(type="cuda", cuda_capability=(8, 0)), "bf16"),
    ("RTX 3090", Capabilities(type="cuda", cuda_capability=(8, 6)), "bf16"),
    ("H100", Capabilities(type="cuda", cuda_capability=(9, 0)), "bf16"),
    ("CPU with AVX-512 BF16 or AMX", Capabilities(type="cpu", cpu_bf16=True), "bf16"),
    ("CPU without native bf16", Capabilities(type="cpu", cpu_bf16=False), "fp32"),
    ("Apple GPU (MPS)", Capabilities(type="mps"), "fp32"),
]


@pytest.mark.parametrize(("device", "caps", "expected"), KNOWN_DEVICES, ids=[d[0] for d in KNOWN_DEVICES])
def test_auto_is_bf16_where_native_fp16_on_older_gpus_and_fp32_elsewhere(
    device: str, caps: Capabilities, expected: str
) -> None:
    assert choose_precision("auto", caps) == expected


@pytest.mark.parametrize("requested", ["bf16", "fp16", "fp32"])
def test_a_precision_named_in_the_study_file_is_taken_as_asked_on_every_device(requested: str) -> None:
    assert {choose_precision(requested, caps) for _, caps, _ in KNOWN_DEVICES} == {requested}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the CPU's flags from /proc/cpuinfo")
def test_this_cpu_gets_bf16_exactly_when_its_flags_list_native_bf16() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert capabilities(torch.device("cpu")) == Capabilities(type="cpu", cpu_bf16=native)
    assert precision_for("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def _data(n: int = 64, size: int = 16) -> SearchData:
    """Two classes told apart by brightness: a few epochs lower the loss in any precision."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    noise = torch.randint(0, 40, (n, size, size, 3), generator=generator)
    images = (noise + 60 + 120 * labels[:, None, None, None]).to(torch.uint8)
    split = Split(images=images, labels=labels)
    return SearchData(
        train=split, val=split, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=2, image_shape=(3, size, size)
    )


def _fit(precision: str, checkpoint: Path, **resuming: object) -> list[float]:
    """Training losses of 4 epochs of a tiny CNN in ``precision`` on the CPU, from the same seed whatever it is."""
    hp = Hyperparameters(lr=0.05, batch_size=16, depth=1, base_width=8, optimizer="sgd")
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_channels=3, num_classes=2, image_size=16)
    config = TrainConfig(hp=hp, max_epochs=4, augment=False, seed=0, device=torch.device("cpu"), precision=precision)
    return [epoch.train_loss for epoch in fit(model, _data(), config, checkpoint=checkpoint, **resuming).epochs]


def test_fp16_trains_with_gradient_scaling_and_learns_as_fp32_does(tmp_path: Path) -> None:
    fp32 = _fit("fp32", tmp_path / "fp32.pt")
    fp16 = _fit("fp16", tmp_path / "fp16.pt")
    # A step taken on scaled gradients (no unscaling) would be 65,536 times too long and the loss would blow up.
    assert all(math.isfinite(loss) for loss in fp16) and fp16[-1] < 0.5 * fp16[0]
    assert fp16[-1] == pytest.approx(fp32[-1], abs=0.05)
    # The scaler's state is in the checkpoint, so a resumed trial goes on with the scale it had reached.
    scaler = torch.load(tmp_path / "fp16.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0
    assert torch.load(tmp_path / "fp32.pt", weights_only=True)["scaler"] == {}  # disabled: fp32 trains as before


def test_a_resumed_fp16_trial_goes_on_with_the_loss_scale_it_had_reached(tmp_path: Path) -> None:
    checkpoint = tmp_path / "trial.pt"
    _fit("fp16", checkpoint, stop_after=1)
    blob = torch.load(checkpoint, weights_only=True)
    blob["scaler"]["scale"] = 1024.0  # as if overflows had halved it from the initial 65,536 six times
    torch.save(blob, checkpoint)
    _fit("fp16", checkpoint, resume=load_checkpoint(checkpoint))
    # 12 more steps without overflow leave the scale where it was (it grows after 2,000); a fresh scaler's is 65,536.
    assert torch.load(checkpoint, weights_only=True)["scaler"]["scale"] == 1024.0


@pytest.mark.slow
def test_each_trial_stores_the_precision_it_trained_in_and_the_worker_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 2
    images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    study_file = tmp_path / "precision.toml"
    study_file.write_text(
        '[data]\nval_fraction = 0.25\n[train]\nmax_epochs = 1\ndevice = "cpu"\n[sampler]\ntype = "random"\n'
        '[pruner]\ntype = "none"\n[space]\nlr = 0.01\nbatch_size = 8\ndepth = 1\nbase_width = 4\n'
    )
    with caplog.at_level(logging.INFO, logger="hpo"):
        url = f"sqlite:///{tmp_path / 'hpo.db'}"
        study = hpo.search(study_file, n_trials=1, storage=url, data=hpo.ArrayData(images, labels))
    expected = precision_for("auto", torch.device("cpu"))
    assert study.trials[0].user_attrs["worker"]["precision"] == expected
    assert f"training in {expected} on cpu ([train] precision = 'auto')" in caplog.text
