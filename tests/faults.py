"""The fault harness the tests own: a throwaway PostgreSQL server to stop and start, a TCP proxy to cut,
fresh databases on the shared servers, and worker processes whose output can be waited on.

The machine's shared PostgreSQL and MariaDB services are never stopped or restarted: outages are made
on a server started here (initdb into a temporary folder, a free port) or by cutting a proxy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from conftest import missing

PG_BIN = Path("/usr/lib/postgresql/15/bin")
# The shared database servers, by the variable that holds their URL (.ci/run sets both).
SERVERS = {"postgresql": "HPO_TEST_POSTGRES_URL", "mariadb": "HPO_TEST_MYSQL_URL"}
RESOURCE = {"postgresql": "postgresql", "mariadb": "mysql"}  # each server's name in conftest.RESOURCES


def server_url(name: str) -> str:
    """The URL of the shared ``postgresql`` or ``mariadb`` server; the test is skipped when it is unset."""
    url = os.environ.get(SERVERS[name])
    if not url:
        missing(RESOURCE[name], f"{SERVERS[name]} is not set (.ci/run sets it)")
    return url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def running_with_epochs(url: str, name: str) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial of the study that has reported an epoch, or None (also while there is no study yet)."""
    try:
        running = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.RUNNING,))
    except KeyError:
        return None
    return next((t for t in running if t.intermediate_values and "pid" in t.user_attrs), None)


class ThrowawayPostgres:
    """A PostgreSQL 15 server of the test's own, in a temporary folder, run as the postgres user."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def available() -> str | None:
        """None when a server can be started here, else why not."""
        if not (PG_BIN / "initdb").is_file():
            return f"no PostgreSQL server binaries in {PG_BIN}"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser (initdb refuses root)"
        return None

    def _run(self, *argv: str) -> None:
        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    def init(self) -> ThrowawayPostgres:
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: open connections are terminated, as in a restart or failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to a server; ``cut`` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def url_for(self, url: str) -> str:
        """``url`` pointed at the proxy instead of the server."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            if self._listener is not listener:  # accepted in the instant of a cut
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Refuse new connections and reset the open ones, as a dead server or a cut network does."""
        assert self._listener is not None
        # shutdown wakes the thread blocked in accept(); close alone would leave it accepting.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def restore(self) -> None:
        self.start()

    def close(self) -> None:
        if self._listener is not None:
            self.cut()


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on a shared server (PostgreSQL or MariaDB), dropped afterwards."""
    name = f"hpo_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            if admin.dialect.name == "postgresql":
                connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


class Worker:
    """A ``python -m hpo.run`` process whose output lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hpo.run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> str:
        found = wait_for(lambda: next((line for line in self.lines if text in line), None), timeout, repr(text))
        assert isinstance(found, str)
        return found

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
