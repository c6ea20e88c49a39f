"""Multi-objective studies (issue 18): objectives measured as they claim, constraints that keep a trial off the
front, pruning through the curves study, and the front wherever the user looks."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from hpo.best import main as best_main
from hpo.results.report import write_report
from hpo.results.summary import summarize, summary_lines
from hpo.run import main as run_main
from hpo.training.measure import LATENCY_RUNS, LATENCY_WARMUP, count_macs, latency_ms, measure_costs
from hpo.tuning.pareto import CONSTRAINTS_ATTR, CONSTRAINTS_ON_TRIALS, CURVE_ATTR, curves_study_name, pareto_front

# --- measuring (no training) ---------------------------------------------------------------------------------


def _tiny_net() -> nn.Module:
    # 3x8x8 in: a 3x3 convolution to 4 channels (padding 1: 4x8x8 out), then a linear layer to 10 classes.
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_params_and_macs_of_a_tiny_net_match_a_hand_count() -> None:
    conv_macs = (4 * 8 * 8) * (3 * 3 * 3)  # one MAC per output value per weight it reads: 6,912
    linear_macs = (4 * 8 * 8) * 10  # 2,560
    assert count_macs(_tiny_net(), (3, 8, 8)) == conv_macs + linear_macs == 9_472
    conv_params, linear_params = 4 * 3 * 3 * 3 + 4, 256 * 10 + 10  # weights and biases: 112 and 2,570
    costs = measure_costs(_tiny_net(), ["params", "macs"], image_shape=(3, 8, 8), device=torch.device("cpu"))
    assert costs == {"params": conv_params + linear_params, "macs": 9_472}


CALLS: list[int] = []  # a module global: the copy measure_costs makes shares it with the original


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 4, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS.append(x.shape[0])
        return self.dropout(self.linear(x.flatten(1)))


def test_latency_is_the_median_of_timed_runs_after_warm_up_and_leaves_model_and_random_state_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from hpo.training import measure

    # A clock of our own: each timed pass lasts a chosen number of milliseconds, so the median is known
    # exactly and nothing depends on how fast this machine is.
    durations_ms = [float(((7 * i) % LATENCY_RUNS) ** 2) for i in range(LATENCY_RUNS)]  # median 49, mean 70
    ticks = iter([t for i, d in enumerate(durations_ms) for t in (float(i), i + d / 1000.0)])
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    model = _Counting().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    CALLS.clear()
    milliseconds = latency_ms(model, (3, 4, 4), torch.device("cpu"))
    assert CALLS == [1] * (LATENCY_WARMUP + LATENCY_RUNS), "warm-up passes, then timed ones, one image each"
    assert milliseconds == pytest.approx(statistics.median(durations_ms))
    assert torch.equal(torch.get_rng_state(), rng), "no draw from the random state the trial trains with"
    assert model.training, "the trial's model stays in training mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measuring_names_only_what_is_asked() -> None:
    assert measure_costs(_tiny_net(), ["val_loss", "train_seconds"], image_shape=(3, 8, 8), device=torch.device("cpu")) == {}


# --- a multi-objective study told by hand (no training) -------------------------------------------------------

STUDY_FILE = """
[study]
name = "mo"
objectives = ["val_loss", "params"]
constraints = {{ params = 1000 }}

[data]
data_dir = "{data_dir}"
train_subset = 256
val_subset = 128

[train]
max_epochs = 2
device = "cpu"

[sampler]
type = "random"

[pruner]
type = "median"
n_startup_trials = 1

[space]
lr = {{ choices = [0.000001, 0.05] }}
batch_size = 32
depth = {{ low = 1, high = 2 }}
base_width = {{ choices = [4, 8] }}
"""


def _study_file(folder: Path, data_dir: Path) -> Path:
    path = folder / "mo.toml"
    path.write_text(STUDY_FILE.format(data_dir=data_dir.as_posix()))
    return path


# (val_loss per epoch, params, state): trial 3 is better than every other in both objectives, but over the
# params limit (1000); trial 4 was pruned after one epoch.
TOLD = [
    ([2.1, 1.9], 800, TrialState.COMPLETE),
    ([2.2, 2.0], 300, TrialState.COMPLETE),
    ([2.2, 2.1], 900, TrialState.COMPLETE),  # dominated by trial 0
    ([1.5, 1.2], 200 + 1000, TrialState.COMPLETE),  # infeasible
    ([2.5], 100, TrialState.PRUNED),
]


def _told(url: str) -> optuna.Study:
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize", "minimize"])
    study.set_metric_names(["val_loss", "params"])
    lr = {"lr": optuna.distributions.CategoricalDistribution([0.000001, 0.05])}
    for number, (curve, params, state) in enumerate(TOLD):
        trial = study.ask(lr)
        trial.set_user_attr("seed", number)
        trial.set_user_attr(CURVE_ATTR, curve)
        trial.set_user_attr(CONSTRAINTS_ATTR, [params - 1000.0])
        if CONSTRAINTS_ON_TRIALS:  # Optuna >= 5; Optuna 4's samplers read the user attr (hpo.tuning.pareto)
            trial.set_constraint("params", params - 1000.0)
        study.tell(trial, [min(curve), params] if state == TrialState.COMPLETE else None, state=state)
    return study


def test_the_front_leaves_infeasible_trials_out_and_equals_optunas_best_trials(tmp_path: Path) -> None:
    study = _told(f"sqlite:///{tmp_path / 'hpo.db'}")
    front = [t.number for t in pareto_front(study)]
    assert front == [0, 1], "trial 3 dominates both but is over the params limit; trial 2 is dominated by 0"
    if CONSTRAINTS_ON_TRIALS:  # Optuna 4's best_trials sees constraints only through a sampler's constraints_func
        assert front == sorted(t.number for t in study.best_trials)


def test_summary_and_report_list_the_front_and_the_table_marks_it(tmp_path: Path) -> None:
    study = _told(f"sqlite:///{tmp_path / 'hpo.db'}")
    summary = summarize(study, storage_shown="here", metric="val_loss", max_epochs=2)
    lines = summary_lines(summary)
    assert "Objectives: val_loss (minimize), params (minimize)" in lines
    assert "Pareto front: 2 trials (complete, feasible, dominated by none)" in lines
    assert "  #0: val_loss 1.9, params 800" in lines and "  #1: val_loss 2, params 300" in lines
    assert not any(line.startswith("  #3") for line in lines), "the infeasible trial is never shown as best"
    assert summary.epochs_trained == 2 + 2 + 2 + 2 + 1, "epochs counted from the recorded curves"
    files = write_report(study, out=tmp_path / "report", max_epochs=2, storage_shown="here")
    with files.trials.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows if r["pareto_front"] == "True"] == [0, 1]
    assert [r["params"] for r in rows][:2] == ["800.0", "300.0"] and "value" not in rows[0]
    assert [r["epochs_reported"] for r in rows] == ["2", "2", "2", "2", "1"]
    assert [f["number"] for f in json.loads(files.summary.read_text())["front"]] == [0, 1]
    page = files.page.read_text()
    assert "<h2>Pareto front</h2>" in page and 'id="figure-0"' in page, "the front's figure is drawn first"
    assert "<h2>Learning curves</h2>" in page and 'id="figure-2"' in page, "the curves come from the curve attr"


def test_best_without_trial_refuses_with_one_line_listing_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    _told(url)
    study_file = _study_file(tmp_path, tmp_path / "no-data")
    assert best_main(["--study", str(study_file), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "study 'mo' has 2 objectives (val_loss, params) and no single best trial; give --trial N" in err
    assert "#0 (val_loss 1.9, params 800); #1 (val_loss 2, params 300)" in err, err
    assert best_main(["--study", str(study_file), "--storage", url, "--top", "2", "--seeds", "1"]) == 2
    assert "argument --seeds: re-evaluation ranks trials by one objective" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("study_table", "expected"),
    [
        ('objectives = ["val_loss", "flops"]', "[study]: objectives must be one of"),
        ('objectives = ["val_loss"]\nconstraints = { params = 5 }', "[study]: constraints: params is not measured"),
        ('objectives = ["val_loss", "params"]\nconstraints = { params = 0 }', "[study]: constraints: params must be a number > 0, got 0.0"),
        ('metric = "val_loss"\nobjectives = ["val_loss", "params"]', "[study] give objectives or metric, not both"),
    ],
)
def test_bad_objectives_exit_2_in_one_line_and_store_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], study_table: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(f"[study]\n{study_table}\n")
    assert run_main(["--study", str(path), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hpo.run: error: {path}: ") and expected in err, err
    assert not (tmp_path / "hpo.db").exists()


# --- a real multi-objective study (training) ------------------------------------------------------------------


@pytest.mark.slow
def test_a_multi_objective_study_prunes_skips_infeasible_trials_and_reports_its_front(
    tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpo.results.retrain import retrain

    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, archive)
    # The points, in order: a complete one first (the median pruner needs one), then one that barely learns
    # (lr 1e-6: pruned at epoch 1), one over the params limit (depth 2, width 8: 1,586 parameters), a fine one.
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize", "minimize"])
    for lr, depth, width in ((0.05, 1, 4), (0.000001, 1, 8), (0.05, 2, 8), (0.05, 1, 8)):
        study.enqueue_trial({"lr": lr, "depth": depth, "base_width": width})
    assert run_main(["--study", str(study_file), "--n-trials", "4", "--storage", url, "--quiet"]) == 0
    study = optuna.load_study(study_name="mo", storage=url)
    assert study.metric_names == ["val_loss", "params"], "the dashboard shows the objectives' names"
    trials = study.trials
    assert trials[0].state == TrialState.COMPLETE and trials[0].values[1] == trials[0].user_attrs["params"]
    assert trials[0].values[0] == min(trials[0].user_attrs[CURVE_ATTR]) and len(trials[0].user_attrs[CURVE_ATTR]) == 2

    pruned = trials[1]
    assert pruned.state == TrialState.PRUNED and pruned.user_attrs["pruned_reason"].startswith("pruned at epoch 1")
    twins = optuna.load_study(study_name=curves_study_name("mo"), storage=url)
    twin = twins.trials[pruned.user_attrs["curve_trial"]]
    assert twin.state == TrialState.PRUNED and twin.user_attrs["trial"] == 1
    assert list(twin.intermediate_values.values()) == pruned.user_attrs[CURVE_ATTR], "the twin reported the curve"

    infeasible = trials[2]
    assert infeasible.state == TrialState.PRUNED and infeasible.user_attrs["params"] == 1586
    assert infeasible.user_attrs["pruned_reason"] == "infeasible before training: params 1586 > 1000"
    assert CURVE_ATTR not in infeasible.user_attrs, "no epoch trained"
    assert infeasible.user_attrs[CONSTRAINTS_ATTR] == [586.0], "how far over the limit"
    if CONSTRAINTS_ON_TRIALS:
        assert infeasible.constraints == {"params": 586.0}, "Optuna's own record, which its samplers read"

    front = [t.number for t in pareto_front(study)]
    assert front and 2 not in front
    if CONSTRAINTS_ON_TRIALS:
        assert front == sorted(t.number for t in study.best_trials)
    out = capsys.readouterr().out
    assert "Pareto front:" in out and f"  #{front[0]}: val_loss " in out
    saved = retrain(study, front[0], study_file=study_file)  # hpo.best --trial N on a front member
    assert saved.trial == front[0] and saved.epochs == 2


def test_the_benchs_hypervolume_matches_a_hand_computed_area(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_pareto", Path(__file__).resolve().parent.parent / "bench" / "pareto.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_pareto", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    # (1, 3) and (2, 1) against (4, 4): the strip x in [1, 4] above y = 3 (3 x 1) plus x in [2, 4] for y in [1, 3] (2 x 2).
    assert bench.hypervolume_2d([(1.0, 3.0), (2.0, 1.0)], (4.0, 4.0)) == 7.0
    # A dominated point and one beyond the reference add nothing.
    assert bench.hypervolume_2d([(1.0, 3.0), (2.0, 1.0), (3.0, 3.5), (5.0, 0.5)], (4.0, 4.0)) == 7.0
    assert bench.hypervolume_2d([], (4.0, 4.0)) == 0.0


def test_a_stored_study_resumes_only_with_the_same_objectives(tmp_path: Path) -> None:
    from hpo.errors import StorageError
    from hpo.studyfile.spec import load_spec
    from hpo.tuning.study import open_study

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hpo.db'}")
    path = tmp_path / "s.toml"
    path.write_text('[study]\nname = "s"\nobjectives = ["val_loss", "params"]\n')
    study = open_study(load_spec(path), storage)
    assert study.metric_names == ["val_loss", "params"] and len(study.directions) == 2
    assert isinstance(study.pruner, optuna.pruners.NopPruner), "the curves study prunes, not this one"
    path.write_text('[study]\nname = "s"\nobjectives = ["val_loss", "macs"]\n')  # the same directions
    with pytest.raises(StorageError, match=r"already exists with objectives \['val_loss', 'params'\], not \['val_loss', 'macs'\]"):
        open_study(load_spec(path), storage)
    path.write_text('[study]\nname = "s"\nmetric = "val_loss"\n')
    with pytest.raises(StorageError, match=r"already exists with directions \['minimize', 'minimize'\], not \['minimize'\]"):
        open_study(load_spec(path), storage)


@pytest.mark.slow
def test_two_workers_on_one_multi_objective_study_keep_every_trial_and_its_twin_in_step(tmp_path: Path, archive: Path) -> None:
    """Two hpo.run processes share the study and its curves study: every finished trial has exactly one twin,
    which ended as it did and reported its curve; none is left running."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, archive)
    argv = [sys.executable, "-m", "hpo.run", "--study", str(study_file), "--n-trials", "6", "--storage", url, "--quiet"]
    workers = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    stored = optuna.load_study(study_name="mo", storage=url).trials
    twins = optuna.load_study(study_name=curves_study_name("mo"), storage=url).trials
    # Both workers may take the last place in the same instant: the later trial fails as a surplus before it trains
    # (and before it has a twin), as in every study (hpo.tuning.budget).
    surplus = [t for t in stored if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason", "").startswith("surplus")]
    trials = [t for t in stored if t not in surplus]
    assert len(trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), stored
    assert all(t.number >= 6 and "curve_trial" not in t.user_attrs for t in surplus)
    assert sorted(t.user_attrs["curve_trial"] for t in trials) == sorted(t.number for t in twins), "one twin each"
    for trial in trials:
        twin = twins[trial.user_attrs["curve_trial"]]
        assert twin.user_attrs["trial"] == trial.number and twin.state == trial.state
        assert list(twin.intermediate_values.values()) == trial.user_attrs.get(CURVE_ATTR, [])


def test_the_reaper_ends_the_curve_twin_of_a_trial_ended_without_its_worker(tmp_path: Path) -> None:
    """A multi-objective trial reaped (its worker killed) leaves its twin RUNNING in the curves study: the reaper ends
    it; the twin of a live trial, and a twin not yet linked to its trial, are left alone."""
    from hpo.tuning.heartbeat import Reaper
    from hpo.tuning.outage import StorageGuard
    from hpo.tuning.pareto import TWIN_OF_ATTR, curves_study_name
    from hpo.tuning.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", "test")
    study = optuna.create_study(study_name="mo", storage=storage, directions=["minimize", "minimize"])
    curves = optuna.create_study(study_name=curves_study_name("mo"), storage=storage)
    dead, live = study.ask(), study.ask()
    for owner in (dead, live):
        twin = curves.ask()
        twin.set_user_attr(TWIN_OF_ATTR, owner.number)
    unlinked = curves.ask()
    study.tell(dead, state=TrialState.FAIL)  # as a reaper does to a trial whose worker was killed
    reaper = Reaper(study=study, guard=StorageGuard(shown="test"), interval=1, grace_period=60, curves="mo:curves",
                    storage=storage)
    reaper.reap()
    assert [t.state for t in curves.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    assert curves.trials[2].number == unlinked.number
