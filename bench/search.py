"""Which sampler and pruner earn the best model per hour: configurations side by side, equal wall-clock, several seeds.

Each configuration ``SAMPLER:PRUNER[:WARMUP]`` (e.g. ``tpe:median:2``, ``random:none``,
``tpe:hyperband:1``) runs the study file for the same wall-clock budget, once per seed, one run after
another in this process (configurations interleaved within each seed, so a slow spell of the machine
does not land on one configuration only).  WARMUP is in epochs: the median pruner's
``n_warmup_steps``, the successive-halving and Hyperband pruners' ``min_resource``.

Per run the trial chosen is the best complete trial *by the study's validation objective* among
those finished within the budget; only then is it retrained on training + validation data and
evaluated once on the test set (``hpo.results.retrain.retrain_trial``).  The test set plays no part in
any choice.  Per configuration it prints mean ± sd over seeds of: best validation accuracy, the
chosen configuration's test accuracy, epochs trained and the share of epochs pruning saved (against
every finished trial running all ``max_epochs``), trials finished, and seconds until the best
validation accuracy so far reached ``--target``.  It writes ``runs.csv`` (one row per run),
``summary.csv`` (one row per configuration), ``best-so-far.html`` (plotly: best validation accuracy
so far against wall-clock, mean line and min-max band over seeds per configuration) and keeps the
studies in ``bench.db`` for optuna-dashboard.  Each finished run stores its figures in its study
(user attr ``bench_run``): the same command run again reuses them and runs only what is missing.

    python bench/search.py --data ../shared/data/cifar10-jpg.tar.gz --budget 240 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from hpo.launching.run_args import RunRequest, SearchSettings  # noqa: E402
from hpo.launching.session import run_search  # noqa: E402
from hpo.results.retrain import best_first, retrain_trial  # noqa: E402
from hpo.studyfile.samplers import (  # noqa: E402
    PRUNERS,
    SAMPLERS,
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    SuccessiveHalvingPrunerSpec,
)
from hpo.studyfile.space import from_params  # noqa: E402
from hpo.studyfile.spec import Overrides, StudySpec, find_study, load_spec  # noqa: E402
from hpo.training.datasets import load_dataset  # noqa: E402
from hpo.training.device import resolve_device  # noqa: E402
from hpo.training.splits import Dataset  # noqa: E402

DEFAULT_CONFIGS = ("tpe:none", "tpe:median:2", "tpe:median:1", "tpe:successive_halving:1", "tpe:hyperband:1", "random:median:1", "gp:median:1")
# The study user attr holding a finished run's figures: a run interrupted before it is stored is run again.
RESULT_ATTR = "bench_run"
# Seconds between points of the best-so-far curves in the figure.
GRID_STEP_S = 5.0


@dataclass(frozen=True)
class Config:
    sampler: str
    pruner: str
    warmup: int | None  # epochs; None: the study file's setting

    @property
    def label(self) -> str:
        return ":".join([self.sampler, self.pruner] + ([str(self.warmup)] if self.warmup is not None else []))


def parse_config(text: str) -> Config:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SAMPLERS or parts[1] not in PRUNERS:
        raise argparse.ArgumentTypeError(
            f"expected SAMPLER:PRUNER[:WARMUP] with a sampler of {sorted(SAMPLERS)} and a pruner of {sorted(PRUNERS)}, got {text!r}"
        )
    warmup = None
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise argparse.ArgumentTypeError(f"WARMUP must be a whole number of epochs, got {text!r}")
        warmup = int(parts[2])
    return Config(sampler=parts[0], pruner=parts[1], warmup=warmup)


def configured(base: StudySpec, config: Config, *, seed: int) -> StudySpec:
    """The study file with this configuration's sampler and pruner, named and seeded for one run."""
    # The study file's own settings where it uses the same type, the type's defaults otherwise.
    sampler = base.sampler if isinstance(base.sampler, SAMPLERS[config.sampler]) else SAMPLERS[config.sampler]()
    pruner = base.pruner if isinstance(base.pruner, PRUNERS[config.pruner]) else PRUNERS[config.pruner]()
    if isinstance(pruner, MedianPrunerSpec) and config.warmup is not None:
        pruner = dataclasses.replace(pruner, n_warmup_steps=config.warmup)
    if isinstance(pruner, SuccessiveHalvingPrunerSpec):
        pruner = dataclasses.replace(pruner, min_resource=config.warmup or 1)
    if isinstance(pruner, HyperbandPrunerSpec):
        pruner = dataclasses.replace(pruner, min_resource=config.warmup or 1, max_resource=base.train.max_epochs)
    study = dataclasses.replace(base.study, name=f"{config.label}/seed{seed}", seed=seed)
    return dataclasses.replace(base, study=study, sampler=sampler, pruner=pruner)


@dataclass(frozen=True)
class Run:
    config: str
    seed: int
    trials_finished: int  # complete or pruned within the budget
    trials_complete: int
    epochs_trained: int  # by the trials finished within the budget
    epochs_saved: float  # share of (trials_finished x max_epochs) that pruning did not train
    best_val_accuracy: float  # fraction, best complete trial's (at its best epoch)
    chosen_trial: int  # best complete trial by the study's objective: chosen on validation only
    chosen_value: float  # its objective value (the study's metric)
    test_accuracy: float  # the chosen trial retrained on training + validation data, tested once
    seconds_to_target: float | None  # None: the target was not reached within the budget
    curve: tuple[tuple[float, float], ...]  # (seconds since the first trial started, best val accuracy so far)

    def to_json(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "curve": [list(point) for point in self.curve]}

    @classmethod
    def from_json(cls, blob: dict[str, object]) -> Run:
        return cls(**{**blob, "curve": tuple(tuple(point) for point in blob["curve"])})  # type: ignore[arg-type, union-attr]


def finished_within(study: optuna.Study, budget_s: float) -> tuple[float, list[optuna.trial.FrozenTrial]]:
    """When the run started, and its complete or pruned trials that ended within ``budget_s`` of that."""
    trials = study.get_trials(deepcopy=False)
    started = min(t.datetime_start for t in trials if t.datetime_start is not None).timestamp()
    ended = [
        t for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        and t.datetime_complete is not None and t.datetime_complete.timestamp() - started <= budget_s
    ]
    return started, sorted(ended, key=lambda t: t.datetime_complete)  # type: ignore[arg-type, return-value]


def choose(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The best complete trial by the study's objective, which is computed on validation data only."""
    ranked = best_first(study, trials)
    if not ranked:
        raise SystemExit(f"study {study.study_name!r}: no trial completed within the budget; raise --budget")
    return ranked[0]


def measure(
    base: StudySpec, config: Config, seed: int, *, dataset: Dataset, storage: str, budget_s: float, target: float,
    checkpoint_dir: Path,
) -> Run:
    """One run: search for ``budget_s`` seconds, choose on validation, retrain and test the choice once."""
    spec = configured(base, config, seed=seed)
    settings = SearchSettings(
        n_trials=100_000, storage=storage, timeout=budget_s, checkpoint_dir=str(checkpoint_dir), heartbeat_interval=30,
    )
    request = RunRequest(study=str(spec.path), overrides=Overrides(), settings=settings)
    study = run_search(request, spec=spec).study  # the configured spec, not the file's
    started, trials = finished_within(study, budget_s)
    chosen = choose(study, trials)  # the search is over: from here on nothing is chosen
    device = resolve_device(spec.train.device, "--device")
    saved = retrain_trial(spec, chosen, from_params(chosen.params, spec.space, spec.model.space), dataset, device)
    run = outcome(config, seed, started=started, trials=trials, chosen=chosen, max_epochs=spec.train.max_epochs,
                  target=target, test_accuracy=saved.test_accuracy)
    study.set_user_attr(RESULT_ATTR, {"settings": settings_key(spec, budget_s, target), **run.to_json()})
    return run


def settings_key(spec: StudySpec, budget_s: float, target: float) -> str:
    """What a stored run's figures depend on besides its configuration and seed."""
    data = spec.data
    return (
        f"{spec.path.name} budget {budget_s:g} s, {spec.train.max_epochs} epochs, {data.train_subset}/{data.val_subset} "
        f"images, target {target:g}, {spec.train.device}"
    )


def outcome(
    config: Config, seed: int, *, started: float, trials: list[optuna.trial.FrozenTrial], chosen: optuna.trial.FrozenTrial,
    max_epochs: int, target: float, test_accuracy: float,
) -> Run:
    """A finished run's figures: its trials finished within the budget, the chosen one and its test accuracy."""
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    epochs = sum(len(t.intermediate_values) for t in trials)
    curve: list[tuple[float, float]] = []
    best = -math.inf
    for t in complete:
        accuracy = float(t.user_attrs.get("val_accuracy", math.nan))
        if accuracy > best:
            best = accuracy
            curve.append((t.datetime_complete.timestamp() - started, best))  # type: ignore[union-attr]
    reached = next((s for s, accuracy in curve if accuracy >= target), None)
    return Run(
        config=config.label, seed=seed, trials_finished=len(trials), trials_complete=len(complete),
        epochs_trained=epochs, epochs_saved=1 - epochs / (len(trials) * max_epochs),
        best_val_accuracy=best, chosen_trial=chosen.number, chosen_value=float(chosen.value),  # type: ignore[arg-type]
        test_accuracy=test_accuracy, seconds_to_target=reached, curve=tuple(curve),
    )


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Summary:
    config: str
    seeds: int
    best_val_accuracy: tuple[float, float]  # (mean, sd) over seeds; fractions
    test_accuracy: tuple[float, float]
    epochs_trained: tuple[float, float]
    epochs_saved: tuple[float, float]
    trials_finished: tuple[float, float]
    seconds_to_target: tuple[float, float] | None  # over the seeds that reached it
    reached_target: int  # seeds that reached it


def summarize(config: str, runs: list[Run]) -> Summary:
    reached = [r.seconds_to_target for r in runs if r.seconds_to_target is not None]
    return Summary(
        config=config, seeds=len(runs),
        best_val_accuracy=mean_sd([r.best_val_accuracy for r in runs]),
        test_accuracy=mean_sd([r.test_accuracy for r in runs]),
        epochs_trained=mean_sd([float(r.epochs_trained) for r in runs]),
        epochs_saved=mean_sd([r.epochs_saved for r in runs]),
        trials_finished=mean_sd([float(r.trials_finished) for r in runs]),
        seconds_to_target=mean_sd(reached) if reached else None,
        reached_target=len(reached),
    )


def print_table(summaries: list[Summary], *, target: float) -> None:
    head = f"{'configuration':<26} {'best val acc':>14} {'test acc':>14} {'epochs':>11} {'saved':>11} {'trials':>9}  time to {target:.0%} val acc"
    print(head)
    for s in summaries:
        def pct(pair: tuple[float, float]) -> str:
            return f"{pair[0]:.1%} ± {pair[1] * 100:.1f}"

        to_target = "not reached"
        if s.seconds_to_target is not None:
            to_target = f"{s.seconds_to_target[0]:.0f} ± {s.seconds_to_target[1]:.0f} s ({s.reached_target}/{s.seeds} seeds)"
        print(
            f"{s.config:<26} {pct(s.best_val_accuracy):>14} {pct(s.test_accuracy):>14} "
            f"{s.epochs_trained[0]:>5.0f} ± {s.epochs_trained[1]:<3.0f} {pct(s.epochs_saved):>11} "
            f"{s.trials_finished[0]:>4.0f} ± {s.trials_finished[1]:<2.0f}  {to_target}"
        )


def write_csvs(out: Path, runs: list[Run], summaries: list[Summary]) -> None:
    with (out / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        fields = [f.name for f in dataclasses.fields(Run) if f.name != "curve"]
        writer.writerow(fields)
        for run in runs:
            writer.writerow(["" if getattr(run, name) is None else getattr(run, name) for name in fields])
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([
            "config", "seeds", "best_val_accuracy_mean", "best_val_accuracy_sd", "test_accuracy_mean", "test_accuracy_sd",
            "epochs_trained_mean", "epochs_trained_sd", "epochs_saved_mean", "epochs_saved_sd",
            "trials_finished_mean", "trials_finished_sd", "seconds_to_target_mean", "seconds_to_target_sd", "reached_target",
        ])
        for s in summaries:
            to_target = list(s.seconds_to_target) if s.seconds_to_target is not None else ["", ""]
            writer.writerow([
                s.config, s.seeds, *s.best_val_accuracy, *s.test_accuracy, *s.epochs_trained, *s.epochs_saved,
                *s.trials_finished, *to_target, s.reached_target,
            ])


def best_so_far(curve: tuple[tuple[float, float], ...], at: float) -> float | None:
    """The best validation accuracy reached by ``at`` seconds; None before the first complete trial."""
    reached = [accuracy for seconds, accuracy in curve if seconds <= at]
    return reached[-1] if reached else None


def write_figure(path: Path, runs: list[Run], configs: list[str], *, budget_s: float) -> None:
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS

    grid = [GRID_STEP_S * i for i in range(int(budget_s // GRID_STEP_S) + 1)]
    figure = go.Figure()
    for index, config in enumerate(configs):
        color = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        curves = [r.curve for r in runs if r.config == config]
        xs, means, lows, highs = [], [], [], []
        for at in grid:
            points = [best_so_far(curve, at) for curve in curves]
            if any(p is None for p in points):
                continue  # the line starts once every seed has a complete trial
            values = [p for p in points if p is not None]
            xs.append(at)
            means.append(statistics.fmean(values))
            lows.append(min(values))
            highs.append(max(values))
        band = color.replace("rgb", "rgba").replace(")", ", 0.15)")
        figure.add_trace(go.Scatter(x=xs + xs[::-1], y=highs + lows[::-1], fill="toself", fillcolor=band,
                                    line={"width": 0}, hoverinfo="skip", showlegend=False))
        figure.add_trace(go.Scatter(x=xs, y=means, mode="lines", name=config, line={"color": color}))
    figure.update_layout(
        title=f"Best validation accuracy so far (mean over seeds, band: min to max), {budget_s:.0f} s per run",
        xaxis_title="seconds since the run's first trial started", yaxis_title="validation accuracy", yaxis_tickformat=".0%",
    )
    figure.write_html(path, include_plotlyjs=True)


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`base_spec` reads (shared with bench/pareto.py)."""
    parser.add_argument("--study", default="quick", help="study file: a name in studies/ or a path (default: quick)")
    parser.add_argument("--data", required=True, help="dataset folder or .tar.gz archive ([data] data_dir)")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (default: the study file's)")
    parser.add_argument("--train-subset", type=int, help="training images (default: the study file's)")
    parser.add_argument("--val-subset", type=int, help="validation images (default: the study file's)")
    parser.add_argument("--device", default="cpu", help="device for every run (default: cpu)")


def base_spec(args: argparse.Namespace) -> StudySpec:
    """The study file with --data, --device, --max-epochs, --train-subset and --val-subset in place; Optuna's and
    hpo's logs quiet but for warnings (shared with bench/pareto.py)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    base = Overrides(data_dir=args.data, device=args.device, max_epochs=args.max_epochs).apply(load_spec(find_study(args.study)))
    data = dataclasses.replace(
        base.data,
        train_subset=args.train_subset if args.train_subset is not None else base.data.train_subset,
        val_subset=args.val_subset if args.val_subset is not None else base.data.val_subset,
    )
    return dataclasses.replace(base, data=data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_flags(parser)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        help=f"SAMPLER:PRUNER[:WARMUP] each (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="study seeds, one run each (default: 0 1 2)")
    parser.add_argument("--budget", type=float, default=240.0, help="wall-clock seconds per run (default: 240)")
    parser.add_argument("--target", type=float, default=0.5, help="validation accuracy for the time-to-target column (default: 0.5)")
    parser.add_argument("--out", default="bench-search", help="folder for the CSVs, the figure and bench.db (default: bench-search/)")
    args = parser.parse_args(argv)
    base = base_spec(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'bench.db').resolve()}"
    labels = [c.label for c in args.configs]
    taken = set(optuna.get_all_study_names(storage)) if (out / "bench.db").exists() else set()
    dataset = load_dataset(base.data)  # decoded once; each run's search reads the same cache
    print(
        f"{base.path.name}: {len(labels)} configurations x {len(args.seeds)} seeds, {args.budget:.0f} s each, "
        f"{base.train.max_epochs} epochs per trial, {base.data.train_subset or 'all'} training / "
        f"{base.data.val_subset or 'all'} validation images, on {args.device}", flush=True,
    )
    runs: list[Run] = []
    begun = time.monotonic()
    for seed in args.seeds:
        for config in args.configs:
            name = configured(base, config, seed=seed).study.name
            stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(RESULT_ATTR) if name in taken else None
            if stored is not None:
                wanted = settings_key(base, args.budget, args.target)
                if stored.pop("settings") != wanted:
                    raise SystemExit(f"--out: {out / 'bench.db'} holds run {name!r} of other settings than {wanted}; give another --out")
                run, how = Run.from_json(stored), "stored by an earlier run of this command"
            else:
                if name in taken:  # cut short before its figures were stored: run it again from the start
                    optuna.delete_study(study_name=name, storage=storage)
                run = measure(
                    base, config, seed, dataset=dataset, storage=storage, budget_s=args.budget, target=args.target,
                    checkpoint_dir=out / "checkpoints",
                )
                how = f"{(time.monotonic() - begun) / 60:.1f} min so far"
            runs.append(run)
            print(
                f"  {run.config} seed {seed}: {run.trials_finished} trials, best val acc {run.best_val_accuracy:.1%}, "
                f"chose trial {run.chosen_trial}: test acc {run.test_accuracy:.1%} ({how})", flush=True,
            )
    summaries = [summarize(label, [r for r in runs if r.config == label]) for label in labels]
    print()
    print_table(summaries, target=args.target)
    write_csvs(out, runs, summaries)
    write_figure(out / "best-so-far.html", runs, labels, budget_s=args.budget)
    print(f"\nWrote {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'best-so-far.html'}; studies in {storage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
