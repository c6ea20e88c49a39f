"""Worker processes on this machine: one per GPU (times ``--workers-per-gpu``), all on one study.

Each worker is ``python -m hpo.run`` with the same study and budget, pinned to its GPU with
``CUDA_VISIBLE_DEVICES``, given its own ``--worker-index`` (so its own sampler seed), and handed the
storage URL through the environment (so a password never shows in ``ps``).  Their output comes
back here line by line, prefixed with the worker's name; a bar over the study's finished trials
combines them.  Ctrl-C or SIGTERM here reaches every worker, which each fail and re-queue their
running trial before exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import optuna

from hpo.errors import Terminated
from hpo.launching.run_args import STOP_GRACE_S, run_command
from hpo.tuning.budget import finished_configurations

logger = logging.getLogger(__name__)

# Seconds between looks at the study for the combined progress bar.
PROGRESS_POLL_S = 2.0


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    gpu: str | None  # the physical GPU id it sees as cuda:0, or None for a CPU worker
    argv: tuple[str, ...]  # hpo.run arguments

    @property
    def name(self) -> str:
        return f"w{self.index} {'gpu' + self.gpu if self.gpu is not None else 'cpu'}"


def plan_workers(
    *, gpus: Sequence[str], per_gpu: int, argv: Callable[..., list[str]]
) -> tuple[WorkerSpec, ...]:
    """One worker per GPU and slot; with no GPU, ``per_gpu`` CPU workers.  ``argv(index=, device=)`` is each
    worker's hpo.run arguments (:func:`hpo.launching.run_args.worker_argv` with the request bound)."""
    slots: list[str | None] = [gpu for gpu in gpus for _ in range(per_gpu)] or [None] * per_gpu
    return tuple(
        WorkerSpec(index=i, gpu=gpu, argv=tuple(argv(index=i, device="cpu" if gpu is None else "cuda")))
        for i, gpu in enumerate(slots)
    )


def _worker_env(worker: WorkerSpec, *, storage_url: str, cpu_workers: int) -> dict[str, str]:
    env = dict(os.environ, HPO_STORAGE=storage_url, PYTHONUNBUFFERED="1")
    if worker.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = worker.gpu
    else:
        # CPU workers share the cores instead of each starting one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, cpu_workers)))
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _pump(name: str, stream: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stderr.write(f"[{name}] {line}")
            sys.stderr.flush()


def _progress(study: optuna.Study, budget: int, done: threading.Event, enabled: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=budget, desc="trials (all workers)", unit="trial", disable=None if enabled else True)
    try:
        while not done.wait(PROGRESS_POLL_S):
            try:
                trials = study.get_trials(deepcopy=False)
            except Exception:  # a passing database hiccup must not end the display
                continue
            finished = finished_configurations(trials)  # a resumed configuration once
            running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
            bar.update(finished - bar.n)
            postfix = {"running": running}
            try:
                postfix["best"] = f"{study.best_value:.4f}"
            except ValueError:
                pass
            except RuntimeError:  # multi-objective: no single best value
                postfix["pareto_front"] = len(study.best_trials)
            bar.set_postfix(postfix)
    finally:
        bar.close()


def _stop(processes: Sequence[subprocess.Popen[str]], signum: int) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def launch(
    workers: Sequence[WorkerSpec], *, storage_url: str, study: optuna.Study, budget: int, show_progress: bool
) -> int:
    """Start the workers, relay their output, wait for them; return the launcher's exit code."""
    lock = threading.Lock()
    cpu_workers = sum(w.gpu is None for w in workers)
    processes: list[subprocess.Popen[str]] = []
    pumps: list[threading.Thread] = []
    for worker in workers:
        process = subprocess.Popen(
            run_command(worker.argv),
            env=_worker_env(worker, storage_url=storage_url, cpu_workers=cpu_workers),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(process)
        pump = threading.Thread(target=_pump, args=(worker.name, process.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    logger.info("started %d workers: %s", len(workers), ", ".join(w.name for w in workers))
    done = threading.Event()
    progress = threading.Thread(target=_progress, args=(study, budget, done, show_progress), daemon=True)
    progress.start()
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        _stop(processes, signum)
        raise
    finally:
        done.set()
        progress.join()
        for pump in pumps:
            pump.join(timeout=5)
    # A worker killed by signal N reports -N; shells say 128 + N.
    failed = [(w.name, code if code >= 0 else 128 - code) for w, code in zip(workers, codes) if code != 0]
    for name, code in failed:
        logger.error("worker %s exited with code %d", name, code)
    return max((code for _, code in failed), default=0)
