"""Successive halving by promotion: a trial below the top of a rung pauses there and is resumed when promoted.

ASHA as its paper states it (Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020).
Optuna's SuccessiveHalvingPruner is its stopping form: a trial ranked below the top ``1 / reduction_factor``
at a rung is pruned for good, even when it was ranked against two or three trials that happened to come
first.  Here (``[pruner] type = "promotion_halving"``):

- at a rung epoch a trial is ranked against every configuration that reached that epoch; in the top
  ``len // reduction_factor`` it trains on at once, below it *pauses*: it ends PRUNED with ``PAUSED_ATTR``
  (the rung epoch), and its epoch checkpoint is kept;
- before it starts a new configuration, a worker *promotes* the best paused trial (highest rung first)
  that later trials have since brought into the top of its rung: it queues a trial that goes on from it
  (Optuna's retry callback: the paused trial's parameters, seed and curve, ``PROMOTED_ATTR`` naming it),
  which resumes from the checkpoint, exactly as an uninterrupted run would have gone on;
- the budget counts the configuration once (:mod:`hpo.tuning.budget`'s lineages), and a worker whose budget
  is met still promotes what can be promoted, so the best configurations train to the last epoch.

Two workers may promote one paused trial in the same instant; the later of the two queued trials fails
before it trains (``budget.duplicate``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.studyfile.samplers import PromotionHalvingPrunerSpec
from hpo.studyfile.spec import StudySpec
from hpo.tuning.budget import lineage_tips, original_number
from hpo.tuning.retry import RETRY_CALLBACK

logger = logging.getLogger(__name__)

# User attrs: the rung epoch a trial paused at; the number of the paused trial a trial goes on from.
PAUSED_ATTR = "paused_at_epoch"
PROMOTED_ATTR = "promoted_from"
# A paused trial's attrs that describe its pause or its own resumption, not the configuration: not inherited.
_NOT_INHERITED = (PAUSED_ATTR, "pruned_reason", "resumed_from_epoch", "fail_reason")


@dataclass(frozen=True)
class Promotion:
    """The rungs of a study and how a configuration is ranked at them."""

    rungs: tuple[int, ...]  # epochs, ascending, all below max_epochs
    reduction_factor: int
    minimize: bool  # the direction of the study's (single) objective

    @classmethod
    def of(cls, spec: StudySpec) -> Promotion | None:
        """The study's promotion rule, or None when its pruner is not ``promotion_halving``."""
        pruner = spec.pruner
        if not isinstance(pruner, PromotionHalvingPrunerSpec):
            return None
        return cls(
            rungs=pruner.rungs(spec.train.max_epochs), reduction_factor=pruner.reduction_factor,
            minimize=spec.study.directions[0] == "minimize",
        )

    def _key(self, value: float) -> float:
        if math.isnan(value):
            return math.inf  # a diverged configuration ranks last
        return value if self.minimize else -value

    def top(self, trials: Sequence[FrozenTrial], epoch: int) -> list[int]:
        """The configurations (lineages, by first trial number) in the top ``1 / reduction_factor`` of those that
        reported ``epoch``, best first; ties go to the earlier configuration."""
        values: dict[int, float] = {}
        for trial in trials:
            if epoch in trial.intermediate_values:  # a lineage's trials inherit its curve: counted once
                values.setdefault(original_number(trial), trial.intermediate_values[epoch])
        ranked = sorted(values, key=lambda lineage: (self._key(values[lineage]), lineage))
        return ranked[: len(values) // self.reduction_factor]

    def goes_on(self, trials: Sequence[FrozenTrial], lineage: int, epoch: int) -> bool:
        """Whether configuration ``lineage``, having reported rung ``epoch``, trains on (else it pauses)."""
        return lineage in self.top(trials, epoch)

    def next_promotion(self, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
        """The paused trial to resume next: from the highest rung down, the best paused one now in its rung's top."""
        paused = {
            original_number(tip): tip
            for tip in lineage_tips(trials)
            if tip.state == TrialState.PRUNED and PAUSED_ATTR in tip.user_attrs
        }
        if not paused:
            return None
        for epoch in reversed(self.rungs):
            for lineage in self.top(trials, epoch):
                trial = paused.get(lineage)
                if trial is not None and trial.user_attrs[PAUSED_ATTR] == epoch:
                    return trial
        return None


def promote(study: optuna.Study, paused: FrozenTrial) -> None:
    """Queue the trial that resumes ``paused``: its parameters, attrs and curve, linked to it as a retry is."""
    queued = copy.deepcopy(paused)
    for key in _NOT_INHERITED:
        queued.user_attrs.pop(key, None)
    queued.set_user_attr(PROMOTED_ATTR, paused.number)
    RETRY_CALLBACK(max_retry=None, inherit_intermediate_values=True)(study, queued)
    logger.info(
        "paused trial %d promoted from epoch %d: a new trial resumes it from its checkpoint",
        paused.number, paused.user_attrs[PAUSED_ATTR],
    )
