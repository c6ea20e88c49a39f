"""Riding out a storage that goes away: which errors are passing, and how long to keep trying.

A database restart, a failover or a cut network shows up as a connection error on the next storage
call.  ``StorageGuard`` (one per worker process, shared by its threads) retries such calls with capped
exponential backoff and full jitter, logs one warning when the storage goes away and one line when
it is back, and gives up with ``StorageUnavailable`` once the storage has been unreachable for
``patience`` seconds.  The patience window runs from the first failed call of the outage, whichever
thread made it, so a heartbeat that failed first starts the clock for the main loop too.

Start-up races are different: workers started in the same second on a fresh database race to create
the schema and the study, and the losers see "already exists" or duplicate-key errors.
``absorb_start_race`` retries those a few times; the winner's tables and study are then there.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import optuna
import sqlalchemy.exc

from hpo.errors import StorageUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds the first retry waits at most; each further retry doubles it, up to MAX_DELAY_S.
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0
# Seconds an outage may last before a worker gives up (``--storage-patience``).
DEFAULT_PATIENCE_S = 300.0
# Tries at creating the schema and the study before a start-up race is reported as an error.
START_ATTEMPTS = 10

_PASSING = (
    sqlalchemy.exc.OperationalError,  # connection refused or dropped, server shutting down, database locked
    sqlalchemy.exc.InterfaceError,  # the driver's connection object is already closed
    sqlalchemy.exc.TimeoutError,  # no pooled connection came free in time
    sqlalchemy.exc.PendingRollbackError,  # a session whose connection died mid-transaction
)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from (Optuna wraps database errors in StorageInternalError)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__
    return chain


def is_passing(exc: BaseException) -> bool:
    """True for errors that mean "the storage can't be reached right now", not "this call is wrong"."""
    for cause in _causes(exc):
        if isinstance(cause, _PASSING):
            return True
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
            return True
    return False


def reason(exc: BaseException) -> str:
    """The database's own words, first line only (the driver's message, not SQLAlchemy's wrapping)."""
    for cause in reversed(_causes(exc)):
        text = str(getattr(cause, "orig", None) or cause).strip()
        if text:
            return text.splitlines()[0]
    return type(exc).__name__


class StorageGuard:
    """Storage calls that wait out an outage of up to ``patience`` seconds; shared by a worker's threads."""

    def __init__(self, *, shown: str, patience: float = DEFAULT_PATIENCE_S) -> None:
        self.shown = shown  # the URL with its password hidden, for messages
        self.patience = patience
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic seconds when the current outage began
        self._back_at: float | None = None  # monotonic seconds when the last outage ended

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def down_for(self) -> float:
        """Seconds the storage has been unreachable, as far as this process knows (0 while it is reachable)."""
        with self._lock:
            return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def down_within(self, seconds: float) -> bool:
        """True while the storage is unreachable and for ``seconds`` after it came back."""
        with self._lock:
            if self._down_since is not None:
                return True
            return self._back_at is not None and time.monotonic() - self._back_at < seconds

    def _went_down(self, exc: BaseException, what: str) -> float:
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning(
                    "storage %s unreachable (%s, while trying to %s); retrying for up to %.0f s (--storage-patience)",
                    self.shown, reason(exc), what, self.patience,
                )
            return self._down_since

    def _came_back(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            now = time.monotonic()
            logger.warning("storage %s is back after %.1f s", self.shown, now - self._down_since)
            self._down_since = None
            self._back_at = now

    def call(self, what: str, function: Callable[[], T]) -> T:
        """``function()``, retried through an outage; StorageUnavailable once it outlasts the patience.

        ``what`` completes "while trying to …" in the log.  Errors that are not about reaching the
        storage are raised at once.
        """
        delay = FIRST_DELAY_S
        while True:
            try:
                result = function()
            except Exception as exc:
                if not is_passing(exc):
                    raise
                since = self._went_down(exc, what)
                left = since + self.patience - time.monotonic()
                if left <= 0:
                    raise StorageUnavailable(
                        f"storage {self.shown} unreachable for {self.patience:.0f} s (--storage-patience) "
                        f"while trying to {what}: {reason(exc)}"
                    ) from None
                # Full jitter: workers that lost the storage together do not come back in lockstep.
                time.sleep(min(left, random.uniform(0.5 * delay, delay)))
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            self._came_back()
            return result

    def attempt(self, what: str, function: Callable[[], T], *, reads_storage: bool = True) -> tuple[bool, T | None]:
        """One try of ``function()``: (True, result), or (False, None) if the storage is unreachable.

        ``reads_storage=False``: the function may be answered from Optuna's cache, so its success
        does not prove the storage is back.
        """
        try:
            result = function()
        except Exception as exc:
            if not is_passing(exc):
                raise
            self._went_down(exc, what)
            return False, None
        if reads_storage:
            self._came_back()
        return True, result


def absorb_start_race(what: str, function: Callable[[], T]) -> T:
    """``function()``, retried when another process creating the same tables or study got there first.

    On a fresh database every starting worker tries to create Optuna's tables, its version rows and
    the study; the losers get "already exists", duplicate keys or deadlocks.  Trying again finds
    what the winner made.
    """
    for attempt in range(START_ATTEMPTS):
        try:
            return function()
        except (
            sqlalchemy.exc.DBAPIError,
            sqlite3.OperationalError,  # "database is locked" from SQLite itself, outside SQLAlchemy
            optuna.exceptions.StorageInternalError,
            optuna.exceptions.DuplicatedStudyError,
        ) as exc:
            if attempt == START_ATTEMPTS - 1:
                raise
            logger.debug("%s: lost a start-up race (%s); trying again", what, reason(exc))
            time.sleep(random.uniform(0.05, 0.25 * (attempt + 1)))  # seconds; spread the retries apart
    raise AssertionError("unreachable")
