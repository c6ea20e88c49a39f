"""Experiment trackers as trial callbacks: MLflow and TensorBoard, each switched on by one ``[tracking]`` key.

Each tracker sees every finished (complete or pruned) trial once the worker has told it, in whichever
worker process ran it: its hyperparameters, its value and the study metric of every epoch (the values the
pruner saw, from the trial's intermediate values), so a tracker's charts show each trial's learning curve.
Training code knows nothing of them.  Failed trials are left out: their retry is tracked when it finishes.

* ``mlflow = "sqlite:///mlflow.db"`` (any tracking URI; MLflow 3 refuses a ``file:`` folder unless
  ``MLFLOW_ALLOW_FILE_STORE=true``): one run per trial, named ``trial <N>``, in the experiment named like the
  study: the hyperparameters as params, the metric at every epoch (``val_loss``, step = epoch), the trial's
  objective as ``value``, its state and user attrs as tags.
* ``tensorboard = "runs"``: ``torch.utils.tensorboard.SummaryWriter`` writes ``runs/<study>/trial-<N>``: the
  metric per epoch as a scalar, and the hyperparameters with the trial's value for TensorBoard's HParams tab.
  (optuna-integration's TensorBoardCallback needs TensorFlow, which hpo does not otherwise need.)

A tracker that fails (its server away, a full disk) logs a warning; the search goes on, as the study holds
every result anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import optuna

from hpo.errors import SpecError
from hpo.studyfile.spec import StudySpec
from hpo.tuning.budget import FINISHED_STATES

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "hpo[trackers]"'


class _Tracker:
    """A trial callback that passes finished trials to :meth:`track` and turns its errors into warnings."""

    name = ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state not in FINISHED_STATES:
            return
        try:
            self.track(study, trial)
        except Exception as exc:  # noqa: BLE001 (any tracker's error: its server's, its files')
            logger.warning("trial %d: %s did not take it: %s", trial.number, self.name, exc)

    def track(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        raise NotImplementedError


class MlflowTracker(_Tracker):
    """One MLflow run per trial, through ``mlflow.MlflowClient`` (optuna-integration's MLflowCallback is
    deprecated since its 4.9 and logs no per-epoch values)."""

    name = "MLflow"

    def __init__(self, tracking_uri: str, metric: str) -> None:
        import mlflow

        self.metric = metric
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)

    def _experiment_id(self, name: str) -> str:
        """The experiment named like the study, made by the first worker that needs it."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another worker made it in the same instant
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def track(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        from mlflow.entities import Metric, Param

        tags = {"study": study.study_name, "number": str(trial.number), "state": trial.state.name}
        tags.update({key: str(value)[:5000] for key, value in trial.user_attrs.items()})  # MLflow's tag value limit
        run = self.client.create_run(self._experiment_id(study.study_name), run_name=f"trial {trial.number}", tags=tags)
        now = int(time.time() * 1000)  # ms since the epoch, as MLflow stamps metrics
        # The study's metric at every epoch (step = epoch): each trial's learning curve, as the pruner saw it.
        metrics = [Metric(self.metric, value, now, epoch) for epoch, value in sorted(trial.intermediate_values.items())]
        if trial.value is not None:
            metrics.append(Metric("value", trial.value, now, 0))  # the trial's objective value, as Optuna stores it
        params = [Param(key, str(value)) for key, value in trial.params.items()]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[])
        self.client.set_terminated(run.info.run_id, status="FINISHED")


class TensorBoardTracker(_Tracker):
    name = "TensorBoard"

    def __init__(self, folder: str, metric: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer_class = SummaryWriter
        self.folder = Path(folder)
        self.metric = metric

    def track(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log_dir = self.folder / study.study_name / f"trial-{trial.number}"
        with self.writer_class(log_dir=str(log_dir)) as writer:
            for epoch, value in sorted(trial.intermediate_values.items()):
                writer.add_scalar(self.metric, value, epoch)
            # A pruned trial has no value: its last reported one is what the pruner judged it by.
            last = trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None
            value = trial.value if trial.value is not None else last
            if value is not None:
                hparams = {**trial.params, "state": trial.state.name}
                writer.add_hparams(hparams, {f"hparam/{self.metric}": value}, run_name=".")


def tracker_callbacks(spec: StudySpec) -> Sequence[_Tracker]:
    """The trackers ``[tracking]`` switches on; a missing library is a SpecError naming the key, before any trial."""
    tracking, metric = spec.tracking, spec.study.metric
    trackers: list[_Tracker] = []
    for key, value, make in (("mlflow", tracking.mlflow, MlflowTracker), ("tensorboard", tracking.tensorboard, TensorBoardTracker)):
        if value is None:
            continue
        try:
            trackers.append(make(value, metric))
        except ImportError as exc:
            raise SpecError(
                f"{spec.path}: [tracking] {key} needs {exc.name or 'its library'}, which is not installed: {INSTALL_HINT}"
            ) from None
    return trackers
