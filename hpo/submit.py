"""``python -m hpo.submit slurm``: queue N hpo workers as a Slurm job array on one shared study.

    python -m hpo.submit slurm --workers 8 --gpus-per-worker 1 --partition gpu --time 4:00:00 -- \\
        --study cifar --n-trials 100 --storage postgresql+psycopg2://user:pass@db-host/hpo

Everything after ``--`` is hpo.run's own arguments, checked here with hpo.run's parser, the study file
and a connection to the storage before anything is queued.  The storage URL goes to the tasks in their
environment (``HPO_STORAGE``), not on their command line.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo import cli
from hpo.errors import HpoError, UsageError
from hpo.launching.run_args import RunRequest, parse_run_args, worker_argv
from hpo.studyfile.spec import find_study, load_spec

if TYPE_CHECKING:
    from hpo.launching.slurm import SubmittedArray

PROG = "hpo.submit"

# Exit code when sbatch is missing or refuses the job (the message is sbatch's own).
EXIT_SLURM = 3

# hpo.run flags each task gets from hpo.submit: its device, its index; one worker per task.
_SET_PER_TASK = {"--device": "--gpus-per-worker", "--worker-index": "--workers", "--gpus": "--workers",
                 "--workers-per-gpu": "--workers"}


class SlurmRefused(HpoError):
    """sbatch is missing or refused the job; the message is sbatch's."""


def slurm_minutes(text: str) -> int:
    """Slurm's time formats — MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS — as whole minutes (at least 1)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a Slurm time like 240, 4:00:00 or 1-00:00:00, got {text!r}")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + (second or 0) * 60 + third
    else:  # MM[:SS]
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a Slurm time > 0, got {text!r}")
    return max(1, -(-seconds // 60))


def sbatch_option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE with an sbatch long option name, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog=f"python -m {PROG}",
        description="Queue hpo workers on a cluster. Arguments after -- are hpo.run's (--study, --n-trials, ...).",
    )
    engines = parser.add_subparsers(dest="engine", required=True, metavar="ENGINE", parser_class=cli.Parser)
    slurm = engines.add_parser("slurm", help="a Slurm job array, one hpo.run worker per task")
    slurm.add_argument("--workers", type=cli.positive_int, required=True, help="array tasks, one worker each")
    slurm.add_argument(
        "--gpus-per-worker", type=int, choices=(0, 1), default=1,
        help="1 (default): each task gets a GPU and trains on it; 0: CPU workers",
    )
    slurm.add_argument("--cpus-per-worker", type=cli.positive_int, default=4, help="CPU cores per task (default 4)")
    slurm.add_argument("--mem-per-worker", help="memory per task in sbatch --mem syntax, e.g. 16G (default: the partition's)")
    slurm.add_argument("--time", type=slurm_minutes, default=slurm_minutes("4:00:00"),
                       help="time limit per task, e.g. 4:00:00 (default); a task past it is re-queued")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    slurm.add_argument("--account", help="Slurm account to charge")
    slurm.add_argument("--max-parallel", type=cli.positive_int, help="tasks running at once, at most")
    slurm.add_argument("--job-name", default="hpo", help="Slurm job name (default hpo)")
    slurm.add_argument(
        "--log-dir", default="hpo-slurm",
        help="folder for the tasks' logs and submitit's files, on a filesystem every node sees (default ./hpo-slurm)",
    )
    slurm.add_argument(
        "--sbatch", type=sbatch_option, action="append", default=[], metavar="NAME=VALUE",
        help="any other sbatch option, e.g. --sbatch qos=high --sbatch constraint=a100 (repeatable)",
    )
    return parser


def _split(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """(hpo.submit's own arguments, hpo.run's after ``--``, or None when there is no ``--``)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, None
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


@dataclass(frozen=True)
class QueuedRun:
    """The hpo.run request every task runs, checked, with its files named absolutely for any working directory."""

    request: RunRequest
    study_path: Path
    checkpoint_dir: Path
    storage_url: str  # goes to the tasks in HPO_STORAGE, never on their command line

    def task_argv(self, *, index: int, device: str) -> list[str]:
        return worker_argv(
            self.request, study_path=self.study_path, checkpoint_dir=self.checkpoint_dir, index=index, device=device
        )


def queued_run(run_argv: Sequence[str]) -> QueuedRun:
    """hpo.run's arguments for every task, checked (flags, study file, storage) before anything is queued."""
    from hpo.tuning.storage import check_storage, resolve_storage, sqlite_path

    try:
        request = parse_run_args(run_argv)
    except UsageError as exc:
        raise UsageError(f"after --: {exc}") from None
    overrides, settings = request.overrides, request.settings
    given = {"--device": overrides.device, "--worker-index": settings.worker_index, "--gpus": settings.gpus,
             "--workers-per-gpu": None if settings.workers_per_gpu == 1 else settings.workers_per_gpu}
    for flag, value in given.items():
        if value is not None:
            raise UsageError(f"after --: argument {flag}: set by hpo.submit (see {_SET_PER_TASK[flag]})")
    spec = load_spec(find_study(request.study))
    storage_url, source = resolve_storage(settings.storage)
    if sqlite_path(storage_url) is not None or storage_url.startswith("sqlite:"):
        raise UsageError(
            f"{source}: workers on a cluster need a database server (postgresql+psycopg2://… or mysql+pymysql://…); "
            "SQLite locking is not safe across nodes"
        )
    check_storage(storage_url, source)
    return QueuedRun(
        request=request, study_path=spec.path.resolve(),
        checkpoint_dir=Path(settings.checkpoint_dir or "hpo-checkpoints").resolve(), storage_url=storage_url,
    )


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        ours, theirs = _split(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(ours)  # first, so that --help works without hpo.run's arguments
        if theirs is None:
            raise UsageError("hpo.run arguments are missing: put them after --, e.g. -- --study cifar --n-trials 100")
        return _submit(args, queued_run(theirs))

    def guarded_body() -> int:
        try:
            return body()
        except SlurmRefused as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_SLURM

    return cli.guarded(PROG, guarded_body)


def _submit(args: argparse.Namespace, queued: QueuedRun) -> int:
    try:
        from hpo.launching.slurm import SIGNAL_DELAY_S, SlurmRequest, submit_array
    except ImportError as exc:
        raise UsageError(f"submitit is not installed ({exc.name}): pip install 'hpo[slurm]'") from None
    if args.time * 60 <= 2 * SIGNAL_DELAY_S:
        # The time-limit warning would come before the worker has done anything.
        raise UsageError(f"argument --time: must be more than {2 * SIGNAL_DELAY_S // 60} minutes, got {args.time}")
    from submitit.core.utils import FailedJobError

    request = SlurmRequest(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        time_min=args.time, log_dir=Path(args.log_dir).resolve(), job_name=args.job_name,
        partition=args.partition, mem=args.mem_per_worker, account=args.account, max_parallel=args.max_parallel,
        sbatch_options=tuple(args.sbatch),
    )
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SlurmRefused("sbatch not found: run hpo.submit on a Slurm login node")
    device = "cuda" if args.gpus_per_worker else "cpu"
    task_argvs = [queued.task_argv(index=i, device=device) for i in range(args.workers)]
    try:
        array = submit_array(request, task_argvs=task_argvs, storage_url=queued.storage_url)
    except FailedJobError as exc:
        lines = [line for line in str(exc).splitlines() if "error" in line.lower()] or str(exc).splitlines()
        raise SlurmRefused(f"sbatch refused the job: {lines[-1].strip() if lines else exc}") from None
    _print_submitted(array, queued, workers=args.workers, first_argv=task_argvs[0])
    return 0


def _print_submitted(array: SubmittedArray, queued: QueuedRun, *, workers: int, first_argv: Sequence[str]) -> None:
    from hpo.tuning.storage import redact

    shown = redact(queued.storage_url)
    tasks = array.task_ids[0] if len(array.task_ids) == 1 else f"{array.task_ids[0]} … {array.task_ids[-1]}"
    print(f"Submitted Slurm array job {array.job_id}: {workers} hpo workers (tasks {tasks})")
    print(f"  task 0 runs: python -m hpo.run {shlex.join(first_argv)}  (task i: --worker-index i)")
    print(f"  storage:    {shown} (in the tasks' HPO_STORAGE)")
    print(f"  watch:      squeue -j {array.job_id}      logs: {array.log_dir}/{array.job_id}_*/")
    print(f"  study:      optuna-dashboard {shown}")
    print(f"  stop:       scancel {array.job_id}      (running trials are failed and re-queued; submit again to resume)")


if __name__ == "__main__":
    sys.exit(main())
