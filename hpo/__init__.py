"""hpo: Optuna-driven hyperparameter search for PyTorch CNNs.

The Python API (the ``python -m hpo.*`` commands are shells over it)::

    import hpo

    study = hpo.search("quick", n_trials=8, storage="sqlite:///hpo.db", device="cpu")   # an optuna.Study
    saved = hpo.retrain(study)                        # the best trial, retrained and tested once: a SavedModel
    hpo.save_model(saved, Path("checkpoints/quick-best.pt"))
    hpo.write_report(study, out="reports/quick")      # report.html, trials.csv, summary.json
    hpo.pareto_front(study)                           # a multi-objective study's Pareto-optimal feasible trials
    # images already in memory (numpy or torch, NHWC or NCHW, uint8 or float in [0, 1]) instead of [data] dataset:
    study = hpo.search("quick", n_trials=8, data=hpo.ArrayData(x_train, y_train, x_test, y_test))
    saved = hpo.retrain(study, data=hpo.ArrayData(x_train, y_train, x_test, y_test))

    @hpo.register_model("mynet")                      # your own model: [model] name = "mynet"
    def build(in_channels, num_classes, image_size, *, width=32): ...

Each is imported on first use, so ``import hpo`` loads neither torch nor Optuna.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# Public name → the module that defines it.
_API = {
    "search": "hpo.launching.session",
    "retrain": "hpo.results.retrain",
    "replay": "hpo.results.retrain",
    "SavedModel": "hpo.results.retrain",
    "save_model": "hpo.results.retrain",
    "load_model": "hpo.results.retrain",
    "write_report": "hpo.results.report",
    "pareto_front": "hpo.tuning.pareto",
    "Hyperparameters": "hpo.studyfile.space",
    "register_model": "hpo.training.models",
    "ArrayData": "hpo.training.arrays",
}

__all__ = [
    "ArrayData", "Hyperparameters", "SavedModel", "load_model", "pareto_front", "register_model", "replay", "retrain",
    "save_model", "search", "write_report",
]

if TYPE_CHECKING:
    from hpo.launching.session import search
    from hpo.results.report import write_report
    from hpo.results.retrain import SavedModel, load_model, replay, retrain, save_model
    from hpo.studyfile.space import Hyperparameters
    from hpo.training.arrays import ArrayData
    from hpo.training.models import register_model
    from hpo.tuning.pareto import pareto_front


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'hpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
