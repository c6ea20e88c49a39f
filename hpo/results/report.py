"""A study's report: one self-contained HTML page, plus ``trials.csv`` and ``summary.json``.

:func:`write_report` is the Python entry point; ``python -m hpo.report`` is a shell over it.
The figures are ``optuna.visualization``'s plotly figures; plotly.js is embedded once in the page,
so the file opens offline.  A figure that cannot be drawn yet (no completed trial, one searched
value only, ...) is replaced by a sentence saying why, so a study that is still running, or has no
finished trial at all, gets a report too.
"""

from __future__ import annotations

import csv
import html
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.results.summary import Summary, Value, best_text, format_value, front_member_text, states_text, summarize

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go

# The pair the contour figure shows: the two hyperparameters that interact most in practice.
CONTOUR_PARAMS = ("lr", "batch_size")


@dataclass(frozen=True)
class Section:
    """One figure of the report, or the reason it is not drawn."""

    title: str
    caption: str
    figure: go.Figure | None
    missing: str | None = None


def _searched_values(trials: Sequence[optuna.trial.FrozenTrial], name: str) -> set[Value]:
    return {t.params[name] for t in trials if name in t.params}


def _pareto_section(study: optuna.Study) -> Section:
    """A multi-objective study's front: plotly's figure of every complete trial, the front highlighted."""
    import optuna.visualization as vis
    from optuna.trial import TrialState

    from hpo.tuning.pareto import CONSTRAINTS_ON_TRIALS, AttrConstraints, objective_names

    names = objective_names(study)
    title, caption = "Pareto front", (
        f"Every complete trial by {', '.join(names)}; the Pareto-optimal ones (no other feasible trial is as good in "
        "every objective and better in one) are highlighted, infeasible ones (over a constraint) greyed."
    )
    if len(names) > 3:
        return Section(title, caption, None, f"The figure draws 2 or 3 objectives; this study has {len(names)}: see the trials table.")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return Section(title, caption, None, "No completed trial yet: nothing to draw.")
    constraints = None if CONSTRAINTS_ON_TRIALS else AttrConstraints(0)  # Optuna 4: the constraints user attr
    return Section(title, caption, vis.plot_pareto_front(study, target_names=names, constraints_func=constraints))


def _curves_figure(study: optuna.Study, metric: str) -> go.Figure:
    """The learning curves a multi-objective study's trials recorded (Optuna's figure reads intermediate values only)."""
    import plotly.graph_objects as go

    from hpo.tuning.pareto import curve

    figure = go.Figure()
    for trial in study.get_trials(deepcopy=False):
        points = curve(trial)
        if points:
            figure.add_trace(go.Scatter(
                x=list(points), y=list(points.values()), mode="lines+markers", name=f"Trial{trial.number}",
            ))
    return figure.update_layout(title="Intermediate Values Plot", xaxis_title="epoch", yaxis_title=metric)


def sections(study: optuna.Study, *, metric: str) -> list[Section]:
    """Every figure of the report, in reading order; each one drawn or explained.  A multi-objective study's
    figures show its first objective (``metric``), after its Pareto front."""
    from hpo.tuning.pareto import curve

    if len(study.directions) > 1:
        first = _single_objective_sections(study, metric=metric, target=lambda t: t.values[0])
        learning = Section(
            "Learning curves", f"{metric} after every epoch, as each trial recorded it (user attr curve); pruned trials stop early.",
            *((_curves_figure(study, metric), None) if any(curve(t) for t in study.get_trials(deepcopy=False))
              else (None, "No trial has reported an epoch yet.")),
        )
        return [_pareto_section(study), first[0], learning, *first[2:]]
    return _single_objective_sections(study, metric=metric, target=None)


def _importances(
    study: optuna.Study, *, enough: bool, metric: str, target: Callable[[optuna.trial.FrozenTrial], float] | None
) -> tuple[go.Figure | None, str | None]:
    """The importances figure, or why not; ``enough``: 2 or more complete trials whose hyperparameters differ."""
    import optuna
    import optuna.visualization as vis

    if not enough:
        return None, "Needs at least 2 completed trials whose hyperparameters differ."
    minimized = None
    if target is not None:  # the first objective's value as minimized (a maximized one negated)
        sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
        minimized = lambda t: sign * target(t)  # noqa: E731 (a target as Optuna's figures take it)
    try:
        with warnings.catch_warnings():
            # Given a target, Optuna's evaluator warns that it rates what makes the target low: as wanted here.
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            return vis.plot_param_importances(study, target_name=metric, target=minimized), None
    except (RuntimeError, ValueError) as exc:  # e.g. a constant objective gives no variance to split
        return None, f"Optuna could not compute importances: {exc}"


def _single_objective_sections(
    study: optuna.Study, *, metric: str, target: Callable[[optuna.trial.FrozenTrial], float] | None
) -> list[Section]:
    """The figures of one objective: the study's, or ``target`` of a multi-objective study's trials."""
    import optuna.visualization as vis
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    no_complete = "No completed trial yet: nothing to draw."
    varying = [name for name in sorted({n for t in complete for n in t.params}) if len(_searched_values(complete, name)) > 1]

    def when(problem: str | None, draw: Callable[[], go.Figure]) -> tuple[go.Figure | None, str | None]:
        return (None, problem) if problem else (draw(), None)

    contour_problem = None
    absent = [name for name in CONTOUR_PARAMS if len(_searched_values(complete, name)) < 2]
    if absent:
        contour_problem = f"Needs completed trials with at least 2 different values of {' and '.join(absent)}."
    specs: list[tuple[str, str, tuple[go.Figure | None, str | None]]] = [
        ("Optimization history", "The objective of every completed trial, and the best so far.",
         when(None if complete else no_complete, lambda: vis.plot_optimization_history(study, target_name=metric, target=target))),
        ("Learning curves", "The value reported after every epoch (intermediate values); pruned trials stop early.",
         when(None if any(t.intermediate_values for t in trials) else "No trial has reported an epoch yet.",
              lambda: vis.plot_intermediate_values(study).update_layout(xaxis_title="epoch", yaxis_title=metric))),
        ("Parallel coordinates", "Each completed trial is one line through its hyperparameters to its objective.",
         when(None if complete else no_complete, lambda: vis.plot_parallel_coordinate(study, target_name=metric, target=target))),
        ("Hyperparameter importances", "Share of the objective's variance each hyperparameter explains (fANOVA).",
         _importances(study, enough=len(complete) >= 2 and bool(varying), metric=metric, target=target)),
        ("Learning rate against batch size", "Contour of the objective over lr and batch_size.",
         when(contour_problem, lambda: vis.plot_contour(study, params=list(CONTOUR_PARAMS), target_name=metric, target=target))),
        ("Slices", "The objective against each hyperparameter separately.",
         when(None if complete else no_complete, lambda: vis.plot_slice(study, target_name=metric, target=target))),
        ("Timeline", "When each trial ran, by state; overlapping bars are trials of concurrent workers.",
         when(None if trials else "No trial yet.", lambda: vis.plot_timeline(study))),
    ]
    return [Section(title=title, caption=caption, figure=figure, missing=missing) for title, caption, (figure, missing) in specs]


def _objective_cells(study: optuna.Study, trial: optuna.trial.FrozenTrial, front: set[int]) -> dict[str, object]:
    """A multi-objective trial's value of each objective (those it measured before it was pruned, too) and
    whether it is on the Pareto front."""
    from hpo.tuning.pareto import objective_names

    names = objective_names(study)
    values = dict(zip(names, trial.values)) if trial.values else {}
    cells: dict[str, object] = {name: values.get(name, trial.user_attrs.get(name)) for name in names}
    return {**cells, "pareto_front": trial.number in front}


def trial_rows(study: optuna.Study, *, metric: str) -> tuple[list[str], list[dict[str, object]]]:
    """(columns, one row per trial): hyperparameters and user attrs under their own names.  A multi-objective
    study has a column per objective, named like it, instead of ``value``, and ``pareto_front`` marks the front.
    ``epochs``, ``best_epoch`` (by ``metric``) and the worker's host, pid, device and precision are columns of
    their own, read off the curve and the claim (:mod:`hpo.tuning.records`)."""
    from hpo.studyfile.space import PARAMETERS
    from hpo.tuning.pareto import curve, objective_names, pareto_front
    from hpo.tuning.records import WORKER_FACTS, best_curve_epoch, epochs_trained, worker_facts

    trials = study.get_trials(deepcopy=False)
    multi = len(study.directions) > 1
    value_columns = [*objective_names(study), "pareto_front"] if multi else ["value"]
    front = {t.number for t in pareto_front(study)} if multi else set()
    params = {name for t in trials for name in t.params}
    param_columns = [name for name in PARAMETERS if name in params] + sorted(params - set(PARAMETERS))
    derived = ["epochs", "best_epoch", *WORKER_FACTS]
    attr_columns = sorted(({key for t in trials for key in t.user_attrs} | set(derived)) - set(value_columns))
    columns = ["number", "state", *value_columns, "epochs_reported", "datetime_start", "datetime_complete", "duration_s"]
    columns += param_columns + attr_columns
    rows = []
    for t in trials:
        row: dict[str, object] = {
            "number": t.number,
            "state": t.state.name,
            **(_objective_cells(study, t, front) if multi else {"value": t.value}),
            "epochs_reported": len(curve(t)),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        row.update({name: t.params.get(name) for name in param_columns})
        row.update({key: t.user_attrs.get(key) for key in attr_columns})
        row.update(epochs=epochs_trained(t) or None, best_epoch=best_curve_epoch(t, metric), **worker_facts(t))
        rows.append(row)
    return columns, rows


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)  # None is written as an empty field


def _table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows)
    return f"<table>{cells}</table>"


def summary_html(summary: Summary) -> str:
    rows = [
        ("study", f"{summary.study} in {summary.storage}"),
        ("model", summary.model or "not recorded"),
    ]
    if summary.front is not None:
        objectives = ", ".join(f"{name} ({direction})" for name, direction in zip(summary.objectives, summary.directions))
        rows += [("objectives", objectives), ("trials", f"{summary.trials}: {states_text(summary)}")]
        rows += [("Pareto front", f"{len(summary.front)} trials (complete, feasible, dominated by none)")]
        rows += [(f"  #{t.number}", front_member_text(t).split(": ", 1)[1]) for t in summary.front]
    else:
        rows += [
            ("objective", f"{summary.metric} ({summary.direction})"),
            ("trials", f"{summary.trials}: {states_text(summary)}"),
            ("best trial", best_text(summary)),
        ]
    if summary.best is not None:
        rows += [(f"  {name}", format_value(value)) for name, value in summary.best.params.items()]
    rows += [
        ("epochs trained", f"{summary.epochs_trained} by the finished trials"),
        (
            "without pruning",
            f"{summary.epochs_without_pruning} (finished trials x {summary.max_epochs} epochs): "
            f"pruning saved {summary.epochs_saved_fraction:.0%}",
        ),
        ("training time", f"{summary.training_seconds:.1f} s, summed over the finished trials"),
    ]
    return _table(rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { text-align: left; padding: 0.2em 1em 0.2em 0; vertical-align: top; white-space: pre; }
th { font-weight: 600; }
p.caption { color: #555; margin-top: 0; }
p.missing { padding: 1em; background: #f4f4f4; border-left: 4px solid #bbb; }
"""


def render_html(summary: Summary, figures: Sequence[Section]) -> str:
    """One HTML page: plotly.js once in the head, the summary table, then every section."""
    from plotly.offline import get_plotlyjs

    parts = []
    for index, section in enumerate(figures):
        parts.append(f'<section><h2>{html.escape(section.title)}</h2><p class="caption">{html.escape(section.caption)}</p>')
        if section.figure is not None:
            parts.append(section.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}"))
        else:
            parts.append(f'<p class="missing">{html.escape(section.missing or "")}</p>')
        parts.append("</section>")
    title = html.escape(f"Study {summary.study}: hpo report")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>\n'
        f"<body><h1>{title}</h1><p>Generated {html.escape(summary.generated_at)}.</p>\n"
        f"{summary_html(summary)}\n" + "\n".join(parts) + "\n</body></html>\n"
    )


@dataclass(frozen=True)
class ReportFiles:
    page: Path  # report.html
    trials: Path  # trials.csv
    summary: Path  # summary.json
    study_summary: Summary  # what the page's table and summary.json say


def write_report(
    study: optuna.Study,
    *,
    out: str | Path,
    study_file: str | Path | None = None,
    max_epochs: int | None = None,
    storage_shown: str = "",
) -> ReportFiles:
    """Write ``report.html``, ``trials.csv`` and ``summary.json`` of ``study`` into the folder ``out``.

    ``max_epochs`` (for the epochs pruning saved) defaults to the one the study was started with
    (hpo.studyfile.stored), else (a study from before hpo stored it) the study file's: ``study_file``,
    else the file named like the study.  ``storage_shown`` is what the report says the study is stored
    in (give a URL without its password).
    """
    from hpo.folders import writable_folder
    from hpo.studyfile.spec import spec_for_study
    from hpo.studyfile.stored import STARTED_WITH_ATTR

    metric = study.metric_names[0] if study.metric_names else None
    stored = study.user_attrs.get(STARTED_WITH_ATTR)
    if max_epochs is None and isinstance(stored, dict) and isinstance(stored.get("max_epochs"), int):
        max_epochs = stored["max_epochs"]
    if max_epochs is None or metric is None:
        spec = spec_for_study(study.study_name, study_file)
        max_epochs = spec.train.max_epochs if max_epochs is None else max_epochs
        metric = spec.study.metric if metric is None else metric
    folder = Path(out)
    writable_folder(folder, "out")
    summary = summarize(study, storage_shown=storage_shown, metric=metric, max_epochs=max_epochs)
    files = ReportFiles(
        page=folder / "report.html", trials=folder / "trials.csv", summary=folder / "summary.json", study_summary=summary
    )
    files.page.write_text(render_html(summary, sections(study, metric=metric)), encoding="utf-8")
    write_csv(files.trials, *trial_rows(study, metric=metric))
    files.summary.write_text(summary.to_json(), encoding="utf-8")
    return files
