"""``python -m hpo.run``: run (or resume) a study until it has ``--n-trials`` finished trials.

argv → study file → :func:`hpo.searching.run_search` (checks, study, trials) with progress bars → summary.
Every problem a user can fix is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpo import cli
from hpo.cli import configure_logging
from hpo.run_flags import PROG, build_parser
from hpo.spec import Overrides, StudySpec, find_study, load_spec

if TYPE_CHECKING:  # imported lazily below: a bad flag should fail fast, before torch loads
    import optuna

    from hpo.train import EpochResult

logger = logging.getLogger("hpo.run")


class Progress:
    """A bar over the study's budget with the best value so far, and a bar over each trial's epochs.

    Bars draw only on a terminal (tqdm's ``disable=None``); elsewhere, log lines tell the story.
    """

    def __init__(self, *, max_epochs: int, metric: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.metric = metric
        self.max_epochs = max_epochs
        self.disable = None if enabled else True
        self.trials = None
        self.epochs = None
        self.trial_number = -1
        self._redirect: contextlib.AbstractContextManager[None] | None = None

    def start(self, total: int, done: int) -> None:
        """Trials are about to run: a bar over the budget, from the trials finished; log lines print above the bars."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.trials = self._tqdm(total=total, initial=done, desc="trials", unit="trial", disable=self.disable, position=0)
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

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
        if self.trials is None:
            return
        if trial.state in FINISHED_STATES:
            self.trials.update(1)
        try:
            self.trials.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:
            pass  # no completed trial yet

    def close(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
        if self.trials is not None:
            self.trials.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)


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
        overrides = Overrides(
            study_name=args.study_name, seed=args.seed, data_dir=args.data_dir, device=args.device,
            max_epochs=args.max_epochs,
        )
        spec = load_spec(find_study(args.study))
        configure_logging(verbose=args.verbose, quiet=args.quiet)
        # On Ctrl-C/SIGTERM Optuna marks the running trial FAIL and the worker re-queues it.
        return _run(spec, overrides, args, started)

    return cli.guarded(PROG, body)


def _run(spec: StudySpec, overrides: Overrides, args: argparse.Namespace, started: float) -> int:
    from hpo.searching import Listeners, SearchSettings, run_search

    settings = SearchSettings(
        n_trials=args.n_trials, storage=args.storage, timeout=args.timeout, checkpoint_dir=args.checkpoint_dir,
        gpus=args.gpus, workers_per_gpu=args.workers_per_gpu, heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period, storage_patience=args.storage_patience, worker_index=args.worker_index,
        verbose=args.verbose,
    )
    standalone = args.worker_index is None  # not one of a launcher's workers
    effective = overrides.apply(spec)
    metric = effective.study.metric
    progress = Progress(max_epochs=effective.train.max_epochs, metric=metric, enabled=not args.quiet and standalone)
    listeners = Listeners(
        on_start=progress.start, on_epoch=progress.on_epoch, on_trial_end=[progress.on_trial_end],
        show_launcher_progress=not args.quiet,
    )
    try:
        result = run_search(spec, overrides, settings, listeners)
    finally:
        progress.close()
    if standalone:
        print_summary(
            result.study, storage_shown=result.storage_shown, metric=metric,
            seconds=time.perf_counter() - started, ran=result.ran,
        )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
