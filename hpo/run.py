"""``python -m hpo.run``: run (or resume) a study until it has ``--n-trials`` finished trials.

argv → :func:`hpo.launching.run_args.parse_run_args` → :func:`hpo.launching.session.run_search` (checks, study,
trials) with progress bars → summary.
Every problem a user can fix is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hpo import cli
from hpo.cli import configure_logging
from hpo.launching.run_args import PROG, RunRequest, parse_run_args
from hpo.studyfile.spec import StudySpec

if TYPE_CHECKING:  # imported lazily below: a bad flag should fail fast, before torch loads
    import optuna

    from hpo.launching.session import SearchResult
    from hpo.training.config import EpochResult

logger = logging.getLogger("hpo.run")


class Progress:
    """A bar over the study's budget with the best value so far, and a bar over each trial's epochs.

    Bars draw only on a terminal (tqdm's ``disable=None``); elsewhere, log lines tell the story.
    """

    def __init__(self, *, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.max_epochs = 0  # per trial: known once the study file and its overrides are
        self.disable = None if enabled else True
        self.trials = None
        self.epochs = None
        self.trial_number = -1
        self._redirect: contextlib.AbstractContextManager[None] | None = None

    def start(self, spec: StudySpec, total: int, done: int) -> None:
        """Trials are about to run: a bar over the budget, from the trials finished; log lines print above the bars."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.max_epochs = spec.train.max_epochs
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
        from hpo.tuning.budget import FINISHED_STATES

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
        except RuntimeError:  # multi-objective: no single best value
            self.trials.set_postfix(pareto_front=len(study.best_trials))

    def close(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
        if self.trials is not None:
            self.trials.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)


def print_summary(result: SearchResult, *, seconds: float) -> None:
    from hpo.results.summary import summarize, summary_lines

    summary = summarize(
        result.study, storage_shown=result.storage_shown, metric=result.spec.study.metric,
        max_epochs=result.spec.train.max_epochs,
    )
    for line in summary_lines(summary):
        print(line)
    print(f"Time: {seconds:.1f} s in this run ({result.ran} trials)")
    print(f"Watch it: optuna-dashboard {result.storage_shown}")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()

    def body() -> int:
        request = parse_run_args(argv)
        configure_logging(verbose=request.settings.verbose, quiet=request.settings.quiet)
        # On Ctrl-C/SIGTERM Optuna marks the running trial FAIL and the worker re-queues it.
        return _run(request, started)

    return cli.guarded(PROG, body)


def _run(request: RunRequest, started: float) -> int:
    from hpo.launching.session import Listeners, run_search

    quiet = request.settings.quiet
    standalone = request.settings.worker_index is None  # not one of a launcher's workers
    progress = Progress(enabled=not quiet and standalone)
    listeners = Listeners(
        on_start=progress.start, on_epoch=progress.on_epoch, on_trial_end=[progress.on_trial_end],
        show_launcher_progress=not quiet,
    )
    try:
        result = run_search(request, listeners)
    finally:
        progress.close()
    if standalone:
        print_summary(result, seconds=time.perf_counter() - started)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
