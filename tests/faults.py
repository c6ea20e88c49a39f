"""The fault harness the tests own: a throwaway PostgreSQL server to stop and start, a TCP proxy to cut,
fresh databases on the shared servers, and worker processes whose output can be waited on.

The machine's shared PostgreSQL and MariaDB services are never stopped or restarted: outages are made
on a server started here (initdb into a temporary folder, a free port) or by cutting a proxy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from conftest import missing, random_image_folder

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


def answer_when_up(server: subprocess.Popen[str], url: str, timeout: float) -> bytes:
    """The body ``url`` answers once ``server`` (a process just started) listens; the test fails if it exits first
    or stays silent for ``timeout`` s."""

    def attempt() -> tuple[bytes] | None:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return (response.read(),)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None:
                output = server.stdout.read() if server.stdout else ""
                pytest.fail(f"{server.args} exited with {server.returncode}: {output}")
            return None

    answered = wait_for(attempt, timeout, f"{url} to answer")
    assert isinstance(answered, tuple)
    return answered[0]


def running_with_epochs(url: str, name: str) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial of the study that has reported an epoch, or None (also while there is no study yet)."""
    try:
        running = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.RUNNING,))
    except KeyError:
        return None
    return next((t for t in running if t.intermediate_values and "worker" in t.user_attrs), None)


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


class PgBouncer:
    """A PgBouncer of the test's own in transaction mode, in front of a PostgreSQL server, run as the postgres user.

    ``ignore_startup_parameters = options``: hpo sends its session timeouts as a startup option, which PgBouncer
    refuses otherwise (they are then the database's to set; the time zone PgBouncer tracks per client itself).
    """

    BINARY = Path("/usr/sbin/pgbouncer")

    def __init__(self, server_url: str, *, pool_size: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hpo-pgbouncer-"))
        self.port = free_port()
        target = make_url(server_url)
        (self.folder / "users.txt").write_text(f'"{target.username}" ""\n')
        (self.folder / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={target.host} port={target.port or 5432}\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\nauth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\npool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            f"max_client_conn = 2000\nignore_startup_parameters = options\nlogfile = {self.folder / 'log'}\n"
            f"pidfile = {self.folder / 'pid'}\n"
        )

    @classmethod
    def available(cls) -> str | None:
        if not cls.BINARY.is_file():
            return f"no {cls.BINARY}"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser (PgBouncer refuses root)"
        return None

    def url_for(self, url: str) -> str:
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def start(self) -> None:
        command = [str(self.BINARY), "-d", str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres")
            for path in self.folder.iterdir():
                shutil.chown(path, user="postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
        wait_for(lambda: _accepts(self.port), 30, "PgBouncer to listen")

    def stop(self) -> None:
        pid = self.folder / "pid"
        if pid.is_file():
            os.kill(int(pid.read_text()), signal.SIGTERM)
        shutil.rmtree(self.folder, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# A model that, in the first process to take the token file $HANG_TOKEN, stops in the training step after
# $HANG_AFTER evaluated epochs (each checkpointed first) until the file "$HANG_TOKEN.release" appears: a worker busy
# in its trial at a moment the test chooses.  Other processes train straight through.
GATED_MODEL = """
import os, threading
from torch import nn

class Gated(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))
        self.evaluations = 0

    def forward(self, x):
        if not self.training:
            self.evaluations += 1  # once per epoch: the validation pass
        elif self.evaluations >= int(os.environ["HANG_AFTER"]) and _took_token():
            released = os.environ["HANG_TOKEN"] + ".release"
            while not os.path.exists(released):
                threading.Event().wait(0.05)  # seconds; a signal is handled here
        return self.net(x)

def _took_token():
    token = os.environ["HANG_TOKEN"]
    try:
        os.rename(token, f"{token}.{os.getpid()}")  # atomic: one process only
        return True
    except FileNotFoundError:
        return os.path.exists(f"{token}.{os.getpid()}")

def build(in_channels, num_classes, image_size):
    return Gated(in_channels, num_classes)
"""


class GatedStudy:
    """A one-point study on tiny pictures whose trials a test can hold in place (GATED_MODEL)."""

    def __init__(self, folder: Path, *, max_epochs: int, hang_after: int, url: str | None = None) -> None:
        pictures = random_image_folder(folder / "pictures", train=8, test=2, size=12, seed=1)
        (folder / "gated.py").write_text(GATED_MODEL)
        self.file = folder / "gated.toml"
        self.file.write_text(
            f'[study]\nname = "gated"\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\n'
            f'image_size = 12\n[train]\nmax_epochs = {max_epochs}\ndevice = "cpu"\n[model]\nname = "gated:build"\n'
            '[space]\nlr = 0.01\nbatch_size = 4\n[pruner]\ntype = "none"\n'
        )
        self.url = url or f"sqlite:///{folder / 'hpo.db'}"
        self.checkpoints = folder / "ckpt"
        self.token = folder / "hang-token"
        self.env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(folder), *sys.path]), HANG_TOKEN=str(self.token),
            HANG_AFTER=str(hang_after),
        )

    def worker(self, n_trials: int = 1, *extra: str) -> Worker:
        return Worker(
            "--study", str(self.file), "--n-trials", str(n_trials), "--storage", self.url, "--checkpoint-dir",
            str(self.checkpoints), "--heartbeat-interval", "1", "--grace-period", "3", *extra, env=self.env,
        )

    def signalled(self, signum: int, n_trials: int = 1) -> Worker:
        """A new worker, held at the gate (the token laid out for it), then sent ``signum``."""
        self.token.touch()
        worker = self.worker(n_trials)
        try:
            self.held(worker)
            worker.process.send_signal(signum)
        except BaseException:
            worker.kill()
            raise
        return worker

    def held(self, worker: Worker) -> None:
        """Wait until ``worker`` holds at the gate."""
        held_at = Path(f"{self.token}.{worker.process.pid}")
        wait_for(lambda: held_at.exists() or worker.process.poll() is not None, 120, "the worker to reach the gate")
        assert held_at.exists(), worker.output

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="gated", storage=self.url).trials
