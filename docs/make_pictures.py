"""Make the README's picture from a real run: the quick study, its report, a headless-Chromium screenshot.

    python docs/make_pictures.py --data /path/to/cifar10-jpg.tar.gz        # writes docs/img/report.png

It runs, in a temporary folder and as a user would, ``python -m hpo.run --study quick`` (20 trials by
default, on the CPU) and ``python -m hpo.report``, then opens ``report.html`` in headless Chromium
(the Debian package ``chromium``) and saves the top of the page as a PNG.  Nothing is drawn by hand.
The run's wall time and summary are printed, so the figures beside the picture can be quoted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pixels of the browser window the screenshot is taken in: wide enough for the report's table and
# its first figures, tall enough to show the summary, the optimization history and the learning curves.
WINDOW = (1280, 1650)
# Milliseconds of page time Chromium gives plotly.js to draw before the screenshot.
RENDER_BUDGET_MS = 15_000
# Seconds any one command may take: the quick study on a 2-core CPU takes about a minute.
COMMAND_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Settings:
    """What to run and where to write the picture."""

    data: Path
    n_trials: int
    out: Path
    device: str


def _parse(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("HPO_DATA_ARCHIVE"),
                        help="CIFAR-10 folder or .tar.gz archive (default: $HPO_DATA_ARCHIVE)")
    parser.add_argument("--n-trials", type=int, default=20, help="trials of the quick study (default 20)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for report.png (default docs/img)")
    parser.add_argument("--device", default="cpu", help="device of the run (default cpu)")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required when HPO_DATA_ARCHIVE is not set")
    return Settings(data=Path(args.data).resolve(), n_trials=args.n_trials, out=Path(args.out), device=args.device)


def _hpo(module: str, argv: list[str], work: Path) -> str:
    """Run ``python -m hpo.<module>`` in ``work`` with this checkout's hpo; its stdout, checked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", f"hpo.{module}", *argv], cwd=work, env=env, capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise SystemExit(f"hpo.{module} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def screenshot(page: Path, png: Path, *, window: tuple[int, int] = WINDOW) -> None:
    """A PNG of ``page`` (an HTML file) as headless Chromium draws it in a ``window`` (width, height) in pixels;
    bench/search.py takes its figure's picture here too."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium binary (Debian: apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--virtual-time-budget={RENDER_BUDGET_MS}", f"--window-size={window[0]},{window[1]}",
         f"--screenshot={png}", page.as_uri()],
        capture_output=True, timeout=300, check=True,
    )
    if png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"{png}: Chromium wrote no PNG")


def main(argv: list[str] | None = None) -> int:
    settings = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="hpo-pictures-") as folder:
        work = Path(folder)
        started = time.perf_counter()
        summary = _hpo("run", ["--study", "quick", "--n-trials", str(settings.n_trials), "--data-dir", str(settings.data),
                               "--device", settings.device, "--quiet"], work)
        seconds = time.perf_counter() - started
        _hpo("report", ["--study", "quick", "--out", "report", "--quiet"], work)
        png = settings.out / "report.png"
        screenshot(work / "report" / "report.html", png)
    print(summary, end="")
    print(f"hpo.run wall time, process start to exit: {seconds:.1f} s")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
