"""Slurm job arrays of hpo workers, submitted with submitit.

Each array task is one ``python -m hpo.run`` worker (with its own ``--worker-index``) on one study in a
shared storage; Slurm does placement, restarts and accounting.  The storage URL reaches the tasks in the
job's environment (``HPO_STORAGE``), never on a command line that ``squeue`` or ``ps`` would show.

Stops, and what each leaves behind:

* ``scancel``: Slurm sends SIGTERM to every process of the task; submitit's own process ignores it,
  and hpo.run marks its running trial FAIL, re-queues it (it waits in the study) and exits 143 — so no
  trial stays RUNNING and a later worker resumes it from its last epoch checkpoint.
* time limit (submitit asks Slurm for SIGUSR2 ``SIGNAL_DELAY_S`` before it): the task's ``checkpoint``
  stops hpo.run as above and submitit re-queues the array task, which starts a fresh worker.
* preemption: Slurm sends SIGTERM as for ``scancel`` and, the job being ``--requeue``, restarts the task.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit

from hpo.launching.run_args import STOP_GRACE_S, run_command

# Seconds before the time limit at which Slurm warns a task with SIGUSR2: time to stop hpo.run
# (its trial failed and re-queued) and re-queue the task.
SIGNAL_DELAY_S = 120
# Seconds between looks at whether hpo.run has exited.
POLL_S = 1.0
# Times a task is re-queued after reaching its time limit.
MAX_REQUEUES = 3


@dataclass(frozen=True)
class SlurmRequest:
    """What the array asks Slurm for; every task gets the same."""

    workers: int  # array tasks
    gpus_per_worker: int  # 0: CPU workers
    cpus_per_worker: int
    time_min: int  # time limit of each task, minutes
    log_dir: Path  # submitit's folder: pickled tasks and their logs (on a filesystem every node sees)
    job_name: str
    partition: str | None = None
    mem: str | None = None  # per task, Slurm's --mem syntax (16G)
    account: str | None = None
    max_parallel: int | None = None  # array tasks running at once, at most
    sbatch_options: tuple[tuple[str, str], ...] = ()  # any other sbatch option: (name, value)


@dataclass(frozen=True)
class SubmittedArray:
    job_id: str  # the array's id; task i is f"{job_id}_{i}"
    task_ids: tuple[str, ...]
    log_dir: Path


class WorkerTask(submitit.helpers.Checkpointable):
    """One array task: ``python -m hpo.run ARGV`` as a child process, stopped cleanly on a time limit."""

    def __init__(self, *, python: str, run_argv: tuple[str, ...]) -> None:
        self.python = python
        self.run_argv = run_argv
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return run_command(self.run_argv, python=self.python)

    def __call__(self) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # One thread per core Slurm gave the task, not one per core of the node.
        env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        print(f"hpo worker: {shlex.join(self.command())}", flush=True)
        self._process = subprocess.Popen(self.command(), env=env, preexec_fn=_ignore_time_limit_warning)
        # Polled, not waited on: checkpoint() runs in a signal handler on this thread and must be able
        # to wait for the child itself (a blocking Popen.wait here would hold its lock meanwhile).
        while (code := self._process.poll()) is None:
            time.sleep(POLL_S)
        self._process = None
        if code != 0:
            # The task ends with hpo.run's exit code (143 after scancel), which Slurm records.
            print(f"hpo worker: python -m hpo.run exited with code {code}", flush=True)
            sys.exit(code if code > 0 else 128 - code)
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (time limit near, or preemption): stop hpo.run, then re-queue."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
        self._process = None
        return submitit.helpers.DelayedSubmission(WorkerTask(python=self.python, run_argv=self.run_argv))

    def __getstate__(self) -> dict[str, object]:
        # A running child process cannot be pickled; a re-queued task starts its own.
        return {"python": self.python, "run_argv": self.run_argv, "_process": None}


def _ignore_time_limit_warning() -> None:
    """In the child: Slurm sends SIGUSR2 to every process of the task, whose default action is to die
    on the spot (leaving the trial RUNNING); the parent handles it and stops the child with SIGTERM."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def submit_array(request: SlurmRequest, *, task_argvs: Sequence[Sequence[str]], storage_url: str) -> SubmittedArray:
    """Queue one array task per entry of ``task_argvs`` (hpo.run's arguments for that task) against ``storage_url``.

    Raises ``submitit.core.utils.FailedJobError`` when sbatch refuses the job, ``FileNotFoundError``
    when there is no sbatch here.
    """
    executor = submitit.SlurmExecutor(folder=request.log_dir / "%j", max_num_timeout=MAX_REQUEUES)
    additional: dict[str, object] = {"requeue": True, **dict(request.sbatch_options)}
    if request.account is not None:
        additional["account"] = request.account
    executor.update_parameters(
        job_name=request.job_name,
        time=request.time_min,
        cpus_per_task=request.cpus_per_worker,
        signal_delay_s=SIGNAL_DELAY_S,
        stderr_to_stdout=True,
        additional_parameters=additional,
        **({"partition": request.partition} if request.partition else {}),
        **({"gpus_per_task": request.gpus_per_worker} if request.gpus_per_worker else {}),
        **({"mem": request.mem} if request.mem else {}),
        **({"array_parallelism": request.max_parallel} if request.max_parallel else {}),
    )
    tasks = [WorkerTask(python=sys.executable, run_argv=tuple(argv)) for argv in task_argvs]
    # sbatch hands its environment to the tasks (Slurm's default --export=ALL): the URL travels there.
    saved = os.environ.get("HPO_STORAGE")
    os.environ["HPO_STORAGE"] = storage_url
    try:
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    finally:
        if saved is None:
            del os.environ["HPO_STORAGE"]
        else:
            os.environ["HPO_STORAGE"] = saved
    task_ids = tuple(job.job_id for job in jobs)
    return SubmittedArray(job_id=task_ids[0].split("_")[0], task_ids=task_ids, log_dir=request.log_dir)
