"""Output folders (checkpoints, retrained models, reports), checked writable before any work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hpo.errors import UsageError


def writable_folder(folder: Path, source: str) -> None:
    """Create ``folder`` if missing and write a file in it, or raise UsageError naming ``source``.

    A real probe, not ``os.access``: root passes access checks where creating a file then fails
    (e.g. under /sys); the probe file is deleted at once.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{source}: '{folder}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hpo-", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(f"{source}: cannot write in '{folder}' ({exc.strerror or exc})") from exc
