"""Errors a user can fix. ``hpo.run`` prints each as one line on stderr and exits with code 2."""

from __future__ import annotations


class HpoError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class SpecError(HpoError):
    """A study file that cannot be read or does not validate; the message names the file and key."""


class UsageError(HpoError):
    """A command-line flag with a bad value; the message names the flag."""


class DataError(HpoError):
    """A dataset that cannot be found or read; the message says where it looked."""


class StorageError(HpoError):
    """A storage URL that cannot be parsed or reached; the message never shows a password."""


class StorageUnavailable(Exception):
    """The storage stayed unreachable for longer than ``--storage-patience``: exit code 75, not 2.

    Not an HpoError: nothing is wrong with the input, and the same command run later succeeds (the
    running trial is re-queued by the next worker that reaches the storage, and resumes from its
    checkpoint).
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that Optuna ends a running trial as FAIL, not RUNNING."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (the driver's, PIL's, torchvision's), or its type when it has none.

    Messages from libraries run to several lines (SQL, tracebacks of the server); a one-line error
    shows only the first.
    """
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
