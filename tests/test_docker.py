"""The Docker files, checked against the code with what runs here (no Docker engine on these machines)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from hpo.dashboard import build_parser as build_dashboard_parser
from hpo.launching.run_args import build_parser
from hpo.studyfile.spec import find_study, load_spec

DOCKER = Path(__file__).resolve().parent.parent / "docker"
ROOT = DOCKER.parent


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default} from docker/.env (``env``)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), text)


def _workers(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("worker")}


def test_dockerfile_builds_a_gpu_worker_from_the_official_pytorch_image() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert 'ENTRYPOINT ["python", "-m", "hpo.run"]' in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    args = build_parser().parse_args(yaml.safe_load(cmd.group(1)))
    assert load_spec(find_study(args.study)).study.name == "cifar"


def test_postgres_has_a_healthcheck_a_volume_and_a_password_from_the_env_file() -> None:
    postgres = _compose()["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert postgres["env_file"] == ".env" and "POSTGRES_PASSWORD" not in postgres.get("environment", {})
    example = (DOCKER / "env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=", example, re.M)
    assert "docker/.env" in (ROOT / ".gitignore").read_text().split()


def test_each_worker_runs_hpo_on_its_own_gpu_against_postgres() -> None:
    compose = _compose()
    workers = _workers(compose)
    assert len(workers) >= 2
    device_ids = []
    for name, worker in workers.items():
        args = build_parser().parse_args(worker["command"])  # every flag exists and parses
        find_study(args.study)
        url = make_url(_interpolate(worker["environment"]["HPO_STORAGE"], {"POSTGRES_PASSWORD": "x"}))
        assert url.get_backend_name() == "postgresql" and url.host == "postgres" and url.port == 5432, name
        assert url.password == "x", "the password is interpolated from .env, not written here"
        assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert args.checkpoint_dir and any(v.endswith(":" + args.checkpoint_dir) for v in worker["volumes"]), (
            "checkpoints live on a volume every worker shares, so any worker can resume a dead one's trial"
        )
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        device_ids += device["device_ids"]
    assert len(device_ids) == len(set(device_ids)) == len(workers), "one GPU per worker"
    for volume in ("pgdata", "data", "checkpoints"):
        assert volume in compose["volumes"]


def test_dashboard_is_bound_to_localhost() -> None:
    dashboard = _compose()["services"]["dashboard"]
    assert all(port.startswith("127.0.0.1:") for port in dashboard["ports"])
    assert dashboard["entrypoint"][:3] == ["python", "-m", "hpo.dashboard"]
    assert "command" not in dashboard and not any("POSTGRES_PASSWORD" in arg for arg in dashboard["entrypoint"])
    assert make_url(dashboard["environment"]["HPO_STORAGE"].replace("${POSTGRES_PASSWORD}", "x")).host == "postgres"
    assert build_dashboard_parser().parse_args(dashboard["entrypoint"][3:]).host == "0.0.0.0"


def test_the_pgbouncer_profile_routes_the_workers_through_pgbouncer_in_transaction_mode() -> None:
    compose = _compose()
    bouncer = compose["services"]["pgbouncer"]
    assert bouncer["profiles"] == ["pgbouncer"], "off unless asked for"
    env = bouncer["environment"]
    assert env["DB_HOST"] == "postgres" and env["POOL_MODE"] == "transaction"
    assert env["IGNORE_STARTUP_PARAMETERS"] == "options", "hpo sends its session timeouts as startup options"
    assert int(env["DEFAULT_POOL_SIZE"]) <= 50, "server connections well under PostgreSQL's max_connections = 100"
    assert env["DB_PASSWORD"] == "${POSTGRES_PASSWORD}" and bouncer["env_file"] == ".env"
    # The switch documented in env.example: the workers' URL then names PgBouncer's port.
    switch = dict(re.findall(r"^# (HPO_DB_\w+)=(\S+)$", (DOCKER / "env.example").read_text(), re.M))
    assert switch == {"HPO_DB_HOST": "pgbouncer", "HPO_DB_PORT": env["LISTEN_PORT"]}
    for name, worker in _workers(compose).items():
        url = make_url(_interpolate(worker["environment"]["HPO_STORAGE"], {"POSTGRES_PASSWORD": "x", **switch}))
        assert (url.host, url.port, url.database) == ("pgbouncer", 6432, "hpo"), name
        assert url.get_driver_name() == "psycopg", "hpo turns psycopg 3's prepared statements off for PgBouncer"
