"""What hpo costs outside training, per trial, per epoch and per joining worker: this tree, an older one, plain Optuna.

One worker runs trials of the quick study's space on one storage, training replaced by a sleep
(bench/storage.py's stand-in: hpo's real worker loop and Objective, the sleep instead of ``fit``).  For each
backend and study size (finished trials already in the study) three variants run one after another:

- ``hpo``: this tree;
- ``hpo@REF``: the same bench on the hpo of git revision ``--before`` (default: the last commit before
  issue 20's changes), checked out into a temporary worktree and imported instead of this tree's;
- ``optuna``: plain ``study.optimize`` on the same storage and stand-in, as Optuna's examples write it
  (``trial.suggest_*``, then per epoch ``trial.report`` and ``trial.should_prune``), no hpo at all.

Time outside training is split into a per-epoch part (the time inside the per-epoch callback: report,
should_prune, writes) and a per-trial part (the rest).  Printed per row: storage calls per trial, ms per
trial, ms per epoch, the epochs a trial trained on average (the median pruner stops some), the join
(seconds from opening the storage to the first trial's training) and the per-trial ratio to plain
Optuna's.  The first trial of each run (the join) is left out of the per-trial and per-epoch figures.

    python bench/overhead.py --backends sqlite postgresql --sizes 0 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Default --before: the last commit before issue 20 cut hpo's storage writes.
BEFORE = "fe8a730"


def _import_hpo_from(tree: str | None) -> None:
    """Import hpo from ``tree`` (an older checkout) before bench/storage.py imports this tree's."""
    if tree:
        sys.path.insert(0, tree)
        import hpo  # noqa: F401  (binds the older package in sys.modules)


if __name__ == "__main__" and "--hpo-tree" in sys.argv:
    _import_hpo_from(sys.argv[sys.argv.index("--hpo-tree") + 1])
sys.path.insert(0, str(BENCH))

import optuna  # noqa: E402
import storage as storage_bench  # noqa: E402  (bench/storage.py)


@dataclass(frozen=True)
class Run:
    calls_per_trial: float
    per_trial_ms: float  # each run's first trial left out
    per_epoch_ms: float
    epochs_per_trial: float
    join_s: float


@dataclass(frozen=True)
class Row:
    backend: str
    size: int
    variant: str
    run: Run


def run_hpo(url: str, study_name: str, *, trials: int, epochs: int, epoch_seconds: float) -> Run:
    """One worker of whichever hpo is imported (bench/storage.py), on the kept study ``study_name``."""
    row = storage_bench.run_workers(
        "bench", url, workers=1, trials_per_worker=trials, epochs=epochs, epoch_seconds=epoch_seconds, study_name=study_name,
        count_connections=False,  # plain Optuna's run has no such monitor beside it
    )
    return Run(calls_per_trial=row.calls_per_trial, per_trial_ms=row.per_trial_ms, per_epoch_ms=row.per_epoch_ms,
               epochs_per_trial=row.epochs_per_trial, join_s=row.join_s)


def run_plain_optuna(url: str, study_name: str, *, trials: int, epochs: int, epoch_seconds: float) -> Run:
    """Optuna's own optimize loop on the same stand-in, sampler, pruner and storage; RDBStorage's defaults."""
    opened = time.perf_counter()
    storage = optuna.storages.RDBStorage(url)
    clock = storage_bench.StorageClock(storage)
    spec = storage_bench.bench_spec(epochs=epochs)
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
    )
    from hpo.tuning.objective import suggest

    epoch_clock = storage_bench.EpochClock()

    def objective(trial: optuna.Trial) -> float:
        suggest(trial, spec.space)  # the same trial.suggest_* calls, names and ranges
        epoch_clock.started.append(time.perf_counter())
        rng = random.Random(trial.number)
        loss = math.inf
        for epoch in range(1, epochs + 1):
            time.sleep(epoch_seconds)
            loss = 2.0 / epoch + rng.random() * 0.2
            epoch_clock.epochs += 1
            begun = time.perf_counter()
            trial.report(loss, epoch)
            prune = trial.should_prune()
            epoch_clock.seconds += time.perf_counter() - begun
            if prune:
                raise optuna.TrialPruned()
        return loss

    timings: list[storage_bench.TrialTiming] = []
    last = [time.perf_counter()]

    def ended(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        in_epochs, trained = epoch_clock.take()
        timings.append(storage_bench.TrialTiming(storage_s=0.0, outside_s=now - last[0] - trained * epoch_seconds,
                                                 epoch_end_s=in_epochs, epochs=trained))
        last[0] = now

    study.optimize(objective, n_trials=trials, callbacks=[ended])
    split = storage_bench.split_outside(timings[1:])
    return Run(calls_per_trial=sum(c for c, _ in clock.calls.values()) / trials, per_trial_ms=split["per_trial_ms"],
               per_epoch_ms=split["per_epoch_ms"], epochs_per_trial=split["epochs_per_trial"],
               join_s=epoch_clock.started[0] - opened)


def _variant_in_subprocess(args: argparse.Namespace, variant: str, url: str, study_name: str, tree: str | None) -> Run:
    """A fresh process per variant: no cache of one variant helps the next, and ``tree`` picks the hpo imported."""
    command = [sys.executable, __file__, "--variant", variant, "--url", url, "--study-name", study_name,
               "--trials", str(args.trials), "--epochs", str(args.epochs), "--epoch-seconds", str(args.epoch_seconds)]
    if tree:
        command += ["--hpo-tree", tree]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Run(**json.loads(out.strip().splitlines()[-1]))


def _worktree(revision: str, folder: Path) -> str:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(folder), revision],
                   check=True, capture_output=True)
    return str(folder)


def measure(args: argparse.Namespace, backend: str, url: str, size: int, before_tree: str) -> list[Row]:
    """The three variants on one study of ``size`` finished trials (filled once, kept for all of them)."""
    name = f"overhead-{backend}-{size}"
    spec = storage_bench.bench_spec(epochs=args.epochs)
    setup = storage_bench.open_storage(url, "bench")
    study = storage_bench.open_study(dataclasses.replace(spec, study=dataclasses.replace(spec.study, name=name)), setup)
    have = len(study.get_trials(deepcopy=False))
    storage_bench.fill(study, max(0, size - have), epochs=args.epochs, seed=size)
    rows = []
    for variant, tree in (("hpo", None), (f"hpo@{args.before}", before_tree), ("optuna", None)):
        run = _variant_in_subprocess(args, "optuna" if variant == "optuna" else "hpo", url, name, tree)
        rows.append(Row(backend=backend, size=size, variant=variant, run=run))
        print(_line(rows[-1]), flush=True)
    if not args.keep:
        optuna.delete_study(study_name=name, storage=setup)
    return rows


def _line(row: Row) -> str:
    run = row.run
    return (f"{row.backend:<11}{row.size:>7}  {row.variant:<14}{run.calls_per_trial:>7.1f}{run.per_trial_ms:>11.0f} ms"
            f"{run.per_epoch_ms:>10.1f} ms{run.epochs_per_trial:>8.2f}{run.join_s:>9.2f} s")


def _print_table(rows: list[Row]) -> None:
    print(f"\n{'backend':<11}{'size':>7}  {'variant':<14}{'calls':>7}{'per trial':>14}{'per epoch':>13}{'epochs':>8}"
          f"{'join':>11}{'per trial / optuna':>20}")
    for row in rows:
        plain = next(r for r in rows if r.backend == row.backend and r.size == row.size and r.variant == "optuna")
        print(f"{_line(row)}{row.run.per_trial_ms / plain.run.per_trial_ms:>19.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgresql", "mariadb"), default=["sqlite", "postgresql"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10000], help="finished trials already in the study")
    parser.add_argument("--trials", type=int, default=20, help="trials per run")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (the median pruner stops some earlier)")
    parser.add_argument("--epoch-seconds", type=float, default=0.05, help="the stand-in training's sleep per epoch")
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the older hpo (default: {BEFORE})")
    parser.add_argument("--keep", action="store_true", help="keep the filled studies (SQLite: give --sqlite-path)")
    parser.add_argument("--sqlite-path", help="SQLite file (default: a temporary one)")
    parser.add_argument("--postgres-url", default=os.environ.get("HPO_TEST_POSTGRES_URL"))
    parser.add_argument("--mysql-url", default=os.environ.get("HPO_TEST_MYSQL_URL"))
    # One variant in this process, printed as JSON (how the bench runs each variant).
    parser.add_argument("--variant", choices=("hpo", "optuna"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--study-name", help=argparse.SUPPRESS)
    parser.add_argument("--hpo-tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.variant:
        run = run_plain_optuna if args.variant == "optuna" else run_hpo
        measured = run(args.url, args.study_name, trials=args.trials, epochs=args.epochs, epoch_seconds=args.epoch_seconds)
        print(json.dumps(dataclasses.asdict(measured)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        urls = storage_bench._urls(args, Path(folder))
        before = _worktree(args.before, Path(folder) / "before")
        print(f"{os.cpu_count()} CPUs; optuna {optuna.__version__}; runs of {args.trials} trials of up to {args.epochs} "
              f"epochs of {args.epoch_seconds} s; 'hpo@REF' is hpo at git revision {args.before}")
        rows: list[Row] = []
        try:
            for backend, url in urls.items():
                for size in args.sizes:
                    rows += measure(args, backend, url, size, before)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", before], capture_output=True)
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
