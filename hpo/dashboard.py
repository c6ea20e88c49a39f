"""``python -m hpo.dashboard``: optuna-dashboard on the study storage.

optuna-dashboard is an optional extra (``pip install -e ".[dashboard]"``).  Without it the command
says how to install it.  The notes it shows on pruned trials are written by :mod:`hpo.tuning.notes`.
It serves the artifact store too (``--artifacts``, hpo.tuning.artifacts): the models hpo.best saved,
the reports' files and any uploaded checkpoints, on the study's and trials' pages.
"""

from __future__ import annotations

import argparse
import logging
import sys
import wsgiref.simple_server
from collections.abc import Sequence
from pathlib import Path
from socketserver import ThreadingMixIn

from hpo.cli import Parser, guarded
from hpo.cli import port as port_number
from hpo.errors import UsageError

logger = logging.getLogger("hpo.dashboard")  # not __name__: that is "__main__" under python -m

PROG = "hpo.dashboard"
DEFAULT_HOST = "127.0.0.1"  # this machine only: the dashboard can rename and delete studies
DEFAULT_PORT = 8080
INSTALL_HINT = "pip install -e \".[dashboard]\" (or pip install optuna-dashboard)"


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
    parser.add_argument(
        "--artifacts", help="Optuna artifact store to show (hpo.best's models, hpo.report's files, uploaded checkpoints): "
        "a folder, s3://bucket/prefix or none (default: beside a SQLite file, e.g. hpo-artifacts/, else "
        "./hpo-artifacts, when it exists)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every HTTP request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="[%(levelname).1s %(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("hpo").setLevel(logging.DEBUG if args.verbose else logging.INFO)
        return serve(storage_flag=args.storage, host=args.host, port=args.port, artifacts=args.artifacts)

    return guarded(PROG, body)


def serve(*, storage_flag: str | None, host: str, port: int, artifacts: str | None = None) -> int:
    """Serve until Ctrl-C; bad storage, a missing optuna-dashboard or a busy port raise HpoError first.
    ``artifacts``: the artifact store (--artifacts); None: the default folder beside the storage if it exists."""
    from hpo.tuning.artifacts import default_location, open_artifacts
    from hpo.tuning.storage import check_existing_storage, open_storage, redact, resolve_storage

    url, source = resolve_storage(storage_flag)
    check_existing_storage(url, source)
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError(f"optuna-dashboard is not installed: {INSTALL_HINT}") from None
    import optuna

    storage = open_storage(url, source)
    names = sorted(optuna.get_all_study_names(storage))
    # Not created here: a dashboard that finds no artifact folder shows the studies without one.
    store = open_artifacts(artifacts, url) if artifacts is not None or Path(default_location(url)).is_dir() else None
    app = optuna_dashboard.wsgi(storage, artifact_store=store.store if store is not None else None)
    try:
        server = wsgiref.simple_server.make_server(
            host, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise UsageError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    print(
        f"optuna-dashboard for {redact(url)} ({len(names)} studies: {', '.join(names) or 'none yet'}) "
        f"{f'with artifacts in {store.shown} ' if store is not None else ''}"
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
