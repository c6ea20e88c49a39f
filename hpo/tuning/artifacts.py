"""Optuna artifact stores: where hpo's result files go so that optuna-dashboard shows them with the study.

By default ``hpo.best`` uploads the model it saves (``<study>-trial<N>.pt``) and ``hpo.report`` its page,
``trials.csv`` and ``summary.json`` as artifacts of the study (Optuna attaches artifacts to a trial only while
it runs), and ``hpo.run --upload-checkpoints`` uploads every trial's final checkpoint as an artifact of the
trial, once it is trained or pruned (off by default: one checkpoint per trial fills disks).  ``hpo.dashboard`` serves the same store.  Every command takes ``--artifacts``:

* a folder (``optuna.artifacts.FileSystemArtifactStore``); by default the folder beside a SQLite file
  (``hpo.db`` → ``hpo-artifacts/``), else ``./hpo-artifacts`` (a server database has no folder of its own);
* ``s3://bucket/prefix``: an S3-compatible bucket (``optuna.artifacts.Boto3ArtifactStore``; needs boto3,
  ``pip install "hpo[s3]"``; credentials and ``AWS_ENDPOINT_URL`` as boto3 reads them);
* ``none``: upload nothing.

Only Optuna's public API is used: the stored artifact ids are in the study's and trials' system attrs,
where ``optuna.artifacts.get_all_artifact_meta`` and optuna-dashboard find them.
"""

from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from hpo.errors import UsageError

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

OFF = "none"
DEFAULT_FOLDER = Path("hpo-artifacts")  # for server databases (PostgreSQL, MySQL): relative to the working directory
S3_HINT = 'pip install "hpo[s3]" (or pip install boto3)'


class ArtifactStore(Protocol):
    """What optuna.artifacts' stores do (Optuna's own protocol class is not public)."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


def default_location(storage_url: str) -> str:
    """Beside a SQLite file (``hpo.db`` → ``hpo-artifacts/``), else ``./hpo-artifacts``."""
    from hpo.tuning.storage import sqlite_path

    path = sqlite_path(storage_url)
    return str(path.with_name(f"{path.stem}-artifacts") if path is not None else DEFAULT_FOLDER)


@dataclass(frozen=True)
class Artifacts:
    """An open artifact store and where it is (for messages)."""

    store: ArtifactStore
    shown: str

    def upload(self, target: optuna.Study | optuna.Trial, path: Path) -> str:
        """Upload file ``path`` as an artifact of ``target``: a study, or a running trial; its artifact id."""
        from optuna.artifacts import upload_artifact

        mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        artifact_id = upload_artifact(
            artifact_store=self.store, file_path=str(path), study_or_trial=target, mimetype=mimetype
        )
        logger.info("uploaded %s to %s as artifact %s", path.name, self.shown, artifact_id)
        return artifact_id


    def keep_checkpoint(self, trial: optuna.Trial, path: Path) -> None:
        """Objective's ``on_final_checkpoint``: upload a trial's last checkpoint as its artifact, while it runs
        (Optuna attaches artifacts to running trials only).  A failed upload is a warning: the search goes on."""
        try:
            self.upload(trial, path)
        except Exception as exc:  # noqa: BLE001 (any store's error: S3's, a full disk's, the storage's)
            logger.warning("trial %d: could not upload its checkpoint to %s: %s", trial.number, self.shown, exc)


def open_artifacts(value: str | None, storage_url: str, *, flag: str = "--artifacts") -> Artifacts | None:
    """``--artifacts`` (None: the default beside the storage) → the store; None for ``none``.  A folder is checked
    writable and boto3 importable here, before any work, so a bad value is one line naming ``flag``."""
    location = default_location(storage_url) if value is None else value
    source = flag if value is not None else "default artifact folder"
    if location == OFF:
        return None
    if location.startswith("s3://"):
        return Artifacts(store=_s3_store(location, flag), shown=location)
    if "://" in location:
        raise UsageError(f"{flag}: must be a folder, s3://bucket/prefix or {OFF}, got {location!r}")
    from optuna.artifacts import FileSystemArtifactStore

    from hpo.folders import writable_folder

    writable_folder(Path(location), source)
    return Artifacts(store=FileSystemArtifactStore(location), shown=location)


def checkpoint_artifacts(value: str | None, upload: bool, storage_url: str) -> Artifacts | None:
    """hpo.run's store: only with ``--upload-checkpoints`` (a search uploads nothing else)."""
    if not upload:
        if value is not None:
            raise UsageError(f"argument --artifacts: only with --upload-checkpoints (the search uploads nothing else), got {value!r}")
        return None
    if value == OFF:
        raise UsageError("argument --artifacts: none leaves --upload-checkpoints nowhere to upload to")
    return open_artifacts(value, storage_url)


def parse_s3(location: str, flag: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at its ends); a UsageError naming ``flag``."""
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket or any(c in bucket for c in " \\:"):
        raise UsageError(f"{flag}: must be s3://bucket or s3://bucket/prefix, got {location!r}")
    return bucket, prefix.strip("/")


def _s3_store(location: str, flag: str) -> ArtifactStore:
    bucket, prefix = parse_s3(location, flag)
    try:
        import boto3
    except ImportError:
        raise UsageError(f"{flag}: {location} needs boto3, which is not installed: {S3_HINT}") from None
    from optuna.artifacts import Boto3ArtifactStore

    from hpo.errors import first_line

    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)  # here, so that a wrong bucket or missing credentials stop before any work
    except Exception as exc:  # noqa: BLE001 (botocore's ClientError, NoCredentialsError, EndpointConnectionError...)
        raise UsageError(f"{flag}: cannot reach bucket {bucket!r} of {location}: {first_line(exc)}") from None
    store = Boto3ArtifactStore(bucket, client=client)
    return _Prefixed(store, prefix) if prefix else store


class _Prefixed:
    """An artifact store whose ids are kept under ``prefix/`` (Boto3ArtifactStore writes at the bucket's top)."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(f"{self.prefix}/{artifact_id}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.store.write(f"{self.prefix}/{artifact_id}", content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(f"{self.prefix}/{artifact_id}")
