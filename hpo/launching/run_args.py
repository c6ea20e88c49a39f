"""THE ``hpo.run`` command line: its flags, the typed request they parse into, and every worker's argv.

``python -m hpo.run`` parses its arguments here; ``hpo.submit`` checks the arguments it queues with
the same parser; the local launcher, Slurm array tasks and ``slurm/hpo-array.sbatch`` (through
:mod:`hpo.launching.array_task`) all build a worker's command with :func:`worker_argv` /
:func:`task_flags`.  Nothing else writes hpo.run flags.  The storage URL is never on a worker's
command line (``ps`` and ``squeue`` would show its password): it travels in ``HPO_STORAGE``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hpo import cli
from hpo.errors import UsageError
from hpo.studyfile.spec import Overrides
from hpo.tuning.outage import DEFAULT_PATIENCE_S

PROG = "hpo.run"

# Seconds a trial may go without finishing an epoch (and more than 3 times its worker's longest epoch)
# before its worker is taken for stuck: above the slowest epoch hpo's studies train on a CPU.
DEFAULT_STALL_S = 3600.0

# Seconds a worker gets, after SIGTERM, to fail and re-queue its running trial before it is killed:
# by the local launcher on Ctrl-C, and by a Slurm task near its time limit (which warns
# hpo.launching.slurm.SIGNAL_DELAY_S = 120 s before it).
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs; each field is the hpo.run flag of the same name, and errors name that flag."""

    n_trials: int  # the study's budget of finished (complete or pruned) trials
    storage: str | None = None  # SQLAlchemy URL; None: $HPO_STORAGE, else sqlite:///hpo.db
    timeout: float | None = None  # seconds after which no new trial starts
    checkpoint_dir: str | None = None  # None: beside the SQLite file, else ./hpo-checkpoints
    gpus: str | None = None  # "all" or "0,2,3": one worker process per GPU
    workers_per_gpu: int = 1
    heartbeat_interval: int = 10  # seconds
    grace_period: int | None = None  # seconds; None: 3 x heartbeat_interval
    storage_patience: float = DEFAULT_PATIENCE_S  # seconds
    stall_timeout: float = DEFAULT_STALL_S  # seconds without an epoch after which a trial stops beating
    worker_index: int | None = None  # set by the launcher for the processes it starts
    artifacts: str | None = None  # Optuna artifact store: a folder, s3://bucket/prefix or none (hpo.tuning.artifacts)
    upload_checkpoints: bool = False  # upload every finished trial's final checkpoint to the artifact store
    # Resume a study whose --max-epochs, --seed or study file values it was started with differ (hpo.studyfile.stored).
    accept_changed_overrides: bool = False
    verbose: bool = False  # log every epoch
    quiet: bool = False  # no progress bars; warnings and the summary only

    @property
    def launching(self) -> bool:
        """Whether this call starts worker processes (--gpus, --workers-per-gpu) rather than training itself."""
        return self.gpus is not None or self.workers_per_gpu > 1

    def effective_grace_period(self) -> int:
        """--grace-period, else 3 x --heartbeat-interval; UsageError when it would reap live workers."""
        grace_period = self.grace_period if self.grace_period is not None else 3 * self.heartbeat_interval
        if grace_period <= self.heartbeat_interval:
            # A live worker beats every interval: a grace period that short would reap its trial under it.
            raise UsageError(
                f"argument --grace-period: must be above --heartbeat-interval ({self.heartbeat_interval} s), "
                f"got {grace_period}"
            )
        return grace_period


@dataclass(frozen=True)
class RunRequest:
    """One hpo.run command line, parsed: which study file, what replaces its values, how the search runs."""

    study: str  # --study: a name in studies/ or a path to a .toml file
    overrides: Overrides
    settings: SearchSettings


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog=f"python -m {PROG}",
        description="Run or resume an Optuna hyperparameter search over CNNs described by a study file.",
    )
    parser.add_argument("--study", required=True, help="study name in studies/ (e.g. cifar) or path to a .toml file")
    parser.add_argument(
        "--n-trials", type=cli.positive_int, required=True,
        help="total budget: finished (complete or pruned) trials the study should have; a resumed study runs only the rest",
    )
    parser.add_argument("--timeout", type=cli.positive_seconds, help="stop starting new trials after this many seconds")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: $HPO_STORAGE or sqlite:///hpo.db)")
    _add_override_flags(parser)
    parser.add_argument(
        "--gpus", help="start one worker process per GPU: 'all' or a list like 0,2,3 (no GPU: CPU workers)",
    )
    parser.add_argument(
        "--workers-per-gpu", type=cli.positive_int, default=1,
        help="worker processes per GPU (or on the CPU when there is none); default 1",
    )
    _add_artifact_flags(parser)
    parser.add_argument("--checkpoint-dir", help="where running trials keep their last-epoch checkpoint (default: beside the SQLite file, else ./hpo-checkpoints)")
    parser.add_argument(
        "--heartbeat-interval", type=cli.positive_int, default=10,
        help="seconds between a running trial's heartbeats in the storage (default 10)",
    )
    parser.add_argument(
        "--grace-period", type=cli.positive_int,
        help="seconds without a heartbeat after which a trial is failed and re-queued; above the interval (default 3 x interval)",
    )
    parser.add_argument(
        "--storage-patience", type=cli.positive_seconds, default=DEFAULT_PATIENCE_S,
        help=f"seconds a worker waits out an unreachable storage before it exits with code {cli.EXIT_STORAGE_UNAVAILABLE} "
        f"(default {DEFAULT_PATIENCE_S:.0f})",
    )
    parser.add_argument(
        "--stall-timeout", type=cli.positive_seconds, default=DEFAULT_STALL_S,
        help=f"seconds a trial may go without an epoch (and over 3x its worker's longest) before its worker stops its "
        f"heartbeat so that another retries it (default {DEFAULT_STALL_S:.0f})",
    )
    parser.add_argument("--worker-index", type=cli.non_negative_int, help=argparse.SUPPRESS)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch of every trial")
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and the summary only")
    return parser


def _add_override_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that replace study file values (hpo.studyfile.spec.Overrides), and the one that lets a resume change them."""
    parser.add_argument("--device", type=cli.device, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--seed", type=cli.non_negative_int, help="sampler and trial seed (overrides [study] seed)")
    parser.add_argument("--study-name", help="name of the study in the storage (overrides [study] name)")
    parser.add_argument("--max-epochs", type=cli.positive_int, help="epochs per trial at most (overrides [train] max_epochs)")
    parser.add_argument(
        "--accept-changed-overrides", action="store_true",
        help="resume a study although --max-epochs, --seed or the study file's subsets, split, image size or "
        "augmentation differ from those it was started with (later trials train with the new ones)",
    )


def _add_artifact_flags(parser: argparse.ArgumentParser) -> None:
    """Where finished trials' checkpoints go for optuna-dashboard (hpo.tuning.artifacts)."""
    parser.add_argument(
        "--upload-checkpoints", action="store_true",
        help="upload every finished trial's final checkpoint to the artifact store, as an artifact of the trial "
        "(off by default: one checkpoint per trial fills disks)",
    )
    parser.add_argument(
        "--artifacts", help="Optuna artifact store for --upload-checkpoints: a folder or s3://bucket/prefix "
        "(default: beside a SQLite file, e.g. hpo-artifacts/, else ./hpo-artifacts)",
    )


def parse_run_args(argv: Sequence[str] | None) -> RunRequest:
    """hpo.run's arguments (sys.argv when None) → RunRequest; a bad flag is a UsageError naming it."""
    args = build_parser().parse_args(argv)
    return RunRequest(
        study=args.study,
        overrides=Overrides(
            study_name=args.study_name, seed=args.seed, data_dir=args.data_dir, device=args.device,
            max_epochs=args.max_epochs,
        ),
        settings=SearchSettings(
            n_trials=args.n_trials, storage=args.storage, timeout=args.timeout, checkpoint_dir=args.checkpoint_dir,
            gpus=args.gpus, workers_per_gpu=args.workers_per_gpu, heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period, storage_patience=args.storage_patience, stall_timeout=args.stall_timeout,
            worker_index=args.worker_index, accept_changed_overrides=args.accept_changed_overrides,
            artifacts=args.artifacts, upload_checkpoints=args.upload_checkpoints,
            verbose=args.verbose, quiet=args.quiet,
        ),
    )


def task_flags(*, index: int, device: str) -> list[str]:
    """The flags that make one worker of many: its device and its index (so its own sampler seed)."""
    return ["--device", device, "--worker-index", str(index)]


def worker_argv(request: RunRequest, *, study_path: Path, checkpoint_dir: Path, index: int, device: str) -> list[str]:
    """The hpo.run arguments of worker ``index``: the request's own, with files named absolutely (so that
    any working directory finds them), without the storage (it travels in HPO_STORAGE) and without
    the launching flags (each worker trains itself)."""
    overrides, settings = request.overrides, request.settings
    argv = ["--study", str(study_path.resolve()), "--n-trials", str(settings.n_trials)]
    argv += ["--checkpoint-dir", str(checkpoint_dir.resolve()), "--heartbeat-interval", str(settings.heartbeat_interval)]
    for flag, value in (
        ("--study-name", overrides.study_name), ("--seed", overrides.seed), ("--data-dir", overrides.data_dir),
        ("--max-epochs", overrides.max_epochs), ("--timeout", settings.timeout),
        ("--grace-period", settings.grace_period), ("--artifacts", _absolute_folder(settings.artifacts)),
        ("--storage-patience", None if settings.storage_patience == DEFAULT_PATIENCE_S else settings.storage_patience),
        ("--stall-timeout", None if settings.stall_timeout == DEFAULT_STALL_S else settings.stall_timeout),
    ):
        if value is not None:
            argv += [flag, str(value)]
    # Not --quiet: a worker draws no progress bar anyway, and its log lines are what the launcher relays
    # (prefixed with the worker's name) and what a Slurm task's log holds.
    if settings.verbose:
        argv.append("--verbose")
    if settings.accept_changed_overrides:
        argv.append("--accept-changed-overrides")
    if settings.upload_checkpoints:
        argv.append("--upload-checkpoints")
    return argv + task_flags(index=index, device=device)


def _absolute_folder(location: str | None) -> str | None:
    """An --artifacts folder named absolutely, as the study file is; a URL (s3://...) or none as given."""
    if location is None or "://" in location or location == "none":
        return location
    return str(Path(location).resolve())


def run_command(argv: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The command that runs hpo.run with ``argv``."""
    return [python, "-m", "hpo.run", *argv]
