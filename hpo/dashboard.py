"""``python -m hpo.dashboard``: optuna-dashboard on the study storage; and the notes it shows on pruned trials.

optuna-dashboard is an optional extra (``pip install -e ".[dashboard]"``).  Without it the command
says how to install it, and :func:`note_pruned` writes nothing: the ``pruned_reason`` user attr
still says why a trial was pruned.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import wsgiref.simple_server
from collections.abc import Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING

from hpo.cli import Parser, guarded
from hpo.cli import port as port_number
from hpo.errors import UsageError

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger("hpo.dashboard")  # not __name__: that is "__main__" under python -m

PROG = "hpo.dashboard"
DEFAULT_HOST = "127.0.0.1"  # this machine only: the dashboard can rename and delete studies
DEFAULT_PORT = 8080
INSTALL_HINT = "pip install -e \".[dashboard]\" (or pip install optuna-dashboard)"


# Why the pruners without one comparable threshold stop a trial, in a user's words.
_WHY = {
    "SuccessiveHalvingPruner": "it was not among the best share of the trials that reached this epoch's rung",
    "HyperbandPruner": "it was not among the best share of its bracket's trials at this epoch's rung",
    "PatientPruner": "its best value had not improved for the pruner's patience (in epochs)",
    "ThresholdPruner": "its value was outside the pruner's bounds, or not finite",
}


def pruning_note(trial: optuna.Trial, *, epoch: int, value: float, best: float, metric: str) -> str:
    """Markdown saying why ``trial`` was pruned at ``epoch``: its values and what the pruner compared them to."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    study = trial.study
    pruner = study.pruner
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    lines = [
        f"**Pruned at epoch {epoch}** by {type(pruner).__name__}.",
        "",
        f"- {metric} at epoch {epoch}: {value:.4f}; best so far: {best:.4f}",
    ]
    # MedianPruner is the 50th percentile; a PercentilePruner keeps its percentile in a private field.
    percentile = 50.0 if isinstance(pruner, optuna.pruners.MedianPruner) else getattr(pruner, "_percentile", None)
    if isinstance(pruner, optuna.pruners.PercentilePruner) and isinstance(percentile, (int, float)):
        # What PercentilePruner.prune compares: this trial's best value so far against that percentile of
        # the completed trials' values at the same epoch (for maximizing, the mirrored percentile).
        others = [
            t.intermediate_values[epoch]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if epoch in t.intermediate_values and math.isfinite(t.intermediate_values[epoch])
        ]
        if others:
            effective = percentile if minimize else 100 - percentile
            threshold = float(np.percentile(others, effective))
            name = "median" if effective == 50 else f"{effective:g}th percentile"
            lines.append(
                f"- threshold: the {name} {threshold:.4f} of the {len(others)} completed trials' {metric} at epoch {epoch}; "
                f"the best so far is {'above' if minimize else 'below'} it"
            )
    else:
        why = _WHY.get(type(pruner).__name__, "the pruner stopped it")
        lines.append(f"- why: {why}; this pruner has no single threshold to show")
    return "\n".join(lines)


def note_pruned(trial: optuna.Trial, *, epoch: int, value: float, best: float, metric: str) -> None:
    """Attach :func:`pruning_note` to the trial for optuna-dashboard; nothing when it is not installed."""
    try:
        import optuna_dashboard
    except ImportError:
        return  # the pruned_reason user attr carries the short version
    optuna_dashboard.save_note(trial, pruning_note(trial, epoch=epoch, value=value, best=best, metric=metric))


class _ThreadedServer(ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """One thread per request: the dashboard polls while a page loads its assets."""

    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    """Request lines go to the hpo.dashboard logger at DEBUG level (-v), not to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        logger.debug(format, *args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"python -m {PROG}", description="Serve optuna-dashboard on the study storage.")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: $HPO_STORAGE or sqlite:///hpo.db)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port to listen on (default: {DEFAULT_PORT})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every HTTP request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="[%(levelname).1s %(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("hpo").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        return serve(storage_flag=args.storage, host=args.host, port=args.port)

    return guarded(PROG, body)


def serve(*, storage_flag: str | None, host: str, port: int) -> int:
    """Serve until Ctrl-C; bad storage, a missing optuna-dashboard or a busy port raise HpoError first."""
    from hpo.study import check_existing_storage, open_storage, redact, resolve_storage

    url, source = resolve_storage(storage_flag)
    check_existing_storage(url, source)
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError(f"optuna-dashboard is not installed: {INSTALL_HINT}") from None
    import optuna

    storage = open_storage(url, source)
    names = sorted(optuna.get_all_study_names(storage))
    try:
        server = wsgiref.simple_server.make_server(
            host, port, optuna_dashboard.wsgi(storage), server_class=_ThreadedServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise UsageError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    print(
        f"optuna-dashboard for {redact(url)} ({len(names)} studies: {', '.join(names) or 'none yet'}) "
        f"on http://{host}:{port}/dashboard — Ctrl-C stops it",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # the normal way to stop a server
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
