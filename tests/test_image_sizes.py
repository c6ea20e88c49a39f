"""Photos at their own sizes: decoded to [data] image_size, randomly resized crops on the device, the memory
check before decoding, and images given from Python (hpo.ArrayData)."""

from __future__ import annotations

import io
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F

import hpo
import hpo.training.imagefolder
import hpo.training.memory
from hpo.errors import DataError, UsageError
from hpo.studyfile.space import Hyperparameters
from hpo.studyfile.spec import DataSection
from hpo.training.arrays import ArrayData, array_dataset
from hpo.training.batches import ASPECT_RATIOS, crop_boxes, random_boxes, resized_crop
from hpo.training.datasets import load_dataset
from hpo.training.imagefolder import cache_dir, count_images
from hpo.training.memory import HOST_SHARE, WORKING_BYTES, Footprint, Placement, check_memory

CPU = torch.device("cpu")
CLASSES = ("desert", "forest", "sea")
COLOURS = {"desert": (200, 170, 90), "forest": (40, 120, 40), "sea": (30, 60, 200)}


def photo_folder(root: Path, *, per_class: int = 6, seed: int = 0) -> Path:
    """``root/train/<class>/`` with ``per_class`` noisy JPEG photos per class of 96-150 px sides (any aspect),
    ``root/test/<class>/`` with one each: 21 images of 3 classes by default."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", 1)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(side) for side in rng.integers(96, 151, size=2))
                pixels = np.array(COLOURS[name]) + rng.normal(0, 40, size=(height, width, 3))
                from PIL import Image

                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"))


def _folder_section(path: Path, **values: object) -> DataSection:
    return DataSection(dataset="image_folder", data_dir=str(path), **values)  # type: ignore[arg-type]


# --- decoding photos to image_size -----------------------------------------------------------------------------------


def test_photos_of_any_size_decode_to_image_size(photos: Path) -> None:
    dataset = load_dataset(_folder_section(photos, image_size=64))
    assert dataset.train_images.shape == (18, 64, 64, 3) and dataset.test_images.shape == (3, 64, 64, 3)
    assert dataset.classes == CLASSES and torch.bincount(dataset.train_labels).tolist() == [6, 6, 6]
    # Each image keeps its class's colour: no channel swapped, no border of padding.
    mean_colour = dataset.train_images[dataset.train_labels == 2].float().mean(dim=(0, 1, 2))
    assert mean_colour[2] > 150 and mean_colour[0] < 80, "the sea is blue"


def test_the_shorter_side_is_resized_and_the_longer_one_centre_cropped(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for name, size in (("wide", (150, 100)), ("tall", (100, 150))):
            image = Image.new("RGB", size, (255, 0, 0))  # red margins, which the centre crop removes
            width, height = size
            side = min(size)
            image.paste((0, 0, 255), ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2))
            (tmp_path / split / name).mkdir(parents=True)
            image.save(tmp_path / split / name / "0.png")
    dataset = load_dataset(_folder_section(tmp_path, image_size=32))
    assert dataset.train_images.shape == (2, 32, 32, 3)
    # The filter reaches one output pixel past the crop at 3x downscaling, as resizing before cropping does; a
    # stretched image would be red 5 px deep at two of its edges.
    red, blue = dataset.train_images[:, 1:-1, 1:-1, 0], dataset.train_images[:, 1:-1, 1:-1, 2]
    assert red.max() <= 5 and blue.min() >= 250


def test_a_large_jpeg_is_decoded_as_from_its_full_size(tmp_path: Path) -> None:
    """Large JPEGs are decoded at a reduced scale (DCT scaling); the result matches a full decode resized."""
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = F.interpolate(torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0)), size=(900, 1200), mode="bilinear")
    pixels = (smooth[0].permute(1, 2, 0).numpy() * 255 + rng.normal(0, 3, (900, 1200, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    decoded = hpo.training.imagefolder._decode_image(buffer.getvalue(), 64)
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    reference = np.asarray(full.resize((64, 64), Image.Resampling.BILINEAR, box=(150, 0, 1050, 900)))
    assert decoded.shape == (64, 64, 3)
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 3.0, "within 3 of 255 levels on average"


def test_the_model_can_ask_for_an_image_size(photos: Path) -> None:
    assert load_dataset(_folder_section(photos)).image_shape == (3, 32, 32), "image folders default to 32 px"
    assert load_dataset(_folder_section(photos), default_image_size=48).image_shape == (3, 48, 48)
    assert load_dataset(_folder_section(photos, image_size=40), default_image_size=48).image_shape == (3, 40, 40), (
        "the study file's image_size wins over the model's"
    )


def test_images_are_counted_without_decoding(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (photos / "README.txt").write_text("not an image")
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname=".")
    monkeypatch.setattr(hpo.training.imagefolder, "_decode_image", _no_decoding)
    for source in (photos, archive):
        count = count_images(source, label="data_dir")
        assert (count.train, count.test) == (18, 3)


def _no_decoding(*args: object) -> None:
    raise AssertionError("an image was decoded")


# --- the memory check ------------------------------------------------------------------------------------------------


def _pretend_available(monkeypatch: pytest.MonkeyPatch, fits_side: int, images: int = 21) -> None:
    """Pretend a machine whose host memory fits ``images`` RGB images decoded at ``fits_side`` px and their parts, no more."""
    footprint = Footprint(new_images=images, new_channels=3, searched=18, channels=3, image_size=fits_side)
    available = math.ceil(footprint.host_bytes() / HOST_SHARE)
    monkeypatch.setattr(hpo.training.memory, "available_host_bytes", lambda: available)


def test_the_memory_check_refuses_before_decoding(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from hpo.run import main

    _pretend_available(monkeypatch, fits_side=100)
    monkeypatch.setattr(hpo.training.imagefolder, "_decode_image", _no_decoding)
    study = tmp_path / "photos.toml"
    study.write_text(f'[data]\ndataset = "image_folder"\ndata_dir = "{photos.as_posix()}"\nimage_size = 128\n[train]\ndevice = "cpu"\n')
    cached = set(cache_dir().glob("*"))
    code = main(["--study", str(study), "--n-trials", "1", "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(
        rf"data_dir: 21 images in {re.escape(str(photos))} at image_size = 128 need about \d+\.\d GiB of host memory, "
        r"more than 80% of the \d+\.\d GiB available; \[data\] image_size = 100 would fit",
        err,
    ), err
    assert set(cache_dir().glob("*")) == cached, "nothing was decoded or cached"
    assert optuna.study.get_all_study_summaries(f"sqlite:///{tmp_path / 'hpo.db'}") == [], "nothing stored"


def test_the_image_size_the_check_suggests_fits(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_available(monkeypatch, fits_side=100)
    with pytest.raises(DataError, match=r"\[data\] image_size = 100 would fit"):
        load_dataset(_folder_section(photos, image_size=101))
    assert load_dataset(_folder_section(photos, image_size=100)).image_shape == (3, 100, 100)


def test_a_machine_too_small_for_any_size_says_to_use_fewer_images(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hpo.training.memory, "available_host_bytes", lambda: WORKING_BYTES)
    with pytest.raises(DataError, match=r"not even \[data\] image_size = 8 would fit: use fewer images"):
        load_dataset(_folder_section(photos, image_size=64))


def test_the_device_check_counts_every_worker_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    footprint = Footprint(new_images=0, new_channels=3, searched=10_000, channels=3, image_size=224)
    one_copy = footprint.device_bytes()  # 1.4 GiB
    monkeypatch.setattr(hpo.training.memory, "free_device_bytes", lambda device: 2 * one_copy if device.type == "cuda" else None)
    monkeypatch.setattr(hpo.training.memory, "available_host_bytes", lambda: None)  # the device alone
    gpu = Placement(devices=(torch.device("cuda", 1),))
    check_memory(footprint, gpu, what="data_dir: 10000 images in x")  # one copy fits 75 % of twice its size
    with pytest.raises(DataError, match=r"on cuda:1 for the training and validation parts \(2 workers each holding a copy\).*"
                       r"\[data\] image_size = 193 would fit"):
        check_memory(footprint, Placement(devices=gpu.devices, per_device=2), what="data_dir: 10000 images in x")
    check_memory(footprint, Placement(devices=(CPU,), per_device=4), what="x")  # a CPU device is the host's memory


# --- random resized crops on the device ------------------------------------------------------------------------------


def test_resized_crop_boxes_stay_inside_the_image_with_torchvisions_area_and_aspect() -> None:
    boxes = random_boxes(4096, 32, 32, torch.Generator().manual_seed(0), scale=0.35, device=CPU)
    assert (boxes.top >= 0).all() and (boxes.left >= 0).all()
    assert (boxes.top + boxes.height <= 32).all() and (boxes.left + boxes.width <= 32).all()
    share = (boxes.height * boxes.width).double() / (32 * 32)
    aspect = boxes.width.double() / boxes.height
    # Sides are rounded to whole pixels, as torchvision rounds them: a share or ratio off by up to a pixel's worth.
    assert share.min() > 0.35 - 0.04 and share.max() <= 1.0 and share.mean() > 0.55
    assert aspect.min() >= ASPECT_RATIOS[0] - 0.05 and aspect.max() <= ASPECT_RATIOS[1] + 0.05
    assert len(set(zip(boxes.top.tolist(), boxes.left.tolist()))) > 100, "positions vary"
    narrow = random_boxes(64, 8, 40, torch.Generator().manual_seed(0), scale=0.9, device=CPU)
    assert (narrow.left + narrow.width <= 40).all() and (narrow.top + narrow.height <= 8).all()
    assert (narrow.width <= round(8 * ASPECT_RATIOS[1])).all(), "too wide for any try: torchvision's centred fallback"


def test_resized_crop_is_crop_then_bilinear_resize_and_flip_mirrors_it() -> None:
    images = torch.rand(32, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    boxes = random_boxes(32, 24, 24, torch.Generator().manual_seed(0), scale=0.2, device=CPU)
    out = crop_boxes(images, boxes, torch.zeros(32, dtype=torch.bool))
    assert out.shape == images.shape and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(32):
        top, left, h, w = (int(v[i]) for v in (boxes.top, boxes.left, boxes.height, boxes.width))
        reference = F.interpolate(images[i : i + 1, :, top : top + h, left : left + w], size=(24, 24), mode="bilinear")
        # Where a sample lies within the box: at its very edge torchvision clamps to the box, grid_sample reads beyond.
        k = torch.arange(24) + 0.5
        rows = (k * h / 24 - 0.5 >= 0) & (k * h / 24 - 0.5 <= h - 1)
        cols = (k * w / 24 - 0.5 >= 0) & (k * w / 24 - 0.5 <= w - 1)
        inside = rows[:, None] & cols[None, :]
        assert torch.allclose(out[i][:, inside], reference[0][:, inside], atol=1e-5)
    mirrored = crop_boxes(images, boxes, torch.ones(32, dtype=torch.bool))
    assert torch.allclose(mirrored, out.flip(3), atol=1e-6)


def test_resized_crop_is_reproducible_from_the_generator_and_changes_images() -> None:
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hp = Hyperparameters(crop="resized", crop_scale=0.35, flip=True)
    first = resized_crop(images, torch.Generator().manual_seed(5), hp)
    again = resized_crop(images, torch.Generator().manual_seed(5), hp)
    other = resized_crop(images, torch.Generator().manual_seed(6), hp)
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)
    changed = [(first[i] - images[i]).abs().max() > 1e-3 for i in range(16)]
    assert sum(changed) >= 15, "(almost) every image is cropped"


# --- images from Python: hpo.ArrayData -------------------------------------------------------------------------------


def _arrays(n: int = 40, size: int = 16, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 NHWC images of 2 classes told apart by brightness, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = (rng.normal(0, 20, (n, size, size, 3)) + 80 + 100 * labels[:, None, None, None]).clip(0, 255).astype(np.uint8)
    return images, labels


def test_array_data_accepts_numpy_and_torch_nhwc_nchw_uint8_and_float() -> None:
    images, labels = _arrays()
    section = DataSection(val_fraction=0.25)
    reference = array_dataset(ArrayData(images, labels), section)
    assert reference.image_shape == (3, 16, 16) and reference.classes == ("0", "1") and reference.name == "arrays"
    nchw_float = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    read_only = images.copy()
    read_only.flags.writeable = False
    for given in (ArrayData(nchw_float, torch.from_numpy(labels)), ArrayData(read_only, labels)):
        assert torch.equal(array_dataset(given, section).train_images, reference.train_images)
    mirrored = array_dataset(ArrayData(images[:, :, ::-1], labels), section)  # a view with a negative stride
    assert torch.equal(mirrored.train_images, reference.train_images.flip(2))
    gray = array_dataset(ArrayData(images[..., 0], labels, classes=["dark", "light"]), section)
    assert gray.image_shape == (1, 16, 16) and gray.classes == ("dark", "light")
    resized = array_dataset(ArrayData(images, labels, images[:4], labels[:4]), DataSection(image_size=32, channels=1))
    assert resized.image_shape == (1, 32, 32) and resized.test_images.shape == (4, 32, 32, 1)


_IMAGES, _LABELS = _arrays(8)
BAD_ARRAYS = {
    "a list": (dict(train_images=[[0]], train_labels=_LABELS), r"train_images must be a numpy array or a torch tensor, got list"),
    "4 channels": (dict(train_images=np.zeros((8, 16, 16, 4), np.uint8)), r"shape \(N, H, W, C\) or \(N, C, H, W\) with C = 1 or 3, got \(8, 16, 16, 4\)"),
    "not square": (dict(train_images=np.zeros((8, 16, 20, 3), np.uint8)), r"must be square \(H == W\), got 16 x 20"),
    "tiny": (dict(train_images=np.zeros((8, 4, 4, 3), np.uint8)), r"at least 8 px, got 4 x 4"),
    "int32 pixels": (dict(train_images=_IMAGES.astype(np.int32)), r"uint8 \(0\.\.255\) or float in \[0, 1\], got dtype torch\.int32"),
    "float 0-255": (dict(train_images=_IMAGES.astype(np.float32)), r"float, so they must be in \[0, 1\], got values from \d+ to \d+"),
    "NaN": (dict(train_images=np.full((8, 16, 16, 3), np.nan, np.float32)), r"must be in \[0, 1\], got values from nan"),
    "labels too few": (dict(train_labels=_LABELS[:5]), r"train_labels must be 1-D with one label per image \(8\), got shape \(5,\)"),
    "float labels": (dict(train_labels=_LABELS.astype(float)), r"train_labels must be integers \(class indices\), got dtype torch\.float64"),
    "negative label": (dict(train_labels=_LABELS - 1), r"train_labels must be class indices >= 0, got -1"),
    "label beyond classes": (dict(classes=["one"] * 1), r"a label is 1, but classes has 1 name \(labels must be 0\.\.0\)"),
    "classes repeat": (dict(classes=["a", "a"]), r"classes repeat a name"),
    "one class": (dict(train_labels=np.zeros(8, np.int64)), r"train_labels hold 1 class \(0\); a classifier needs at least 2"),
    "test without labels": (dict(test_images=_IMAGES), r"give test_images and test_labels together, or neither"),
    "test of another size": (dict(test_images=_IMAGES[:, :8, :8], test_labels=_LABELS), r"test_images must have the training images' shape \(16, 16, 3\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAYS))
def test_bad_array_data_is_one_line_naming_the_argument(case: str) -> None:
    changes, message = BAD_ARRAYS[case]
    values = {"train_images": _IMAGES, "train_labels": _LABELS, **changes}
    with pytest.raises(DataError, match=message) as caught:
        array_dataset(ArrayData(**values), DataSection())
    assert str(caught.value).startswith("ArrayData: ") and "\n" not in str(caught.value)


def test_array_data_is_refused_with_launched_workers_or_a_data_dir_before_anything_is_stored(tmp_path: Path) -> None:
    images, labels = _arrays()
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    with pytest.raises(UsageError, match=r"argument data: not allowed with gpus/workers_per_gpu: launched workers read"):
        hpo.search("quick", n_trials=1, storage=url, data=ArrayData(images, labels), workers_per_gpu=2)
    with pytest.raises(UsageError, match=r"argument data: must be an hpo\.ArrayData, got tuple"):
        hpo.search("quick", n_trials=1, storage=url, data=(images, labels))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"argument data_dir: not allowed with data \(the arrays replace"):
        hpo.search("quick", n_trials=1, storage=url, data=ArrayData(images, labels), data_dir="elsewhere")
    assert not (tmp_path / "hpo.db").exists()


ARRAY_STUDY = """
[data]
val_fraction = 0.25
[train]
max_epochs = 1
device = "cpu"
[sampler]
type = "random"
[pruner]
type = "none"
[space]
lr = { low = 1e-3, high = 1e-2, log = true }
batch_size = 8
depth = 1
base_width = 4
crop = "resized"
"""


@pytest.mark.slow
def test_array_data_runs_a_search_in_process_and_is_needed_to_retrain(tmp_path: Path) -> None:
    images, labels = _arrays(48)
    data = ArrayData(images, labels, test_images=images[:8], test_labels=labels[:8])
    study_file = tmp_path / "arrays.toml"
    study_file.write_text(ARRAY_STUDY)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = hpo.search(study_file, n_trials=2, storage=url, data=data)
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    assert study.user_attrs["array_data"]["train_images"] == 48
    saved = hpo.retrain(study, study_file=study_file, data=data)
    assert saved.dataset == "arrays" and saved.train_images == 48 and saved.test_images == 8
    with pytest.raises(UsageError, match=r"was searched on arrays given in Python \(hpo\.ArrayData\); pass the same arrays"):
        hpo.retrain(study, study_file=study_file)
    with pytest.raises(UsageError, match=r"argument data: not the arrays study 'arrays' was searched on: train_images 48, got 40"):
        hpo.retrain(study, study_file=study_file, data=ArrayData(images[:40], labels[:40], images[:8], labels[:8]))
    with pytest.raises(UsageError, match=r"argument data_dir: not allowed with data"):
        hpo.retrain(study, study_file=study_file, data=data, data_dir="elsewhere")


PHOTO_STUDY = """
[study]
name = "photos"

[data]
dataset = "image_folder"
data_dir = "{photos}"
val_fraction = 0.2
image_size = 64

[train]
max_epochs = 1
device = "cpu"

[sampler]
type = "random"

[pruner]
type = "none"

[space]
lr = {{ low = 1e-3, high = 1e-2, log = true }}
batch_size = 4
depth = 2
base_width = 4
crop = "resized"
crop_scale = {{ low = 0.2, high = 0.6 }}
"""


@pytest.mark.slow
def test_a_folder_of_photos_runs_a_study_end_to_end(photos: Path, tmp_path: Path) -> None:
    from hpo.run import main

    study_file = tmp_path / "photos.toml"
    study_file.write_text(PHOTO_STUDY.format(photos=photos.as_posix()))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    assert main(["--study", str(study_file), "--n-trials", "2", "--storage", url, "--quiet"]) == 0
    study = optuna.load_study(study_name="photos", storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2 and all(0.2 <= t.params["crop_scale"] <= 0.6 for t in finished)
    saved = hpo.retrain(study, study_file=study_file)
    assert saved.image_shape == (3, 64, 64) and saved.classes == CLASSES and saved.test_images == 3
