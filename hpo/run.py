"""``python -m hpo.run``: run (or resume) a study until it has ``--n-trials`` finished trials.

argv → study file → checks (flags, storage, data) → study → data on the device once → optimize → summary.
Every problem a user can fix is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hpo import cli
from hpo.errors import UsageError
from hpo.spec import StudySpec, find_study, load_spec

if TYPE_CHECKING:  # imported lazily below: a bad flag should fail fast, before torch loads
    import optuna
    import torch

    from hpo.train import EpochResult

logger = logging.getLogger("hpo.run")

PROG = "hpo.run"


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
    parser.add_argument("--device", type=cli.device, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--seed", type=cli.non_negative_int, help="sampler and trial seed (overrides [study] seed)")
    parser.add_argument("--study-name", help="name of the study in the storage (overrides [study] name)")
    parser.add_argument("--max-epochs", type=cli.positive_int, help="epochs per trial at most (overrides [train] max_epochs)")
    parser.add_argument(
        "--gpus", help="start one worker process per GPU: 'all' or a list like 0,2,3 (no GPU: CPU workers)",
    )
    parser.add_argument(
        "--workers-per-gpu", type=cli.positive_int, default=1,
        help="worker processes per GPU (or on the CPU when there is none); default 1",
    )
    parser.add_argument("--checkpoint-dir", help="where running trials keep their last-epoch checkpoint (default: beside the SQLite file, else ./hpo-checkpoints)")
    parser.add_argument(
        "--heartbeat-interval", type=cli.positive_int, default=10,
        help="seconds between a running trial's heartbeats in the storage (default 10)",
    )
    parser.add_argument(
        "--grace-period", type=cli.positive_int,
        help="seconds without a heartbeat after which a trial is failed and re-queued (default 3 x interval)",
    )
    parser.add_argument("--worker-index", type=cli.non_negative_int, help=argparse.SUPPRESS)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch of every trial")
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and the summary only")
    return parser


def apply_overrides(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """The study file with the command-line overrides applied (flags win)."""
    study, data, train = spec.study, spec.data, spec.train
    if args.study_name is not None:
        if not args.study_name.strip():
            raise UsageError("argument --study-name: must not be empty")
        study = dataclasses.replace(study, name=args.study_name)
    if args.seed is not None:
        study = dataclasses.replace(study, seed=args.seed)
    if args.data_dir is not None:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    if args.device is not None:
        train = dataclasses.replace(train, device=args.device)
    if args.max_epochs is not None:
        train = dataclasses.replace(train, max_epochs=args.max_epochs)
    return dataclasses.replace(spec, study=study, data=data, train=train)


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    import optuna

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="[%(levelname).1s %(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hpo").setLevel(level)
    # Optuna's own handler would bypass ours (and the progress bars): send its records through root.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.WARNING if quiet else logging.INFO)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for handler in logging.getLogger().handlers:  # handler filters see records of every child logger
        handler.addFilter(_drop_interrupt_traceback)


def _drop_interrupt_traceback(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C/SIGTERM with a traceback; the one-line message is enough."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = None
        record.exc_text = None
    return True


def resolve_device(requested: str, source: str) -> torch.device:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{source}: device {requested!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{source}: device {requested!r} does not exist ({torch.cuda.device_count()} GPUs)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{source}: device {requested!r} asked for, but MPS is not available here")
    return device


class Progress:
    """A bar over the study's budget with the best value so far, and a bar over each trial's epochs.

    Bars draw only on a terminal (tqdm's ``disable=None``); elsewhere, log lines tell the story.
    """

    def __init__(self, *, total: int, done: int, max_epochs: int, metric: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.metric = metric
        self.max_epochs = max_epochs
        self.disable = None if enabled else True
        self.trials = tqdm(total=total, initial=done, desc="trials", unit="trial", disable=self.disable, position=0)
        self.epochs = None
        self.trial_number = -1

    def on_epoch(self, trial_number: int, result: EpochResult) -> None:
        if trial_number != self.trial_number:
            if self.epochs is not None:
                self.epochs.close()
            self.trial_number = trial_number
            self.epochs = self._tqdm(
                total=self.max_epochs, desc=f"trial {trial_number}", unit="epoch", leave=False,
                disable=self.disable, position=1,
            )
        assert self.epochs is not None
        self.epochs.update(1)
        self.epochs.set_postfix(val_loss=f"{result.val_loss:.4f}", val_acc=f"{result.val_accuracy:.3f}", refresh=False)
        logger.debug(
            "trial %d epoch %d: train_loss %.4f val_loss %.4f val_accuracy %.4f (%.1f s, %.0f img/s)",
            trial_number, result.epoch, result.train_loss, result.val_loss, result.val_accuracy,
            result.seconds, result.images_per_second,
        )

    def on_trial_end(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from hpo.study import FINISHED_STATES

        if self.epochs is not None:
            self.epochs.close()
            self.epochs = None
        if trial.state in FINISHED_STATES:
            self.trials.update(1)
        try:
            self.trials.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:
            pass  # no completed trial yet

    def close(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
        self.trials.close()


def _format_value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_summary(study: optuna.Study, *, storage_shown: str, metric: str, seconds: float, ran: int) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by_state = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    states = ", ".join(f"{name} {count}" for name, count in by_state.items() if count)
    print(f"Study {study.study_name!r} in {storage_shown}: {len(trials)} trials ({states or 'none'})")
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        accuracy = best.user_attrs.get("val_accuracy")
        shown = f", val_accuracy {accuracy:.2%}" if isinstance(accuracy, float) else ""
        print(f"Best trial {best.number}: {metric} {best.value:.4f}{shown} (epoch {best.user_attrs.get('best_epoch', '?')})")
        for name, value in best.params.items():
            print(f"  {name} = {_format_value(value)}")
    else:
        print("No completed trial yet.")
    training = sum((t.duration.total_seconds() for t in trials if t.duration is not None), 0.0)
    print(f"Time: {seconds:.1f} s in this run ({ran} trials); {training:.1f} s in all trials of the study")
    print(f"Watch it: optuna-dashboard {storage_shown}")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()

    def body() -> int:
        args = build_parser().parse_args(argv)
        spec = apply_overrides(load_spec(find_study(args.study)), args)
        configure_logging(verbose=args.verbose, quiet=args.quiet)
        # On Ctrl-C/SIGTERM Optuna marks the running trial FAIL and the worker re-queues it.
        return _run(spec, args, started)

    return cli.guarded(PROG, body)


def parse_gpus(text: str, available: int) -> tuple[str, ...]:
    """``--gpus all`` or ``--gpus 0,2,3`` → GPU ids; () means CPU workers (all, on a machine without GPUs)."""
    if text == "all":
        return tuple(str(i) for i in range(available))
    ids = text.split(",")
    if not all(i.strip().isdigit() for i in ids):
        raise UsageError(f"argument --gpus: must be 'all' or a list like 0,2,3, got {text!r}")
    missing = [i.strip() for i in ids if int(i) >= available]
    if missing:
        raise UsageError(f"argument --gpus: GPU {missing[0]} does not exist here ({available} GPUs), got {text!r}")
    return tuple(dict.fromkeys(i.strip() for i in ids))


def _worker_argv(spec: StudySpec, args: argparse.Namespace, checkpoint_dir: Path) -> list[str]:
    """The hpo.run arguments each launched worker gets (storage travels in HPO_STORAGE instead)."""
    argv = ["--study", str(spec.path.resolve()), "--n-trials", str(args.n_trials), "--study-name", spec.study.name]
    argv += ["--checkpoint-dir", str(checkpoint_dir.resolve()), "--heartbeat-interval", str(args.heartbeat_interval)]
    for flag, value in (
        ("--timeout", args.timeout), ("--data-dir", args.data_dir), ("--seed", args.seed),
        ("--max-epochs", args.max_epochs), ("--grace-period", args.grace_period),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.verbose:
        argv.append("--verbose")
    return argv


# SQLite lets one writer at a time; past this many local workers use PostgreSQL or MySQL.
SQLITE_MAX_WORKERS = 8


def _run(spec: StudySpec, args: argparse.Namespace, started: float) -> int:
    # Checks first, cheapest first, so that bad input never leaves anything in the storage.
    from hpo.study import (
        check_storage, count_finished, default_checkpoint_dir, open_storage, open_study, redact, resolve_storage,
        sqlite_path,
    )

    storage_url, storage_source = resolve_storage(args.storage)
    check_storage(storage_url, storage_source)
    launching = args.gpus is not None or args.workers_per_gpu > 1
    if launching and args.worker_index is not None:
        raise UsageError("argument --gpus/--workers-per-gpu: not allowed together with --worker-index")
    if launching and args.device is not None:
        raise UsageError("argument --device: not allowed with --gpus/--workers-per-gpu (each worker gets its own)")
    if launching:
        import torch

        gpus = parse_gpus(args.gpus or "all", torch.cuda.device_count())
        workers = max(1, len(gpus)) * args.workers_per_gpu
        if sqlite_path(storage_url) is not None and workers > SQLITE_MAX_WORKERS:
            raise UsageError(
                f"argument --workers-per-gpu: {workers} workers on SQLite; at most {SQLITE_MAX_WORKERS} "
                "(use a PostgreSQL or MySQL --storage for more)"
            )
        device = None
    else:
        device = resolve_device(spec.train.device, "--device" if args.device else f"{spec.path}: [train] device")

    from hpo.data import carve_validation, load_dataset

    dataset = load_dataset(spec.data)  # launching: decodes and caches once, before the workers start
    storage = open_storage(
        storage_url, storage_source, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period
    )
    worker_index = args.worker_index or 0
    study = open_study(spec, storage, worker_index=worker_index)
    storage_shown = redact(storage_url)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(storage_url)
    standalone = args.worker_index is None  # not one of a launcher's workers
    done = count_finished(study)
    if done >= args.n_trials:
        logger.info("the study already has %d finished trials (budget %d): nothing to run", done, args.n_trials)
        if standalone:
            print_summary(study, storage_shown=storage_shown, metric=spec.study.metric, seconds=time.perf_counter() - started, ran=0)
        return 0
    before = len(study.trials)

    if launching:
        from hpo.launcher import launch, plan_workers

        del dataset  # the workers load it from the cache; the launcher need not hold it

        plan = plan_workers(gpus=gpus, per_gpu=args.workers_per_gpu, common_argv=_worker_argv(spec, args, checkpoint_dir))
        code = launch(plan, storage_url=storage_url, study=study, budget=args.n_trials, show_progress=not args.quiet)
        print_summary(
            study, storage_shown=storage_shown, metric=spec.study.metric,
            seconds=time.perf_counter() - started, ran=len(study.trials) - before,
        )
        return code

    assert device is not None
    search_data = carve_validation(dataset, spec.data)
    logger.info(
        "%s: %d training and %d validation images of %s (test set held out), %d classes",
        spec.study.name, len(search_data.train), len(search_data.val), dataset.source, search_data.num_classes,
    )
    logger.info("running up to %d more trials on %s (budget %d, %d finished)", args.n_trials - done, device, args.n_trials, done)

    from tqdm.contrib.logging import logging_redirect_tqdm

    from hpo.objective import Objective
    from hpo.worker import run_worker

    progress = Progress(
        total=args.n_trials, done=done, max_epochs=spec.train.max_epochs, metric=spec.study.metric,
        enabled=not args.quiet and standalone,
    )
    objective = Objective(
        spec=spec, data=search_data.to(device), device=device, checkpoint_dir=checkpoint_dir,
        budget=args.n_trials, on_epoch=progress.on_epoch,
    )
    try:
        with logging_redirect_tqdm():
            run_worker(
                study, objective, budget=args.n_trials, timeout=args.timeout,
                heartbeat_interval=args.heartbeat_interval, callbacks=[progress.on_trial_end],
            )
    finally:
        progress.close()
    if standalone:
        print_summary(
            study, storage_shown=storage_shown, metric=spec.study.metric,
            seconds=time.perf_counter() - started, ran=len(study.trials) - before,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
