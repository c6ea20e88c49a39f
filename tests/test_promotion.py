"""Promotion halving (issue 21): a trial below the top of its rung pauses, keeps its checkpoint, and is resumed from it
when later trials bring it into the top; the budget counts the configuration once, and no epoch is trained twice."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import random_image_folder
from hpo.errors import SpecError
from hpo.run import main
from hpo.studyfile.samplers import PromotionHalvingPrunerSpec
from hpo.studyfile.spec import load_spec
from hpo.tuning.budget import Tally, duplicate, finished_configurations, original_number, surplus
from hpo.tuning.promotion import PAUSED_ATTR, PROMOTED_ATTR, Promotion, promote

RULE = Promotion(rungs=(1, 2), reduction_factor=2, minimize=True)


def _paused(study: optuna.Study, curve: list[float]) -> optuna.trial.FrozenTrial:
    """A trial that reported ``curve`` (epochs 1, 2, ...) and paused at its last epoch, as a worker leaves it."""
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, epoch)
    trial.set_user_attr(PAUSED_ATTR, len(curve))
    trial.set_user_attr("pruned_reason", "paused")
    return study.tell(trial, state=TrialState.PRUNED)


def _go_on(study: optuna.Study, values: dict[int, float], state: TrialState) -> optuna.trial.FrozenTrial:
    """The next queued trial (a resumption) reports the epochs after its inherited ones, then ends in ``state``."""
    trial = study.ask()
    for epoch, value in values.items():
        trial.report(value, epoch)
    return study.tell(trial, values[max(values)] if state == TrialState.COMPLETE else None, state=state)


def test_ranks_at_a_rung_count_each_configuration_once_and_the_highest_rung_is_promoted_first() -> None:
    study = optuna.create_study()
    low = _paused(study, [0.5])  # alone at epoch 1: 1 // 2 = 0 go on, so it pauses
    assert RULE.next_promotion(study.trials) is None
    _paused(study, [0.9])  # a worse one arrives: the first is now the top half of two, and due
    assert RULE.next_promotion(study.trials).number == low.number
    promote(study, low)
    queued = study.trials[-1]
    assert queued.state == TrialState.WAITING and queued.intermediate_values == {1: 0.5}
    assert queued.user_attrs[PROMOTED_ATTR] == low.number and PAUSED_ATTR not in queued.user_attrs
    assert "pruned_reason" not in queued.user_attrs and original_number(queued) == low.number
    assert RULE.next_promotion(study.trials) is None, "a configuration already resumed is not promoted again"
    assert RULE.top(study.trials, 1) == [low.number], "the resumed trial's inherited epoch is the same configuration"
    _paused_resumption(study, {2: 0.3})  # resumed, then paused at epoch 2: alone there
    later = _paused(study, [0.6, 0.8])  # a worse one paused at epoch 2 as well: the first is now due at epoch 2
    worst = _paused(study, [0.95])  # and epoch 1 has 4 configurations, whose top 2 (low, later) already went on
    assert RULE.top(study.trials, 1) == [low.number, later.number] and worst.number not in RULE.top(study.trials, 1)
    assert RULE.top(study.trials, 2) == [low.number], "two at epoch 2: low (0.3) before later (0.8)"
    due = RULE.next_promotion(study.trials)
    assert original_number(due) == low.number and due.user_attrs[PAUSED_ATTR] == 2, "the higher rung first"


def _paused_resumption(study: optuna.Study, values: dict[int, float]) -> None:
    trial = study.ask()
    for epoch, value in values.items():
        trial.report(value, epoch)
    trial.set_user_attr(PAUSED_ATTR, max(values))
    study.tell(trial, state=TrialState.PRUNED)


def test_a_larger_value_ranks_first_when_the_metric_is_maximized_and_a_diverged_one_last() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.2, math.nan, 0.7, 0.4):
        _paused(study, [value])
    rule = Promotion(rungs=(1,), reduction_factor=2, minimize=False)
    assert rule.top(study.trials, 1) == [2, 3]
    assert Promotion(rungs=(1,), reduction_factor=2, minimize=True).top(study.trials, 1) == [0, 3]


def test_a_paused_trial_and_its_resumption_hold_one_place_in_the_budget_and_a_second_promotion_is_refused() -> None:
    study = optuna.create_study()
    first = _paused(study, [0.5])
    _paused(study, [0.9])
    promote(study, first)
    promote(study, first)  # a second worker promoted it in the same instant
    trials = study.trials
    tally = Tally.of(study)
    assert (tally.finished, tally.running) == (1, 0), "two configurations: one paused, one queued (and its duplicate)"
    assert tally.waiting == 2, "the duplicate counts as queued, so that a worker takes it and ends it"
    assert duplicate(trials[2], trials) is None
    assert duplicate(trials[3], trials) == "duplicate: trial 2 already goes on from trial 0"
    _go_on(study, {2: 0.45}, TrialState.COMPLETE)  # takes trial 2, the first queued
    assert finished_configurations(study.trials) == 2
    twice = study.ask()
    assert twice.number == 3
    study.tell(twice, state=TrialState.FAIL)  # as the objective ends it: "duplicate"
    assert Tally.of(study).finished == 2 and finished_configurations(study.trials) == 2
    new = study.ask()  # trial 4: two configurations hold places ahead of it
    assert surplus(new, 2) == "surplus: 2 trials already hold the budget of 2"
    assert surplus(new, 3) is None


def test_the_rungs_lie_below_the_last_epoch_and_a_multi_objective_study_is_refused(tmp_path: Path) -> None:
    assert PromotionHalvingPrunerSpec(min_resource=1, reduction_factor=2).rungs(9) == (1, 2, 4, 8)
    assert PromotionHalvingPrunerSpec(min_resource=1, reduction_factor=2).rungs(8) == (1, 2, 4)
    assert PromotionHalvingPrunerSpec(min_resource=2, reduction_factor=3, min_early_stopping_rate=1).rungs(20) == (6, 18)
    one = tmp_path / "one.toml"
    one.write_text('[study]\nname = "one"\nmetric = "val_accuracy"\n[train]\nmax_epochs = 9\n'
                   '[pruner]\ntype = "promotion_halving"\nmin_resource = 2\nreduction_factor = 3\n')
    assert Promotion.of(load_spec(one)) == Promotion(rungs=(2, 6), reduction_factor=3, minimize=False)
    path = tmp_path / "two.toml"
    path.write_text(
        '[study]\nname = "two"\nobjectives = ["val_loss", "params"]\n[pruner]\ntype = "promotion_halving"\n'
    )
    with pytest.raises(SpecError, match=r'two.toml: \[pruner\] type = "promotion_halving" ranks one value per rung'):
        load_spec(path)


# --- real training: resumed trials against uninterrupted ones -------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image_folder(tmp_path_factory.mktemp("pictures"), train=8, test=2, size=12, seed=5)


def _study_file(folder: Path, pictures: Path, pruner: str) -> Path:
    path = folder / f"{pruner}.toml"
    path.write_text(
        f'[study]\nname = "promo"\nseed = 7\n[data]\ndataset = "image_folder"\ndata_dir = "{pictures.as_posix()}"\n'
        'image_size = 12\n[train]\nmax_epochs = 4\ndevice = "cpu"\n'
        # Every configuration the same but for its seed (the trial number): a lineage's curve is that trial's.
        '[space]\nlr = 0.05\nbatch_size = 4\ndepth = 1\nbase_width = 4\n'
        f'[pruner]\ntype = "{pruner}"\n' + ("min_resource = 1\nreduction_factor = 2\n" if pruner != "none" else "")
    )
    return path


@pytest.mark.slow
def test_a_promoted_trial_resumes_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path: Path, pictures: Path) -> None:
    """Eight configurations with rungs at epochs 1 and 2 of 4: every lineage's epochs are, value for value, those
    of the same trial trained without pauses; a resumption trains only the epochs after its pause; the budget holds
    eight configurations."""
    promo_url, plain_url = f"sqlite:///{tmp_path / 'promo.db'}", f"sqlite:///{tmp_path / 'plain.db'}"
    study_file = _study_file(tmp_path, pictures, "promotion_halving")
    assert main(["--study", str(study_file), "--n-trials", "8", "--storage", promo_url, "--quiet",
                 "--checkpoint-dir", str(tmp_path / "checkpoints")]) == 0
    trials = optuna.load_study(study_name="promo", storage=promo_url).trials
    lineages = {original_number(t) for t in trials}
    assert finished_configurations(trials) == 8 and len(lineages) == 8
    assert not list((tmp_path / "checkpoints").rglob("*.pt")), "budget met: the checkpoints of those left paused go too"
    # A configuration's seed is its first trial's number: the same numbers, trained without pauses.
    study_file = _study_file(tmp_path, pictures, "none")
    assert main(["--study", str(study_file), "--n-trials", str(max(lineages) + 1), "--storage", plain_url, "--quiet"]) == 0
    plain = {t.number: t.intermediate_values for t in optuna.load_study(study_name="promo", storage=plain_url).trials}
    resumed = [t for t in trials if PROMOTED_ATTR in t.user_attrs]
    assert resumed and any(t.state == TrialState.COMPLETE for t in resumed), "a paused trial was promoted to the end"
    assert any(PAUSED_ATTR in t.user_attrs and t.number not in {r.user_attrs[PROMOTED_ATTR] for r in resumed}
               for t in trials), "a trial stayed paused"
    for trial in trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), trial.user_attrs
        lineage = plain[original_number(trial)]
        assert trial.intermediate_values == {e: lineage[e] for e in trial.intermediate_values}, trial.number
    for trial in resumed:  # it loaded the checkpoint of the epoch it paused at and trained only the epochs after it
        paused = trials[trial.user_attrs[PROMOTED_ATTR]]
        assert trial.user_attrs["resumed_from_epoch"] == paused.user_attrs[PAUSED_ATTR] == max(paused.intermediate_values)
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert trial.intermediate_values == plain[original_number(trial)], "trained to the last epoch"


@pytest.mark.slow
def test_two_workers_promote_without_training_a_configuration_twice_or_passing_the_budget(
    tmp_path: Path, pictures: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study_file = _study_file(tmp_path, pictures, "promotion_halving")
    argv = [sys.executable, "-m", "hpo.run", "--study", str(study_file), "--n-trials", "10", "--storage", url, "--quiet",
            "--checkpoint-dir", str(tmp_path / "checkpoints")]
    workers = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    trials = optuna.load_study(study_name="promo", storage=url).trials
    kept = [t for t in trials if t.state != TrialState.FAIL]
    assert finished_configurations(trials) == 10 and len({original_number(t) for t in kept}) == 10
    trained: dict[int, list[int]] = {}  # lineage → every epoch a trial of it trained
    for trial in trials:
        if trial.state == TrialState.FAIL:
            # Two workers took the last place, or resumed one paused trial, in the same instant: failed untrained.
            assert trial.user_attrs["fail_reason"].startswith(("duplicate", "surplus")), trial.user_attrs
            assert not trial.intermediate_values or PROMOTED_ATTR in trial.user_attrs
            continue
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), trial.state
        start = int(trial.user_attrs.get("resumed_from_epoch", 0)) if PROMOTED_ATTR in trial.user_attrs else 0
        trained.setdefault(original_number(trial), []).extend(e for e in trial.intermediate_values if e > start)
    assert all(sorted(epochs) == list(range(1, len(epochs) + 1)) for epochs in trained.values()), trained
