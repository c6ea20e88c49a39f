"""The ``[sampler]`` and ``[pruner]`` tables: one frozen dataclass per Optuna sampler and pruner.

Each dataclass's fields are its Optuna class's keyword arguments, named the same, so that
:mod:`hpo.tuning.study` builds the Optuna object from the fields alone; ``type`` in the table is the
key of ``SAMPLERS`` or ``PRUNERS``.  To add a sampler or pruner: a dataclass here, a row in the
mapping, and its Optuna class in ``hpo.tuning.study.SAMPLER_CLASSES`` / ``PRUNER_CLASSES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Union


def _at_least(section: object, **minimum: int) -> None:
    for key, low in minimum.items():
        value = getattr(section, key)
        if value is not None and value < low:
            raise ValueError(f"{key} must be >= {low}, got {value!r}")


@dataclass(frozen=True)
class TpeSamplerSpec:
    # Stated explicitly: defaults differ between Optuna 4 and 5.
    n_startup_trials: int = 10
    multivariate: bool = True
    constant_liar: bool = True
    # Multivariate TPE per group of hyperparameters that occur together: for conditional spaces.
    group: bool = False

    def __post_init__(self) -> None:
        _at_least(self, n_startup_trials=0)
        if self.group and not self.multivariate:
            raise ValueError("group = true needs multivariate = true")


@dataclass(frozen=True)
class RandomSamplerSpec:
    pass


@dataclass(frozen=True)
class GridSamplerSpec:
    """Every combination of the [space] choices and int ranges (float ranges need a step)."""


@dataclass(frozen=True)
class CmaEsSamplerSpec:
    # Random trials before CMA-ES starts; categorical hyperparameters are always sampled at random.
    n_startup_trials: int = 1
    # Initial step size (None: Optuna's, a sixth of each range).
    sigma0: float | None = None
    # Keeps int and stepped hyperparameters from getting stuck on one value (CMA-ES with margin).
    with_margin: bool = False
    # Learning-rate adaptation, for noisy objectives.
    lr_adapt: bool = False
    popsize: int | None = None
    consider_pruned_trials: bool = False

    def __post_init__(self) -> None:
        _at_least(self, n_startup_trials=0, popsize=2)
        if self.sigma0 is not None and not self.sigma0 > 0:
            raise ValueError(f"sigma0 must be > 0, got {self.sigma0!r}")


@dataclass(frozen=True)
class GpSamplerSpec:
    # Random trials before the Gaussian process takes over.
    n_startup_trials: int = 10
    deterministic_objective: bool = False

    def __post_init__(self) -> None:
        _at_least(self, n_startup_trials=0)


@dataclass(frozen=True)
class QmcSamplerSpec:
    qmc_type: Literal["sobol", "halton"] = "sobol"
    # Scrambled with the study seed; unscrambled sequences are the same in every study.
    scramble: bool = False


@dataclass(frozen=True)
class NsgaIISamplerSpec:
    """NSGA-II, the genetic algorithm for multi-objective studies (single-objective ones work too)."""

    # Trials per generation.
    population_size: int = 50
    # Chance that a child takes each hyperparameter at random (None: Optuna's, 1 / number of hyperparameters).
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5

    def __post_init__(self) -> None:
        _at_least(self, population_size=2)
        for key in ("mutation_prob", "crossover_prob", "swapping_prob"):
            value = getattr(self, key)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{key} must be from 0 to 1, got {value!r}")


@dataclass(frozen=True)
class MedianPrunerSpec:
    # Trials that finish before any pruning happens, epochs before a trial may be pruned,
    # and how often (in epochs) the check runs.
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1

    def __post_init__(self) -> None:
        _at_least(self, n_startup_trials=0, n_warmup_steps=0, interval_steps=1)


@dataclass(frozen=True)
class PercentilePrunerSpec:
    # Prune a trial whose epoch value is worse than this percentile (0..100) of the others' at that epoch.
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be from 0 to 100, got {self.percentile!r}")
        _at_least(self, n_startup_trials=0, n_warmup_steps=0, interval_steps=1)


@dataclass(frozen=True)
class SuccessiveHalvingPrunerSpec:
    # None lets Optuna estimate min_resource from the first finished trial ("auto").
    min_resource: int | None = None
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0

    def __post_init__(self) -> None:
        _at_least(self, min_resource=1, reduction_factor=2, min_early_stopping_rate=0)


@dataclass(frozen=True)
class PromotionHalvingPrunerSpec:
    """Successive halving by promotion (ASHA as its paper states it; hpo.tuning.promotion): a trial below the top
    ``1 / reduction_factor`` of the trials at a rung pauses there, its checkpoint kept, and is resumed from it
    once enough later trials did worse at that rung.  Optuna has no such pruner: hpo decides at the rungs."""

    # Epochs: the first rung; the rungs are min_resource * reduction_factor ** (min_early_stopping_rate + k).
    min_resource: int = 1
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0

    def __post_init__(self) -> None:
        _at_least(self, min_resource=1, reduction_factor=2, min_early_stopping_rate=0)

    def rungs(self, max_epochs: int) -> tuple[int, ...]:
        """The rung epochs below ``max_epochs``: a trial that trains its last epoch completes, never pauses."""
        epochs, rung = [], self.min_resource * self.reduction_factor**self.min_early_stopping_rate
        while rung < max_epochs:
            epochs.append(rung)
            rung *= self.reduction_factor
        return tuple(epochs)


@dataclass(frozen=True)
class HyperbandPrunerSpec:
    # Epochs; max_resource None means the study's max_epochs.
    min_resource: int = 1
    max_resource: int | None = None
    reduction_factor: int = 3

    def __post_init__(self) -> None:
        _at_least(self, min_resource=1, max_resource=1, reduction_factor=2)


@dataclass(frozen=True)
class PatientPrunerSpec:
    # Prune once the metric has not improved by more than min_delta for patience epochs in a row.
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _at_least(self, patience=0)
        if self.min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta!r}")


@dataclass(frozen=True)
class ThresholdPrunerSpec:
    # Prune a trial whose epoch value falls below lower or rises above upper (in metric units).
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = 0
    interval_steps: int = 1

    def __post_init__(self) -> None:
        if self.lower is None and self.upper is None:
            raise ValueError("give lower, upper or both")
        if self.lower is not None and self.upper is not None and not self.lower < self.upper:
            raise ValueError(f"lower must be < upper, got lower={self.lower!r} upper={self.upper!r}")
        _at_least(self, n_warmup_steps=0, interval_steps=1)


@dataclass(frozen=True)
class NopPrunerSpec:
    pass


SamplerSpec = Union[
    TpeSamplerSpec, RandomSamplerSpec, GridSamplerSpec, CmaEsSamplerSpec, GpSamplerSpec, QmcSamplerSpec,
    NsgaIISamplerSpec,
]
PrunerSpec = Union[
    MedianPrunerSpec,
    PercentilePrunerSpec,
    SuccessiveHalvingPrunerSpec,
    PromotionHalvingPrunerSpec,
    HyperbandPrunerSpec,
    PatientPrunerSpec,
    ThresholdPrunerSpec,
    NopPrunerSpec,
]

SAMPLERS: Mapping[str, type] = {
    "tpe": TpeSamplerSpec,
    "random": RandomSamplerSpec,
    "grid": GridSamplerSpec,
    "cmaes": CmaEsSamplerSpec,
    "gp": GpSamplerSpec,
    "qmc": QmcSamplerSpec,
    "nsga2": NsgaIISamplerSpec,
}
# Samplers that optimize one objective only (Optuna refuses a multi-objective study).
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
PRUNERS: Mapping[str, type] = {
    "median": MedianPrunerSpec,
    "percentile": PercentilePrunerSpec,
    "successive_halving": SuccessiveHalvingPrunerSpec,
    "promotion_halving": PromotionHalvingPrunerSpec,
    "hyperband": HyperbandPrunerSpec,
    "patient": PatientPrunerSpec,
    "threshold": ThresholdPrunerSpec,
    "none": NopPrunerSpec,
}


def may_prune_at(pruner: PrunerSpec, epoch: int) -> bool:
    """Whether ``pruner`` can prune at ``epoch`` (1-based, every epoch reported), as Optuna's pruner decides it.

    Each ``should_prune`` reads the study's trials from the storage (one round trip, and more for a study of
    thousands of trials); at the epochs where the pruner answers "no" whatever the others did, hpo does not ask.
    Median, percentile and threshold pruners decide from ``n_warmup_steps`` on, every ``interval_steps``;
    successive halving only at its rungs, ``min_resource * reduction_factor ** (min_early_stopping_rate + k)``;
    no pruner never, nor promotion halving, whose rungs hpo judges itself (hpo.tuning.promotion).  Hyperband (a
    bracket per trial) and the patient pruner are always asked.
    """
    if isinstance(pruner, (NopPrunerSpec, PromotionHalvingPrunerSpec)):
        return False
    if isinstance(pruner, (MedianPrunerSpec, PercentilePrunerSpec, ThresholdPrunerSpec)):
        return epoch >= pruner.n_warmup_steps and (epoch - pruner.n_warmup_steps) % pruner.interval_steps == 0
    if isinstance(pruner, SuccessiveHalvingPrunerSpec) and pruner.min_resource is not None:
        rung = pruner.min_resource * pruner.reduction_factor**pruner.min_early_stopping_rate
        while rung < epoch:
            rung *= pruner.reduction_factor
        return rung == epoch
    return True
