"""The Kubernetes manifests, validated offline against the Kubernetes API schemas and checked against the code
(no cluster runs on these machines)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from hpo.launching.run_args import build_parser
from hpo.studyfile.spec import find_study

K8S = Path(__file__).resolve().parent.parent / "docker" / "k8s"
# The oldest Kubernetes the manifests are meant for (Indexed Jobs with podFailurePolicy), and the newest known here.
VERSIONS = ("1.29", kubernetes_validate.latest_version())


def _resources() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _one(kind: str, name: str) -> dict:
    (found,) = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def test_every_manifest_is_listed_and_valid_against_the_api_schemas() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for resource in _resources():
        for version in VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)


def test_an_invalid_manifest_is_refused() -> None:
    job = _one("Job", "hpo-workers")
    job["spec"]["completionMod"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[0], strict=True)


def test_workers_are_an_indexed_job_of_gpu_pods_running_hpo_against_postgres() -> None:
    job = _one("Job", "hpo-workers")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    pod = spec["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["image"] == "hpo-worker"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in worker["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "hpo-postgres"
    assert "batch.kubernetes.io/job-completion-index" in env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    values = {"POSTGRES_PASSWORD": "x", "WORKER_INDEX": "3"}
    url = make_url(_expand(env["HPO_STORAGE"]["value"], values))
    assert url.get_backend_name() == "postgresql" and url.host == "postgres" and url.password == "x"
    assert not any("postgres" in arg for arg in worker["args"]), "the storage URL stays out of the command line"
    args = build_parser().parse_args([_expand(a, values) for a in worker["args"]])  # every flag exists and parses
    find_study(args.study)
    assert args.worker_index == 3 and args.device == "cuda"
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert volumes[mounts[args.checkpoint_dir]] == "hpo-checkpoints" and volumes[mounts[args.data_dir]] == "hpo-data"
    for claim in ("hpo-checkpoints", "hpo-data"):
        assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"], (
            "every worker pod, on any node, reads the checkpoints a dead worker left"
        )
    assert pod["terminationGracePeriodSeconds"] >= 30, "time to fail and re-queue the running trial after SIGTERM"
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}} in rules


def test_postgres_keeps_its_data_on_a_volume_and_its_password_in_the_secret() -> None:
    deployment = _one("Deployment", "postgres")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("postgres:")
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hpo-postgres", "key": "password"}
    assert "password" in _one("Secret", "hpo-postgres")["stringData"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "hpo-pgdata"
    assert _one("Service", "postgres")["spec"]["ports"][0]["port"] == 5432


def test_dashboard_is_a_cluster_internal_service_on_the_study_database() -> None:
    service = _one("Service", "hpo-dashboard")
    assert service["spec"]["type"] == "ClusterIP", "reached with kubectl port-forward, not exposed"
    (container,) = _one("Deployment", "hpo-dashboard")["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["python", "-m", "hpo.dashboard"]
    assert not any("$(" in arg or "postgres" in arg for arg in container["command"]), "no URL or password in ps"
    env = {e["name"]: e.get("value") for e in container["env"]}
    url = make_url(_expand(env["HPO_STORAGE"], {"POSTGRES_PASSWORD": "x"}))
    assert url.host == "postgres" and url.database == "hpo"
    selector = service["spec"]["selector"]
    labels = _one("Deployment", "hpo-dashboard")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def _json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902's test and replace, the two operations the pgbouncer component uses, as kustomize applies them."""
    for operation in operations:
        *parents, last = operation["path"].strip("/").split("/")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if operation["op"] == "test":
            assert node[key] == operation["value"], f"the patch expects {operation['value']!r} at {operation['path']}"
        else:
            assert operation["op"] == "replace"
            node[key] = operation["value"]
    return document


def test_the_pgbouncer_component_routes_the_workers_through_pgbouncer_in_transaction_mode() -> None:
    folder = K8S / "pgbouncer"
    component = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert "# components:\n#   - pgbouncer" in (K8S / "kustomization.yaml").read_text(), "documented where it is turned on"
    resources = [doc for name in component["resources"] for doc in yaml.safe_load_all((folder / name).read_text()) if doc]
    for resource in resources:
        for version in VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)
    (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POOL_MODE"]["value"] == "transaction" and env["IGNORE_STARTUP_PARAMETERS"]["value"] == "options"
    assert int(env["DEFAULT_POOL_SIZE"]["value"]) <= 50 and env["DB_HOST"]["value"] == "postgres"
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "hpo-postgres", "key": "password"}
    (service,) = [r for r in resources if r["kind"] == "Service"]
    assert service["spec"]["ports"][0]["port"] == int(env["LISTEN_PORT"]["value"])
    (patch,) = component["patches"]
    assert patch["target"] == {"kind": "Job", "name": "hpo-workers"}
    job = _json_patch(_one("Job", "hpo-workers"), yaml.safe_load(patch["patch"]))
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    url = make_url(_expand({e["name"]: e for e in worker["env"]}["HPO_STORAGE"]["value"], {"POSTGRES_PASSWORD": "x"}))
    assert (url.host, url.port, url.database, url.password) == ("pgbouncer", service["spec"]["ports"][0]["port"], "hpo", "x")
    kubernetes_validate.validate(job, VERSIONS[0], strict=True)
