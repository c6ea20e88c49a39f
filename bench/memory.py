"""The memory check's estimate against the measured peak: one image folder loaded as a search loads it.

    python bench/memory.py --images 3000 --image-size 224     # a generated folder of 96-150 px JPEG photos
    python bench/memory.py --folder PATH --image-size 128      # your own folder or .tar.gz

A fresh process (so that the peak is this load's) counts the images, decodes them into an empty cache
folder (load_dataset) and copies the training and validation parts (carve_validation), as hpo.run
does before its first trial.  It prints the estimate of hpo.training.memory (the data alone, and with
the working allowance the check adds), the peak resident memory above what the process held before
loading (Linux VmHWM minus VmRSS), and the seconds spent counting and loading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def measure(folder: Path, image_size: int) -> dict[str, float]:
    """Load ``folder`` at ``image_size`` in this process; the estimate and the peak, in MiB, and the seconds."""
    import torch  # noqa: F401  (loaded before the baseline: its own memory is not the data's)
    from PIL import Image  # noqa: F401

    from hpo.studyfile.spec import DataSection
    from hpo.training.datasets import load_dataset
    from hpo.training.imagefolder import count_images
    from hpo.training.memory import WORKING_BYTES, Footprint, searched_images
    from hpo.training.splits import carve_validation

    section = DataSection(dataset="image_folder", data_dir=str(folder), image_size=image_size)
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    count = count_images(folder, label="data_dir")
    counted = time.perf_counter()
    dataset = load_dataset(section)
    data = carve_validation(dataset, section)
    loaded = time.perf_counter()
    footprint = Footprint(
        new_images=count.train + count.test, new_channels=3, searched=searched_images(count.train, section), channels=3,
        image_size=image_size,
    )
    return {
        "images": count.train + count.test, "searched": len(data.train) + len(data.val),
        "estimate_data_mib": (footprint.host_bytes() - WORKING_BYTES) / MIB, "estimate_mib": footprint.host_bytes() / MIB,
        "peak_above_baseline_mib": (_status_kib("VmHWM") - baseline) / 1024, "count_s": counted - start,
        "load_s": loaded - counted,
    }


def generate(folder: Path, images: int) -> None:
    """``images`` noisy JPEG photos of 96-150 px sides in 4 classes, a tenth of them under test/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        split = "test" if i % 10 == 0 else "train"
        label = i % 4
        target = folder / split / f"class{label}"
        target.mkdir(parents=True, exist_ok=True)
        width, height = (int(side) for side in rng.integers(96, 151, size=2))
        pixels = 60 * label + rng.normal(60, 40, size=(height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(target / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an image folder or .tar.gz (default: generate one)")
    parser.add_argument("--images", type=int, default=3000, help="photos to generate when no --folder is given")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.folder, args.image_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "photos"
            generate(folder, args.images)
        env = {**os.environ, "HPO_CACHE_DIR": str(Path(tmp) / "cache")}  # empty: the folder is decoded
        command = [sys.executable, __file__, "--child", "--folder", str(folder), "--image-size", str(args.image_size)]
        result = json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
    print(
        f"{result['images']} images at {args.image_size} px ({result['searched']} in the training and validation parts): "
        f"estimate {result['estimate_data_mib']:.0f} MiB of data ({result['estimate_mib']:.0f} MiB with the working "
        f"allowance), measured peak {result['peak_above_baseline_mib']:.0f} MiB above the process's baseline; "
        f"counting {result['count_s']:.2f} s, decoding and splitting {result['load_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
