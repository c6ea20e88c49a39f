"""What every ``python -m hpo.*`` command shares: one-line argument errors, exit codes, flag types, logging.

A problem a user can fix is one line on stderr, ``PROG: error: ...``, and exit code 2, no traceback;
Ctrl-C is exit code 130.  Flag values are checked by the ``type=`` converters below, so a bad value
is reported by argparse under the flag's name.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import NoReturn, TypeVar

from hpo.errors import HpoError, StorageUnavailable, Terminated, UsageError
from hpo.folders import writable_folder  # noqa: F401 (the commands' name for it)
from hpo.studyfile.spec import check_device

# Exit codes: bad input; the storage gone for longer than --storage-patience (sysexits' EX_TEMPFAIL:
# try again later); interrupted or terminated (128 + SIGINT or SIGTERM, as shells report them).
EXIT_USAGE = 2
EXIT_STORAGE_UNAVAILABLE = 75
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

T = TypeVar("T")


def version() -> str:
    """hpo's version: the installed distribution's, else (a source checkout on PYTHONPATH) ``hpo.__version__``."""
    try:
        return importlib.metadata.version("hpo")
    except importlib.metadata.PackageNotFoundError:
        import hpo

        return hpo.__version__


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), handled like every HpoError; every command
    (and sub-command) it builds has ``--version``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.add_argument("--version", action="version", version=f"hpo {version()}", help="print hpo's version, exit")

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: an HpoError becomes one line on stderr and exit code 2, a storage gone for
    too long exit code 75; Ctrl-C exits 130 and SIGTERM (raised as Terminated) 143, each with one line."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return body()
    except HpoError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageUnavailable as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_STORAGE_UNAVAILABLE
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _checked(convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    """A ``type=`` converter: ``convert`` the text, accept it if ``ok``, else say what was ``expected``."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
non_negative_int = _checked(int, lambda value: value >= 0, "an integer >= 0")
positive_seconds = _checked(float, lambda value: value > 0, "a number of seconds > 0")  # NaN is refused too
port = _checked(int, lambda value: 1 <= value <= 65535, "a port number from 1 to 65535")


def device(text: str) -> str:
    problem = check_device(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_study_flags(parser: argparse.ArgumentParser) -> None:
    """``--study``, ``--storage`` and ``--study-name``, which name a study exactly as hpo.run does."""
    parser.add_argument("--study", required=True, help="study name in studies/ (e.g. cifar) or path to a .toml file")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: $HPO_STORAGE or sqlite:///hpo.db)")
    parser.add_argument("--study-name", help="name of the study in the storage (overrides [study] name)")


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Log lines of hpo (INFO; DEBUG with verbose, WARNING when quiet) and Optuna through one root handler."""
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
