"""Results where optuna-dashboard shows them: hpo.best's model, hpo.report's files and (with --upload-checkpoints) every
finished trial's final checkpoint become Optuna artifacts, read back here through optuna.artifacts' public API."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

from conftest import FinishedStudy, random_image_folder
from faults import answer_when_up
from hpo.launching.run_args import parse_run_args, worker_argv
from hpo.report import main as report
from hpo.tuning.artifacts import _Prefixed, parse_s3
from hpo.tuning.storage import open_storage

START_TIMEOUT_S = 60  # seconds for python -m hpo.dashboard to answer: Python, optuna and the dashboard load first


def _copy(told_study: FinishedStudy, folder: Path) -> str:
    url = f"sqlite:///{folder / 'hpo.db'}"
    optuna.copy_study(from_study_name=told_study.name, from_storage=told_study.url, to_storage=url)
    return url


def _downloaded(store_folder: Path, artifact_id: str, into: Path) -> bytes:
    path = into / artifact_id
    download_artifact(artifact_store=FileSystemArtifactStore(store_folder), file_path=str(path), artifact_id=artifact_id)
    return path.read_bytes()


def test_the_reports_files_are_artifacts_of_the_study_beside_the_database(
    told_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _copy(told_study, tmp_path)
    out = tmp_path / "report"
    assert report(["--study", str(told_study.study_file), "--storage", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name=told_study.name, storage=url)
    metas = {meta.filename: meta for meta in get_all_artifact_meta(study)}
    assert sorted(metas) == ["report.html", "summary.json", "trials.csv"], metas
    assert metas["report.html"].mimetype == "text/html" and metas["summary.json"].mimetype == "application/json"
    for name, meta in metas.items():
        assert _downloaded(tmp_path / "hpo-artifacts", meta.artifact_id, tmp_path) == (out / name).read_bytes()
        assert meta.artifact_id in printed, printed


def test_no_artifacts_with_none(told_study: FinishedStudy, tmp_path: Path) -> None:
    url = _copy(told_study, tmp_path)
    argv = ["--study", str(told_study.study_file), "--storage", url, "--out", str(tmp_path / "out"), "-q"]
    assert report([*argv, "--artifacts", "none"]) == 0
    assert get_all_artifact_meta(optuna.load_study(study_name=told_study.name, storage=url)) == []
    assert not (tmp_path / "hpo-artifacts").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://host/x", "--artifacts: must be a folder, s3://bucket/prefix or none, got 'http://host/x'"),
        ("s3://", "--artifacts: must be s3://bucket or s3://bucket/prefix, got 's3://'"),
    ],
)
def test_a_bad_artifact_store_is_one_line(
    told_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, expected: str
) -> None:
    url = _copy(told_study, tmp_path)
    argv = ["--study", str(told_study.study_file), "--storage", url, "--out", str(tmp_path / "out"), "--artifacts", value]
    assert report(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hpo.report: error: ") and expected in err, err
    assert not (tmp_path / "out").exists(), "nothing written"


def test_s3_without_boto3_says_how_to_install_it(
    told_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed
    url = _copy(told_study, tmp_path)
    argv = ["--study", str(told_study.study_file), "--storage", url, "--out", str(tmp_path / "out")]
    assert report([*argv, "--artifacts", "s3://results/hpo/"]) == 2
    err = capsys.readouterr().err
    assert "--artifacts: s3://results/hpo/ needs boto3, which is not installed: pip install \"hpo[s3]\"" in err, err


@pytest.fixture
def mock_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto's in-process S3 (no S3 server is reachable here), with a bucket "results"; an S3 client on it."""
    boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (the s3 extra)")
    moto = pytest.importorskip("moto", reason="moto is not installed (the test extra)")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="results")
        yield client


def test_the_reports_files_go_to_an_s3_bucket_under_its_prefix(
    told_study: FinishedStudy, tmp_path: Path, mock_s3: Any
) -> None:
    url = _copy(told_study, tmp_path)
    out = tmp_path / "report"
    argv = ["--study", str(told_study.study_file), "--storage", url, "--out", str(out), "-q"]
    assert report([*argv, "--artifacts", "s3://results/team/hpo/"]) == 0
    metas = get_all_artifact_meta(optuna.load_study(study_name=told_study.name, storage=url))
    assert sorted(meta.filename for meta in metas) == ["report.html", "summary.json", "trials.csv"]
    for meta in metas:
        body = mock_s3.get_object(Bucket="results", Key=f"team/hpo/{meta.artifact_id}")["Body"].read()
        assert body == (out / meta.filename).read_bytes()
    assert not (tmp_path / "hpo-artifacts").exists(), "nothing in the default folder"


def test_a_bucket_that_does_not_exist_is_one_line(
    told_study: FinishedStudy, tmp_path: Path, mock_s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _copy(told_study, tmp_path)
    argv = ["--study", str(told_study.study_file), "--storage", url, "--out", str(tmp_path / "out")]
    assert report([*argv, "--artifacts", "s3://no-such-bucket/hpo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--artifacts: cannot reach bucket 'no-such-bucket' of s3://no-such-bucket/hpo: " in err, err
    assert not (tmp_path / "out").exists()


def test_s3_urls_and_prefixed_keys(tmp_path: Path) -> None:
    assert parse_s3("s3://bucket", "--artifacts") == ("bucket", "")
    assert parse_s3("s3://bucket/team/hpo/", "--artifacts") == ("bucket", "team/hpo")
    # A bucket's prefix, as hpo keeps it for Boto3ArtifactStore, tried on a folder store (no S3 server here).
    store = _Prefixed(FileSystemArtifactStore(tmp_path), "team/hpo")
    (tmp_path / "team" / "hpo").mkdir(parents=True)  # S3 keys need no folders; a folder store does
    store.write("abc", io.BytesIO(b"weights"))
    assert (tmp_path / "team" / "hpo" / "abc").read_bytes() == b"weights"
    assert store.open_reader("abc").read() == b"weights"


def test_run_flags_reach_launched_workers_and_artifacts_needs_the_upload_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpo.run import main as run

    monkeypatch.chdir(tmp_path)
    request = parse_run_args(["--study", "quick", "--n-trials", "2", "--upload-checkpoints", "--artifacts", "kept"])
    argv = worker_argv(request, study_path=tmp_path / "quick.toml", checkpoint_dir=tmp_path, index=0, device="cpu")
    assert "--upload-checkpoints" in argv and argv[argv.index("--artifacts") + 1] == str(tmp_path / "kept")
    assert run(["--study", "quick", "--n-trials", "2", "--artifacts", "kept"]) == 2
    assert "argument --artifacts: only with --upload-checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "hpo.db").exists()


def test_the_dashboard_serves_the_artifacts(told_study: FinishedStudy, tmp_path: Path) -> None:
    """``hpo.dashboard`` hands the store to optuna-dashboard: the report's summary is downloadable from it."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (the dashboard extra)")
    import socket

    url = _copy(told_study, tmp_path)
    assert report(["--study", str(told_study.study_file), "--storage", url, "--out", str(tmp_path / "out"), "-q"]) == 0
    study = optuna.load_study(study_name=told_study.name, storage=url)
    summary = next(m for m in get_all_artifact_meta(study) if m.filename == "summary.json")
    study_id = open_storage(url, "--storage").get_study_id_from_name(told_study.name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "hpo.dashboard", "--storage", url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        body = answer_when_up(server, f"http://127.0.0.1:{port}/artifacts/{study_id}/{summary.artifact_id}", START_TIMEOUT_S)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert body == (tmp_path / "out" / "summary.json").read_bytes() and json.loads(body)["study"] == told_study.name


@pytest.mark.slow
def test_uploaded_checkpoints_are_artifacts_of_their_trials_and_the_best_model_of_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpo.best import main as best
    from hpo.results.retrain import load_model
    from hpo.run import main as run
    from hpo.training.fit import load_checkpoint

    pictures = random_image_folder(tmp_path / "pictures", train=8, test=2, size=12, seed=2)
    study_file = tmp_path / "art.toml"
    study_file.write_text(
        f'[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\nimage_size = 12\n'
        '[train]\nmax_epochs = 2\ndevice = "cpu"\n[pruner]\ntype = "none"\n[space]\ndepth = 1\nbase_width = 4\nbatch_size = 8\n'
    )
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    argv = ["--study", str(study_file), "--storage", url, "--quiet", "--upload-checkpoints"]
    assert run([*argv, "--n-trials", "2"]) == 0
    # A third trial pruned after its first epoch (every val_loss is above 0): its checkpoint is uploaded too.
    study_file.write_text(study_file.read_text().replace('type = "none"', 'type = "threshold"\nupper = 0.0'))
    assert run([*argv, "--n-trials", "3"]) == 0
    store = tmp_path / "hpo-artifacts"
    storage = open_storage(url, "--storage")
    study = optuna.load_study(study_name="art", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    for trial in study.trials:
        (meta,) = get_all_artifact_meta(trial, storage=storage)
        _downloaded(store, meta.artifact_id, tmp_path)
        epochs = load_checkpoint(tmp_path / meta.artifact_id).epochs
        assert len(epochs) == len(trial.intermediate_values), "the trial's final checkpoint"
    assert not list((tmp_path / "hpo-checkpoints").rglob("*.pt")), "the local checkpoints are deleted as before"
    assert best(["--study", str(study_file), "--storage", url, "--quiet", "--out", str(tmp_path / "best")]) == 0
    study = optuna.load_study(study_name="art", storage=storage)
    (meta,) = get_all_artifact_meta(study)  # of the study: Optuna attaches none to a finished trial
    assert meta.filename == f"art-trial{study.best_trial.number}.pt" and meta.artifact_id in capsys.readouterr().out
    _downloaded(store, meta.artifact_id, tmp_path)
    saved = load_model(tmp_path / meta.artifact_id)
    assert saved.trial == study.best_trial.number and saved.study == "art"
    assert saved.state_dict.keys() == load_model(tmp_path / "best" / meta.filename).state_dict.keys()
