"""Does pruning still pay in a multi-objective study?  The same study with its pruner and without, at equal wall-clock.

The study file (default: quick) is run with ``[study] objectives = ["val_loss", "params"]`` (or
``--objectives``), once with its own pruner ("pruned": the curves study of hpo.tuning.study decides, on the
validation loss per epoch) and once with none ("unpruned"), for ``--budget`` seconds each, once per seed,
one run after the other in this process (the two interleaved within each seed, so that a slow spell of the
machine does not land on one of them only).

Per run, over the trials that finished within the budget: the hypervolume of their Pareto front (both
objectives minimized) against the reference point ``--reference`` (default: val_loss 2.5, above chance's
ln 10 = 2.303, and 150,000 parameters, above quick's largest model, 147,106), divided by the reference
box's area (the objectives are >= 0) so that 1.0 would be a model with no loss and no parameters; the
front's size; epochs trained and the share pruning saved against every finished trial running all its
epochs; trials finished.  It prints mean ± sd over seeds per configuration, and writes ``runs.csv``; the
studies stay in ``bench.db`` (optuna-dashboard).  Optuna has no public hypervolume function (its
``optuna._hypervolume`` is private), so the two-objective one is computed here.

    python bench/pareto.py --data ../shared/data/cifar10-jpg.tar.gz --budget 90 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import optuna  # noqa: E402
from search import add_spec_flags, base_spec  # noqa: E402

from hpo.launching.run_args import RunRequest, SearchSettings  # noqa: E402
from hpo.launching.session import run_search  # noqa: E402
from hpo.studyfile.samplers import NopPrunerSpec  # noqa: E402
from hpo.studyfile.spec import OBJECTIVES, Overrides, StudySpec  # noqa: E402
from hpo.tuning.budget import FINISHED_STATES  # noqa: E402
from hpo.tuning.pareto import curve, curves_study_name, front_of  # noqa: E402

CONFIGS = ("pruned", "unpruned")
DEFAULT_REFERENCE = (2.5, 150_000.0)


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates minimized) and bounded by ``reference``."""
    area, floor = 0.0, reference[1]
    for x, y in sorted(p for p in points if p[0] < reference[0] and p[1] < reference[1]):
        if y < floor:  # sorted by x: each point that lowers the floor adds the strip from its x to the reference
            area += (reference[0] - x) * (floor - y)
            floor = y
    return area


def configured(base: StudySpec, config: str, objectives: tuple[str, ...], seed: int) -> StudySpec:
    """The study file with these objectives, its own pruner or none, named and seeded for one run."""
    study = dataclasses.replace(base.study, name=f"{config}/seed{seed}", seed=seed, objectives=objectives, metric=None)
    pruner = base.pruner if config == "pruned" else NopPrunerSpec()
    return dataclasses.replace(base, study=study, pruner=pruner)


@dataclass(frozen=True)
class Run:
    config: str
    seed: int
    hypervolume: float  # normalized: share of the reference box the front dominates
    front_size: int
    front: str  # "val_loss/params" of each front member, for the record
    epochs_trained: int
    epochs_saved: float  # share of (trials finished x max_epochs) not trained
    trials_finished: int
    trials_complete: int


def measure(base: StudySpec, config: str, seed: int, *, args: argparse.Namespace) -> Run:
    """One run: search for ``--budget`` seconds, then score the front of the trials finished within it."""
    spec = configured(base, config, tuple(args.objectives), seed)
    url = f"sqlite:///{Path(args.out) / 'bench.db'}"
    for name in (spec.study.name, curves_study_name(spec.study.name)):  # a run of an earlier call is run again
        if name in optuna.get_all_study_names(url):
            optuna.delete_study(study_name=name, storage=url)
    settings = SearchSettings(
        n_trials=100_000, storage=url, timeout=args.budget,
        checkpoint_dir=str(Path(args.out) / "checkpoints"), heartbeat_interval=30,
    )
    study = run_search(RunRequest(study=str(spec.path), overrides=Overrides(), settings=settings), spec=spec).study
    trials = study.get_trials(deepcopy=False)
    started = min(t.datetime_start for t in trials if t.datetime_start is not None)
    finished = [
        t for t in trials if t.state in FINISHED_STATES and t.datetime_complete is not None
        and (t.datetime_complete - started).total_seconds() <= args.budget
    ]
    front = front_of(finished, [OBJECTIVES[name] for name in args.objectives])
    reference = tuple(args.reference)
    points = [(float(t.values[0]), float(t.values[1])) for t in front]
    epochs = sum(len(curve(t)) for t in finished)
    return Run(
        config=config, seed=seed, hypervolume=hypervolume_2d(points, reference) / (reference[0] * reference[1]),
        front_size=len(front), front=" ".join(f"{x:.3f}/{y:.0f}" for x, y in points), epochs_trained=epochs,
        epochs_saved=1 - epochs / (len(finished) * spec.train.max_epochs) if finished else 0.0,
        trials_finished=len(finished), trials_complete=sum(t.state.name == "COMPLETE" for t in finished),
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def print_table(runs: list[Run]) -> None:
    print(f"{'configuration':<12} {'hypervolume':>17} {'front':>9} {'epochs':>11} {'saved':>13} {'trials':>9}")
    for config in CONFIGS:
        mine = [r for r in runs if r.config == config]
        hv, front, epochs, saved, trials = (
            _mean_sd([float(getattr(r, key)) for r in mine])
            for key in ("hypervolume", "front_size", "epochs_trained", "epochs_saved", "trials_finished")
        )
        print(
            f"{config:<12} {hv[0]:>8.4f} ± {hv[1]:<6.4f} {front[0]:>4.1f} ± {front[1]:<2.0f} {epochs[0]:>5.0f} ± {epochs[1]:<3.0f} "
            f"{saved[0]:>6.0%} ± {saved[1]:<5.0%} {trials[0]:>4.0f} ± {trials[1]:<2.0f}"
        )
    pruned = statistics.fmean(r.hypervolume for r in runs if r.config == "pruned")
    unpruned = statistics.fmean(r.hypervolume for r in runs if r.config == "unpruned")
    if unpruned > 0:
        print(f"Hypervolume with pruning: {pruned / unpruned - 1:+.1%} against without (mean over seeds)")


def write_csv(path: Path, runs: list[Run]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        fields = [f.name for f in dataclasses.fields(Run)]
        writer.writerow(fields)
        writer.writerows([getattr(run, name) for name in fields] for run in runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_flags(parser)  # bench/search.py's --study, --data, --max-epochs, --train-subset, --val-subset, --device
    parser.add_argument("--objectives", nargs=2, default=["val_loss", "params"], metavar="NAME",
                        help="two minimized objectives, the first val_loss (default: val_loss params)")
    parser.add_argument("--reference", nargs=2, type=float, default=list(DEFAULT_REFERENCE), metavar="VALUE",
                        help=f"hypervolume reference point (default: {DEFAULT_REFERENCE[0]:g} {DEFAULT_REFERENCE[1]:.0f})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="study seeds, one run each (default: 0 1 2)")
    parser.add_argument("--budget", type=float, default=90.0, help="wall-clock seconds per run (default: 90)")
    parser.add_argument("--out", default="bench-pareto", help="folder for runs.csv and bench.db (default: bench-pareto/)")
    args = parser.parse_args(argv)
    if args.objectives[0] != "val_loss" or any(OBJECTIVES.get(name) != "minimize" for name in args.objectives):
        parser.error(f"--objectives: two minimized objectives, the first val_loss, got {args.objectives}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_spec(args)  # bench/search.py's: the same flags mean the same there
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for config in CONFIGS:
            run = measure(base, config, seed, args=args)
            print(f"{config} seed {seed}: hypervolume {run.hypervolume:.4f}, front {run.front}, {run.epochs_trained} epochs, "
                  f"{run.trials_finished} trials", flush=True)
            runs.append(run)
    print(
        f"\n{base.path.name}: objectives {' and '.join(args.objectives)}, {args.budget:g} s per run, seeds "
        f"{' '.join(map(str, args.seeds))}, {base.train.max_epochs} epochs per trial, reference point {tuple(args.reference)}"
    )
    print_table(runs)
    write_csv(Path(args.out) / "runs.csv", runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
