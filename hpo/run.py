"""``python -m hpo.run``: run (or resume) a study until it has ``--n-trials`` finished trials.

argv → study file → checks (flags, storage, data) → study → data on the device once → optimize → summary.
Every problem a user can fix is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpo.cli import Parser as _Parser
from hpo.cli import device as _device
from hpo.cli import guarded
from hpo.cli import non_negative_int as _non_negative_int
from hpo.cli import positive_int as _positive_int
from hpo.cli import positive_seconds as _positive_seconds
from hpo.errors import UsageError
from hpo.spec import StudySpec, find_study, load_spec

if TYPE_CHECKING:  # imported lazily below: a bad flag should fail fast, before torch loads
    import optuna
    import torch

    from hpo.train import EpochResult

logger = logging.getLogger("hpo.run")

PROG = "hpo.run"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Run or resume an Optuna hyperparameter search over CNNs described by a study file.",
    )
    parser.add_argument("--study", required=True, help="study name in studies/ (e.g. cifar) or path to a .toml file")
    parser.add_argument(
        "--n-trials", type=_positive_int, required=True,
        help="total budget: finished (complete or pruned) trials the study should have; a resumed study runs only the rest",
    )
    parser.add_argument("--timeout", type=_positive_seconds, help="stop starting new trials after this many seconds")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: $HPO_STORAGE or sqlite:///hpo.db)")
    parser.add_argument("--device", type=_device, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--seed", type=_non_negative_int, help="sampler and trial seed (overrides [study] seed)")
    parser.add_argument("--study-name", help="name of the study in the storage (overrides [study] name)")
    parser.add_argument("--max-epochs", type=_positive_int, help="epochs per trial at most (overrides [train] max_epochs)")
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
        return _run(spec, args, started)

    return guarded(PROG, body)


def _run(spec: StudySpec, args: argparse.Namespace, started: float) -> int:
    # Checks first, cheapest first, so that bad input never leaves anything in the storage.
    from hpo.study import check_storage, count_finished, open_storage, open_study, redact, resolve_storage

    storage_url, storage_source = resolve_storage(args.storage)
    check_storage(storage_url, storage_source)
    device = resolve_device(spec.train.device, "--device" if args.device else f"{spec.path}: [train] device")

    from hpo.data import carve_validation, load_dataset

    dataset = load_dataset(spec.data)
    search_data = carve_validation(dataset, spec.data)
    logger.info(
        "%s: %d training and %d validation images of %s (test set held out), %d classes",
        spec.study.name, len(search_data.train), len(search_data.val), dataset.source, search_data.num_classes,
    )

    storage = open_storage(storage_url, storage_source)
    study = open_study(spec, storage, seed=spec.study.seed)
    storage_shown = redact(storage_url)
    done = count_finished(study)
    if done >= args.n_trials:
        logger.info("the study already has %d finished trials (budget %d): nothing to run", done, args.n_trials)
        print_summary(study, storage_shown=storage_shown, metric=spec.study.metric, seconds=time.perf_counter() - started, ran=0)
        return 0
    logger.info("running up to %d more trials on %s (budget %d, %d finished)", args.n_trials - done, device, args.n_trials, done)

    import optuna

    from hpo.objective import Objective
    from hpo.study import FINISHED_STATES

    progress = Progress(total=args.n_trials, done=done, max_epochs=spec.train.max_epochs, metric=spec.study.metric, enabled=not args.quiet)
    objective = Objective(spec=spec, data=search_data.to(device), device=device, on_epoch=progress.on_epoch)
    before = len(study.trials)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            study.optimize(
                objective,
                timeout=args.timeout,
                # The budget is the study's, not this process's: stop once it has n finished trials.
                callbacks=[optuna.study.MaxTrialsCallback(args.n_trials, states=FINISHED_STATES), progress.on_trial_end],
                gc_after_trial=False,
            )
    finally:
        progress.close()
    print_summary(
        study, storage_shown=storage_shown, metric=spec.study.metric,
        seconds=time.perf_counter() - started, ran=len(study.trials) - before,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
