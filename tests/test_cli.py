"""Bad input: one line on stderr naming the flag or file and the bad value, exit 2, nothing in storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import image_folder, write_study
from faults import server_url
from hpo.cli import EXIT_STORAGE_UNAVAILABLE
from hpo.run import main


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("hpo.run: error: "), err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--n-trials", "0", "argument --n-trials: must be a positive integer, got '0'"),
        ("--n-trials", "-3", "argument --n-trials: must be a positive integer, got '-3'"),
        ("--n-trials", "ten", "argument --n-trials: must be a positive integer, got 'ten'"),
        ("--timeout", "-5", "argument --timeout: must be a number of seconds > 0, got '-5'"),
        ("--max-epochs", "0", "argument --max-epochs: must be a positive integer, got '0'"),
        ("--device", "gpu", "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("--seed", "-1", "argument --seed: must be an integer >= 0, got '-1'"),
        ("--workers-per-gpu", "0", "argument --workers-per-gpu: must be a positive integer, got '0'"),
        ("--gpus", "zero", "argument --gpus: must be 'all' or a list like 0,2,3, got 'zero'"),
        ("--heartbeat-interval", "0", "argument --heartbeat-interval: must be a positive integer, got '0'"),
        ("--grace-period", "10", "argument --grace-period: must be above --heartbeat-interval (10 s), got 10"),
        ("--grace-period", "5", "argument --grace-period: must be above --heartbeat-interval (10 s), got 5"),
        ("--storage-patience", "0", "argument --storage-patience: must be a number of seconds > 0, got '0'"),
    ],
)
def test_bad_flag_values(workdir: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, expected: str) -> None:
    argv = ["--study", "quick", "--n-trials", "2", flag, value]
    _fails(capsys, argv, expected)
    assert not (workdir / "hpo.db").exists()


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a GPU 3")
def test_a_gpu_that_does_not_exist_is_named(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--gpus", "3"], "argument --gpus: GPU 3 does not exist here")
    assert not (workdir / "hpo.db").exists()


def test_gpus_and_device_together_are_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--gpus", "all", "--device", "cpu"], "argument --device: not allowed with --gpus")


def test_missing_required_flag(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick"], "--n-trials")


def test_unknown_study_lists_the_available_ones(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "cifr", "--n-trials", "2"], "unknown study 'cifr'", "cifar", "quick")
    assert not (workdir / "hpo.db").exists()


def test_malformed_study_file_names_file_and_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = workdir / "broken.toml"
    bad.write_text('[study]\nname = "x"\n[space\nlr = 1\n')
    _fails(capsys, ["--study", str(bad), "--n-trials", "2"], str(bad), "invalid TOML", "line 3")
    assert not (workdir / "hpo.db").exists()


def test_inverted_range_in_study_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = workdir / "inverted.toml"
    bad.write_text("[space]\nlr = { low = 0.1, high = 0.001, log = true }\n")
    _fails(capsys, ["--study", str(bad), "--n-trials", "2"], str(bad), "[space] lr", "low=0.1 high=0.001")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "--storage: cannot parse storage URL 'not a url'"),
        ("nosuchdb://x/y", "--storage: unknown database in storage URL 'nosuchdb://x/y'"),
        ("sqlite:////no/such/folder/h.db", "--storage: folder of SQLite file '/no/such/folder/h.db' does not exist"),
        # /sys refuses new files even to root, whatever its permission bits say.
        ("sqlite:////sys/hpo.db", "--storage: cannot write the SQLite file '/sys/hpo.db'"),
        ("postgres://u@127.0.0.1/x", "--storage: unknown database in storage URL 'postgres://u@127.0.0.1/x' (PostgreSQL is postgresql+psycopg://"),
        ("postgresql+asyncpg://u@127.0.0.1/x", "--storage: driver 'asyncpg' in 'postgresql+asyncpg://u@127.0.0.1/x' is asynchronous"),
    ],
)
def test_bad_storage_url(
    workdir: Path, capsys: pytest.CaptureFixture[str], image_archive: Path, url: str, expected: str
) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--data-dir", str(image_archive), "--storage", url], expected)
    assert not (workdir / "hpo.db").exists()


def test_sqlite_file_where_a_file_or_folder_is_in_the_way(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "notes").write_text("a file, not a folder")
    (workdir / "folder.db").mkdir()
    (workdir / "text.db").write_text("not a database")
    for url, expected in (
        (f"sqlite:///{workdir}/notes/h.db", f"--storage: folder of SQLite file '{workdir}/notes/h.db' is not a folder"),
        (f"sqlite:///{workdir}/folder.db", f"--storage: SQLite file '{workdir}/folder.db' is a folder"),
        (f"sqlite:///{workdir}/text.db", f"--storage: '{workdir}/text.db' is not a SQLite database file"),
    ):
        _fails(capsys, ["--study", "quick", "--n-trials", "2", "--storage", url], expected)
    assert (workdir / "text.db").read_text() == "not a database"
    assert sorted(p.name for p in workdir.iterdir()) == ["folder.db", "notes", "text.db"], "no probe file left behind"


def test_checking_a_sqlite_file_keeps_the_locks_of_the_connections_this_process_holds_on_it(tmp_path: Path) -> None:
    """Checking the file before a run (bench/search.py does before every run, with bench.db open) must not drop this
    process's SQLite locks: with them gone, another process closing its connection takes itself for the file's last
    user and resets the write-ahead log this process still writes to (a corrupt database with two bench processes)."""
    import optuna

    from hpo.tuning.storage import check_storage, open_storage

    path = tmp_path / "h.db"
    held = open_storage(f"sqlite:///{path}", "--storage")
    optuna.create_study(storage=held, study_name="held")  # written: the log exists, and this process holds it open
    check_storage(f"sqlite:///{path}", "--storage")
    subprocess.run(
        [sys.executable, "-c", "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('SELECT 1 FROM studies').fetchall()",
         str(path)],
        check=True, timeout=60,
    )
    assert path.with_name("h.db-wal").exists(), "the other process's close reset the log this process still holds"
    assert optuna.get_all_study_names(held) == ["held"]


@pytest.mark.parametrize(
    ("url", "module", "install"),
    [
        ("postgresql+pg8000://postgres:hunter2@127.0.0.1/test", "pg8000", "pip install 'pg8000'"),
        ("mysql+mysqldb://root@127.0.0.1/test", "MySQLdb", "pip install 'mysqlclient'"),
    ],
)
def test_a_storage_driver_that_is_not_installed_names_the_pip_install(
    workdir: Path, capsys: pytest.CaptureFixture[str], url: str, module: str, install: str
) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    err = _fails(capsys, ["--study", "quick", "--n-trials", "2", "--storage", url], "is not installed: " + install)
    assert "hunter2" not in err
    assert not (workdir / "hpo.db").exists()


def test_psycopg_missing_names_its_pip_install(workdir: Path) -> None:
    # psycopg is installed with the test extra; this process is made unable to import it.
    block = "import sys; sys.modules['psycopg'] = None; from hpo.run import main; sys.exit(main(sys.argv[1:]))"
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    done = subprocess.run(
        [sys.executable, "-c", block, "--study", "quick", "--n-trials", "2", "--storage", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"hpo.run: error: --storage: driver 'psycopg' for {url} is not installed: pip install 'psycopg[binary]'\n"


def _waits_then_exits_75(capsys: pytest.CaptureFixture[str], argv: list[str], shown: str) -> str:
    """A storage not reachable at start is waited for (--storage-patience), then one error line and exit 75."""
    code = main([*argv, "--storage-patience", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_STORAGE_UNAVAILABLE, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"hpo.run: error: storage {shown} unreachable for 1 s"), err
    assert "(--storage-patience) while trying to connect: " in errors[0] and "Traceback" not in err
    return err


def test_unreachable_database_is_waited_for_and_hides_the_password(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg2://postgres:hunter2@127.0.0.1:1/test"
    err = _waits_then_exits_75(
        capsys, ["--study", "quick", "--n-trials", "2", "--storage", url],
        "postgresql+psycopg2://postgres:***@127.0.0.1:1/test (from --storage)",
    )
    assert "hunter2" not in err
    assert not list(workdir.iterdir()), "nothing written"


def test_storage_from_environment_is_named(workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_STORAGE", "mysql+pymysql://root@127.0.0.1:1/test")
    _waits_then_exits_75(capsys, ["--study", "quick", "--n-trials", "2"], "mysql+pymysql://root@127.0.0.1:1/test (from HPO_STORAGE)")


@pytest.mark.parametrize(
    ("server", "refusal"),
    [
        ("postgresql", 'database "hpo_no_such_database" does not exist'),
        ("mariadb", "Unknown database 'hpo_no_such_database'"),
    ],
)
def test_a_server_that_refuses_at_start_is_one_line_at_once(
    workdir: Path, capsys: pytest.CaptureFixture[str], server: str, refusal: str
) -> None:
    """A wrong database name is not an outage: no waiting (the default patience is 300 s), exit 2."""
    url = server_url(server).rsplit("/", 1)[0] + "/hpo_no_such_database"
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--storage", url], "--storage: cannot connect to", refusal)


def test_missing_dataset_offline_says_where_it_looked(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HPO_DATA_ARCHIVE", raising=False)
    empty = workdir / "nodata"
    empty.mkdir()
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--data-dir", str(empty)], f"looked in {empty}", "HPO_DATA_ARCHIVE", "--data-dir")
    assert not (workdir / "hpo.db").exists()


def _truncated_archive(folder: Path, archive: Path, jpegs: list[bytes]) -> Path:
    with archive.open("rb") as whole:
        (folder / "cut.tar.gz").write_bytes(whole.read(archive.stat().st_size // 2))
    return folder / "cut.tar.gz"


def _corrupt_image(folder: Path, archive: Path, jpegs: list[bytes]) -> Path:
    root = image_folder(folder / "set", jpegs, per_class=5)
    (root / "train" / "dog" / "0001.jpg").write_bytes(jpegs[-1][:300])  # a real JPEG, cut short
    return root


def _one_class(folder: Path, archive: Path, jpegs: list[bytes]) -> Path:
    return image_folder(folder / "set", jpegs, per_class=5, classes=("cat",))


def _unknown_test_class(folder: Path, archive: Path, jpegs: list[bytes]) -> Path:
    root = image_folder(folder / "set", jpegs, per_class=5)
    (root / "test" / "zebra").mkdir()
    (root / "test" / "zebra" / "0.jpg").write_bytes(jpegs[-1])
    return root


def _no_images(folder: Path, archive: Path, jpegs: list[bytes]) -> Path:
    (folder / "set" / "train" / "cat").mkdir(parents=True)
    return folder / "set"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_truncated_archive, ("cannot read archive {path} after ", "Compressed file ended before the end-of-stream marker")),
        (_corrupt_image, ("1 of 12 images in {path} are unreadable (up to 1% are skipped), first train/dog/0001.jpg",)),
        (_one_class, ("{path} has 1 class in train/<class>/ (only 'cat'); a classifier needs at least 2",)),
        (_unknown_test_class, ("{path} has test classes with no training images: zebra",)),
        (_no_images, ("no images under {path} in train/<class>/",)),
    ],
    ids=["truncated-archive", "corrupt-image", "one-class", "unknown-test-class", "no-images"],
)
def test_bad_data_is_one_line_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], image_archive: Path, jpegs: list[bytes], make,
    expected: tuple[str, ...],
) -> None:
    path = make(workdir, image_archive, jpegs)
    fragments = [text.format(path=path) for text in expected]
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--data-dir", str(path)], "hpo.run: error: data_dir: ", *fragments)
    assert not (workdir / "hpo.db").exists() and not (workdir / "hpo-checkpoints").exists()


@pytest.mark.parametrize("where", ["file", "/sys/hpo-checkpoints"])
def test_a_checkpoint_folder_that_cannot_be_written_is_named(
    workdir: Path, capsys: pytest.CaptureFixture[str], jpegs: list[bytes], where: str
) -> None:
    data = image_folder(workdir / "set", jpegs, per_class=5)
    if where == "file":
        (workdir / "file").write_text("")
    expected = "'file' is a file, not a folder" if where == "file" else f"cannot write in '{where}'"
    argv = ["--study", "quick", "--n-trials", "2", "--data-dir", str(data), "--checkpoint-dir", where]
    _fails(capsys, argv, f"hpo.run: error: --checkpoint-dir: {expected}")
    assert not (workdir / "hpo.db").exists()


def test_a_report_folder_that_cannot_be_written_is_named(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    from hpo.report import main as report

    url = f"sqlite:///{workdir / 'h.db'}"
    optuna.create_study(storage=url, study_name="quick")
    (workdir / "file").write_text("")
    assert report(["--study", "quick", "--storage", url, "--out", "file/report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hpo.report: error: --out: cannot write in 'file/report'") and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_a_gpu(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(capsys, ["--study", "quick", "--n-trials", "2", "--device", "cuda"], "--device: device 'cuda' asked for, but CUDA is not available")


def test_existing_study_with_other_direction_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str], image_archive: Path
) -> None:
    import optuna

    url = f"sqlite:///{workdir / 'h.db'}"
    optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    study_file = write_study(workdir, archive=image_archive)
    _fails(capsys, ["--study", str(study_file), "--n-trials", "2", "--storage", url], "already exists with direction 'maximize'")
    assert len(optuna.load_study(study_name="tiny", storage=url).trials) == 0


def test_real_process_exits_2_without_traceback(workdir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpo.run", "--study", "quick", "--n-trials", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == "hpo.run: error: argument --n-trials: must be a positive integer, got '0'\n"
    assert done.stdout == ""
