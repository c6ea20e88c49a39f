"""Many workers through PgBouncer in transaction mode: what lets a thousand workers share PostgreSQL's 100
connections.  A real PgBouncer (Debian's package) started by the test in front of the shared PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from conftest import missing
from faults import GatedStudy, PgBouncer, fresh_database, server_url, wait_for

pytestmark = pytest.mark.slow

POOL = 3  # server connections PgBouncer may open to the database


@pytest.fixture()
def bouncer() -> Iterator[tuple[PgBouncer, str]]:
    problem = PgBouncer.available()
    if problem:
        missing("pgbouncer", problem)
    with fresh_database(server_url("postgresql")) as direct:
        pooler = PgBouncer(direct, pool_size=POOL)
        pooler.start()
        try:
            yield pooler, direct
        finally:
            pooler.stop()


def _server_connections(direct: str) -> int:
    engine = sqlalchemy.create_engine(direct, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            name = _database_name(direct)
            return connection.execute(
                sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": name},
            ).scalar_one()
    finally:
        engine.dispose()


def _database_name(url: str) -> str:
    database = sqlalchemy.engine.make_url(url).database
    assert database is not None
    return database


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_workers_through_pgbouncer_keep_the_budget_and_reap_a_killed_workers_trial(
    tmp_path: Path, bouncer: tuple[PgBouncer, str], driver: str
) -> None:
    """Three workers, one killed mid-trial; psycopg 3 included, whose prepared statements broke on the old main
    ("prepared statement "_pg3_0" already exists")."""
    pooler, direct = bouncer
    url = pooler.url_for(direct).replace("postgresql+psycopg2://", f"postgresql+{driver}://")
    study = GatedStudy(tmp_path, max_epochs=3, hang_after=1, url=url)
    study.token.touch()
    victim = study.worker(n_trials=4)
    others = []
    try:
        study.held(victim)
        others = [study.worker(n_trials=4) for _ in range(2)]
        wait_for(lambda: any("finished with value" in line for w in others for line in w.lines), 180, "a trial to finish")
        peak = _server_connections(direct)
        victim.process.send_signal(signal.SIGKILL)
        codes = [worker.wait(timeout=240) for worker in others]
    finally:
        for worker in (victim, *others):
            worker.kill()
    outputs = "\n".join(worker.output for worker in others)
    assert codes == [0, 0], outputs
    assert "Traceback" not in outputs, outputs
    assert peak <= POOL, f"{peak} server connections through a pool of {POOL}"
    trials = optuna.load_study(study_name="gated", storage=direct).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    killed = trials[0]
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker"]["pid"] == victim.process.pid
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] == 1
