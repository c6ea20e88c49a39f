"""Storage URL → Optuna's RDB storage: checked before anything is written, engines tuned per database, passwords hidden.

Where a study lives: ``--storage``, else ``$HPO_STORAGE``, else ``sqlite:///hpo.db``.  Every error
names where the URL came from and shows it with its password as ``***``.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from hpo.errors import StorageError, first_line
from hpo.tuning.outage import StorageGuard, absorb_start_race
from hpo.tuning.retry import STALE_CALLBACK_ARG, retry_callback

logger = logging.getLogger(__name__)

# One file holds many studies, which is what optuna-dashboard expects to be pointed at.
DEFAULT_STORAGE = "sqlite:///hpo.db"
# Seconds a client waits for a database connection before giving up with a clear error.
CONNECT_TIMEOUT_S = 10
# Seconds a server may leave a request unanswered before the connection counts as lost (Optuna's
# queries take milliseconds to seconds; a minute of silence is a dead link).
IO_TIMEOUT_S = 60


def resolve_storage(flag: str | None) -> tuple[str, str]:
    """(url, where it came from): ``--storage``, else ``$HPO_STORAGE``, else the SQLite default."""
    if flag:
        return flag, "--storage"
    if os.environ.get("HPO_STORAGE"):
        return os.environ["HPO_STORAGE"], "HPO_STORAGE"
    return DEFAULT_STORAGE, "default storage"


# What make_url raises on a URL it cannot read: its own error, or a port that is no number (a password
# with an unescaped ":" or "@" moves the host part).
_UNPARSEABLE = (sqlalchemy.exc.ArgumentError, ValueError)


def _make_url(url: str) -> URL:
    """make_url, refusing a host with "@" in it: the rest of a password with an unescaped "@"."""
    parsed = make_url(url)
    if parsed.host is not None and "@" in parsed.host:
        raise ValueError("an '@' in the host part")
    return parsed


def _mask(url: str) -> str:
    """An unparseable URL with everything between "://" (or its start) and its last "@" (user and password) as ***."""
    if "://" in url:
        return re.sub(r"://.*@", "://***@", url, flags=re.DOTALL)
    return re.sub(r"^.*@", "***@", url, flags=re.DOTALL)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        return _make_url(url).render_as_string(hide_password=True)
    except _UNPARSEABLE:
        return _mask(url)


# SQLAlchemy driver name (the part after "+" in a URL, or the backend's default) → what pip installs it.
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "mysqldb": "mysqlclient",
    "mysqlconnector": "mysql-connector-python",
    "mariadbconnector": "mariadb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
    "oracledb": "oracledb",
    "cx_oracle": "cx_Oracle",
}


def _parse(url: str, source: str) -> URL:
    """The parsed URL, once its database is known and its driver imports; else StorageError naming the fix."""
    try:
        parsed = _make_url(url)
    except _UNPARSEABLE:
        raise StorageError(
            f"{source}: cannot parse storage URL {_mask(url)!r} (expected e.g. sqlite:///hpo.db or "
            "postgresql+psycopg2://user:password@host/db; a password with @, : or / must be percent-encoded as "
            "%40, %3A, %2F)"
        ) from None
    try:
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError as exc:
        hint = " (PostgreSQL is postgresql+psycopg://...)" if parsed.get_backend_name() == "postgres" else ""
        raise StorageError(f"{source}: unknown database in storage URL {redact(url)!r}{hint}") from exc
    if dialect.is_async:
        raise StorageError(
            f"{source}: driver {dialect.driver!r} in {redact(url)!r} is asynchronous; Optuna needs a synchronous "
            "one (e.g. postgresql+psycopg://, mysql+pymysql://)"
        )
    # SQLAlchemy imports the driver only when an engine is created; import it now to say what is missing.
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        package = DRIVER_PACKAGES.get(dialect.driver)
        fix = f"pip install '{package}'" if package else f"install the Python module {exc.name or dialect.driver!r}"
        problem = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot be imported ({exc})"
        raise StorageError(f"{source}: driver {dialect.driver!r} for {redact(url)} {problem}: {fix}") from exc
    return parsed


# Every session of every worker in UTC: heartbeats are stored as the server's clock in the writing session's
# time zone and compared in the reading session's, so two hosts configured differently (PGTZ, a server
# default with daylight saving) would reap each other's live trials. And server-side bounds, so that a
# frozen worker (Ctrl-Z, a suspended job, a paused VM) cannot block the others silently: its
# transaction is ended by the server, and a waiting statement fails (and is retried) instead of hanging.
POSTGRES_SESSION = {
    "timezone": "UTC",
    "statement_timeout": f"{IO_TIMEOUT_S}s",
    "lock_timeout": f"{IO_TIMEOUT_S // 2}s",
    "idle_in_transaction_session_timeout": f"{IO_TIMEOUT_S}s",
}
MYSQL_SESSION = {
    "time_zone": "'+00:00'",
    "innodb_lock_wait_timeout": str(IO_TIMEOUT_S // 2),  # seconds
}


def engine_kwargs(url: URL) -> dict[str, Any]:
    """Engine settings per backend: a long busy timeout for SQLite, checked and recycled pools elsewhere."""
    if url.get_backend_name() == "sqlite":
        # Seconds a writer waits for a lock instead of failing with "database is locked".
        return {"connect_args": {"timeout": 60}}
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a connection dropped while idle is replaced, not used
        "pool_recycle": 300,  # seconds; below the usual server and proxy idle timeouts
        # A worker keeps one connection between uses; its heartbeat and reaper threads, when they overlap
        # with the main thread, open a second or third for the moment. Held connections per worker are
        # what runs into the server's max_connections as workers multiply (bench/storage.py).
        "pool_size": 1,
        "max_overflow": 3,
    }
    driver = url.get_driver_name()
    if driver in ("psycopg", "psycopg2"):
        # A cut network that drops packets (no reset) must fail a call within seconds, not after the
        # kernel's ~15 min of retransmissions, so that the worker's outage handling takes over.
        kwargs["connect_args"] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "keepalives": 1,
            "keepalives_idle": 10,  # seconds idle before the first probe
            "keepalives_interval": 5,  # seconds between probes
            "keepalives_count": 3,
            "tcp_user_timeout": IO_TIMEOUT_S * 1000,  # milliseconds unacknowledged data may wait
            "options": " ".join(f"-c {name}={value}" for name, value in POSTGRES_SESSION.items()),
        }
        if driver == "psycopg":
            # No server-side prepared statements: behind PgBouncer in transaction mode each transaction may reach
            # another server connection, where "_pg3_0" already exists or does not (psycopg 3 prepares a query
            # after 5 runs). Optuna's queries are small; preparing them saves nothing measurable.
            kwargs["connect_args"]["prepare_threshold"] = None
    elif driver in ("pymysql", "mysqldb"):
        kwargs["connect_args"] = {
            "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": IO_TIMEOUT_S, "write_timeout": IO_TIMEOUT_S,
            "init_command": "SET " + ", ".join(f"SESSION {name} = {value}" for name, value in MYSQL_SESSION.items()),
        }
    return kwargs


def _check_sqlite_file(path: Path, source: str, *, writable: bool) -> None:
    """The folder exists; for a writer, SQLite can create files in it (the database, its -wal and -shm files)."""
    folder = path.resolve().parent
    if not folder.exists():
        raise StorageError(f"{source}: folder of SQLite file '{path}' does not exist")
    if not folder.is_dir():
        raise StorageError(f"{source}: folder of SQLite file '{path}' is not a folder ('{folder}' is a file)")
    if path.is_dir():
        raise StorageError(f"{source}: SQLite file '{path}' is a folder")
    # The file itself is never opened here but through SQLite: closing any other descriptor of it drops every POSIX
    # lock this process's SQLite connections hold on it, and another process's SQLite then takes itself for the
    # file's last user and resets the write-ahead log under them (a corrupt database; sqlite.org/howtocorrupt.html).
    if path.is_file() and path.stat().st_size > 0 and not _is_sqlite(path):
        raise StorageError(f"{source}: '{path}' is not a SQLite database file")
    if not writable:
        return
    # A real probe, not os.access: root passes access() checks that creating a file then fails
    # (e.g. in /sys or /proc); the probe file is deleted at once.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise StorageError(f"{source}: cannot write the SQLite file '{path}' ({exc.strerror or exc})") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise StorageError(f"{source}: cannot write the SQLite file '{path}' (Permission denied)")


def _is_sqlite(path: Path) -> bool:
    """False when SQLite says the file is not a database; True otherwise (any other trouble is the storage's to report)."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        connection.execute("PRAGMA schema_version")
    except sqlite3.DatabaseError as exc:
        return exc.sqlite_errorcode != sqlite3.SQLITE_NOTADB
    finally:
        connection.close()
    return True


def check_storage(url: str, source: str, *, writable: bool = True, patience: float = 0.0) -> None:
    """Fail early, writing nothing, if the URL is malformed or its database can't be reached (or, with
    ``writable``, a SQLite file can't be written).

    ``patience`` (seconds): a server that can't be reached yet (starting, restarting, a network not up)
    is waited for as in an outage, then StorageUnavailable; one that answers "no" (a wrong password,
    no such database) is a StorageError at once.  0: every failure is a StorageError at once.
    """
    parsed = _parse(url, source)
    path = sqlite_path(url)
    if path is not None:
        _check_sqlite_file(path, source, writable=writable)
        return
    if parsed.get_backend_name() == "sqlite":
        return  # in memory
    engine = sqlalchemy.create_engine(parsed, **engine_kwargs(parsed))

    def connect() -> None:
        try:
            with engine.connect():
                pass
        except sqlalchemy.exc.SQLAlchemyError as exc:
            words = first_line(getattr(exc, "orig", exc))
            if patience <= 0 or refused_for_good(words):
                hint = next((text for cause, text in _HINTS.items() if cause in words), "")
                # Not chained: the guard would see the driver's OperationalError under it and wait.
                raise StorageError(f"{source}: cannot connect to {redact(url)}: {words}{hint}") from None
            raise  # passing: the guard waits and tries again

    try:
        StorageGuard(shown=f"{redact(url)} (from {source})", patience=patience).call("connect", connect)
    finally:
        engine.dispose()


# What a server says when it answered and refused, which waiting does not change (PostgreSQL, MySQL).
_REFUSALS = (
    "authentication failed", "no password supplied", "pg_hba.conf", "does not exist", "access denied",
    "unknown database",
    "unsupported startup parameter",  # a PgBouncer not told to ignore the session settings hpo sends
)
# One hint per refusal that has a known cause on the user's side.
_HINTS = {
    "unsupported startup parameter": " (a PgBouncer in front of PostgreSQL: set ignore_startup_parameters = options in "
    "pgbouncer.ini and the timeouts on the database, see docs/clusters.md)",
}


def refused_for_good(words: str) -> bool:
    """Whether a connection error is the server's "no" (credentials, database name) rather than its absence."""
    lowered = words.lower()
    return any(refusal in lowered for refusal in _REFUSALS)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for other databases, in-memory SQLite and unparseable URLs
    (which check_storage then reports)."""
    try:
        parsed = _make_url(url)
    except _UNPARSEABLE:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def open_storage(
    url: str, source: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with our engine settings and, given an interval, heartbeats.

    With heartbeats, a trial whose worker stops beating for ``grace_period`` seconds is marked FAIL
    and re-queued (see :mod:`hpo.tuning.retry`) with its intermediate values.
    """
    parsed = _parse(url, source)
    path = sqlite_path(url)
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {
            "heartbeat_interval": heartbeat_interval,
            "grace_period": grace_period if grace_period is not None else 3 * heartbeat_interval,
            STALE_CALLBACK_ARG: retry_callback(),
        }
    try:
        if path is not None:
            # Switching the journal mode needs the file to itself; SQLite answers "database is locked"
            # at once, without its busy timeout, while another worker is creating the same file.
            absorb_start_race("switch the SQLite file to write-ahead logging", lambda: _write_ahead_logging(path))
        # Workers started together on a fresh database all try to create the tables: retry the losers.
        storage = absorb_start_race(
            "create the storage tables",
            lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(parsed), **heartbeat),
        )
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as exc:
        raise StorageError(f"{source}: cannot open {redact(url)}: {first_line(exc)}") from exc
    if parsed.get_backend_name() == "postgresql":
        _pin_utc(storage.engine)
    elif parsed.get_backend_name() == "sqlite":
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """Every SQLite session of this storage a write transaction from its first statement (BEGIN IMMEDIATE).

    Python's sqlite3 module opens a transaction only at the first write, so Optuna's read-then-write
    steps are not atomic across processes: two workers both read a WAITING retry, then both mark it
    RUNNING and train it (issue 17).  SQLAlchemy's documented recipe for pysqlite: the driver's own
    transaction handling off, and a BEGIN of ours; IMMEDIATE takes the write lock at once, so the
    second worker waits for the first to commit (the busy timeout) and then reads RUNNING.
    """

    def no_driver_transactions(dbapi_connection: Any, record: object) -> None:
        dbapi_connection.isolation_level = None

    def begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", no_driver_transactions)
    sqlalchemy.event.listen(engine, "begin", begin_immediate)
    engine.dispose()  # connections opened to create the tables predate the listeners


def _pin_utc(engine: sqlalchemy.engine.Engine) -> None:
    """Every new PostgreSQL session of this storage in UTC, whatever $PGTZ says.

    libpq sends PGTZ as a startup parameter, which the server applies after the connection's
    ``options``, so ``-c timezone=UTC`` alone loses to it; a SET on connect does not.  Connections
    Optuna opened before (to create the tables) are closed, so that none escapes.
    """

    def utc(dbapi_connection: Any, record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.close()
        dbapi_connection.commit()

    sqlalchemy.event.listen(engine, "connect", utc)
    engine.dispose()


def _write_ahead_logging(path: Path) -> None:
    """Readers never block the writer, so local workers rarely wait on a lock; the mode is stored in the file."""
    connection = sqlite3.connect(path, timeout=60)  # seconds a locked file is waited for
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def check_existing_storage(url: str, source: str) -> None:
    """Like check_storage, and a SQLite file must exist: readers never create an empty database."""
    check_storage(url, source, writable=False)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise StorageError(f"{source}: no SQLite file '{path}' here (run python -m hpo.run first, or give --storage)")


def default_checkpoint_dir(url: str) -> Path:
    """Beside a SQLite file (``hpo.db`` → ``hpo-checkpoints/``), else ``./hpo-checkpoints``."""
    path = sqlite_path(url)
    if path is not None:
        return path.with_name(f"{path.stem}-checkpoints")
    return Path("hpo-checkpoints")
