"""Which sampler and pruner earn the best model per hour: configurations side by side, equal wall-clock, many seeds.

Each configuration runs the study file for the same wall-clock budget, once per seed, one run after another
in this process (configurations interleaved within each seed, so that a slow spell of the machine does not
land on one configuration only).  A configuration is

  ``default``                 the study file's own sampler and pruner, as they are;
  ``SAMPLER:PRUNER``          e.g. ``tpe:median``, ``random:none``: the study file's settings where it uses
                              the same type, the type's defaults otherwise;
  either, then ``:WARMUP``    epochs: the median pruner's ``n_warmup_steps``, the successive-halving (both
                              forms) and Hyperband pruners' ``min_resource`` (``tpe:successive_halving:1``;
                              without WARMUP, ``SAMPLER:PRUNER`` gives these pruners 1);
  then ``:rf=N``              the successive-halving or Hyperband pruner's ``reduction_factor``,
  and/or ``:startup=N``       the sampler's ``n_startup_trials`` (TPE, GP, CMA-ES):
                              e.g. ``tpe:successive_halving:1:rf=3:startup=10``, ``default:2:rf=2``;
  ``optuna``                  plain Optuna as optuna-examples writes it, on the same images, space and
                              model (bench/search_reference.py): the reference line.

Optuna's TPESampler (5.0) has no public setting for how it treats pruned trials (it always ranks them
after every complete trial, those pruned later first), so no configuration changes that.

Per run the trial chosen is the best complete trial *by the study's validation objective* among those
finished within the budget; only then is it retrained on training + validation data and evaluated once on
the test set (``hpo.results.retrain.retrain_trial``, the optuna line's choice too).  The test set plays no
part in any choice.  Per configuration it prints mean ± standard error over seeds of: best validation
accuracy, the chosen configuration's test accuracy, epochs trained and the share of epochs pruning saved
(against every finished trial running all ``max_epochs``), trials finished, and seconds until the best
validation accuracy so far reached ``--target``.  Then every configuration against ``--baseline`` (default
``default``, else the first configuration) seed by seed: the mean difference ± its standard error and wins/ties/losses, for best
validation accuracy, test accuracy and time to target (over the seeds where both reached it); and, when
both ran, issue 21's goal line: ``default`` against ``optuna`` in best validation accuracy, with its worst
seed.  It writes ``runs.csv`` (a row per run), ``summary.csv`` (a row per configuration), ``paired.csv``
(a row per configuration and figure compared, the goal's row included), ``best-so-far.html`` (plotly: best
validation accuracy so far against wall-clock, mean line and ± standard-error band per configuration;
``--png PATH`` adds a picture of it, taken by docs/make_pictures.py's headless Chromium) and keeps the
studies in ``bench.db`` for optuna-dashboard.  Each finished run stores its figures in its study (user attr
``bench_run``): the same command run again reuses them and runs only what is missing.

Two processes may share one ``--out`` with disjoint ``--seeds`` (say one per core, ``--threads 1`` each):
bench.db is SQLite opened as hpo opens it (write-ahead log, a 60 s busy timeout, every transaction BEGIN
IMMEDIATE), every run is a study of its own, stored as it finishes.  Afterwards one invocation with all the
seeds, the same flags and ``--report-only`` prints and draws every run, and runs nothing.

    python bench/search.py --data ../shared/data/cifar10-jpg.tar.gz --budget 240 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import optuna  # noqa: E402
import search_reference  # noqa: E402
from search_report import (  # noqa: E402
    goal,
    goal_text,
    paired_rows,
    print_paired,
    print_table,
    summarize,
    write_csvs,
    write_figure,
    write_png,
)
from search_run import Run, choose, finished_within, outcome  # noqa: E402

from hpo.launching.run_args import RunRequest, SearchSettings  # noqa: E402
from hpo.launching.session import run_search  # noqa: E402
from hpo.results.retrain import retrain_trial  # noqa: E402
from hpo.studyfile.samplers import (  # noqa: E402
    PRUNERS,
    SAMPLERS,
    HyperbandPrunerSpec,
    MedianPrunerSpec,
    PromotionHalvingPrunerSpec,
    SuccessiveHalvingPrunerSpec,
)
from hpo.studyfile.space import from_params  # noqa: E402
from hpo.studyfile.spec import Overrides, StudySpec, find_study, load_spec  # noqa: E402
from hpo.training.datasets import load_dataset  # noqa: E402
from hpo.training.device import resolve_device  # noqa: E402
from hpo.training.splits import Dataset  # noqa: E402
from hpo.tuning.storage import open_storage  # noqa: E402

DEFAULT = "default"
DEFAULT_CONFIGS = (DEFAULT, search_reference.NAME, "default:2", "default:rf=2", "tpe:median:1")
# The KEY=N parts of a configuration: the sampler's or pruner's field each one sets.
KEYS = {"rf": "reduction_factor", "startup": "n_startup_trials"}
# The study user attr holding a finished run's figures: a run interrupted before it is stored is run again.
RESULT_ATTR = "bench_run"


@dataclass(frozen=True)
class Config:
    sampler: str | None  # a SAMPLERS key; None: the study file's own (``default``, and the optuna line)
    pruner: str | None  # a PRUNERS key; None when sampler is
    warmup: int | None = None  # epochs; None: the study file's setting
    reduction_factor: int | None = None  # rf=N; None: the study file's setting
    startup_trials: int | None = None  # startup=N: the sampler's n_startup_trials; None: the study file's
    reference: bool = False  # the optuna line (bench/search_reference.py)

    @property
    def label(self) -> str:
        """The configuration as written (parts in a fixed order): its name in tables, CSVs and study names."""
        if self.reference:
            return search_reference.NAME
        parts = [DEFAULT] if self.sampler is None else [self.sampler, str(self.pruner)]
        parts += [str(self.warmup)] if self.warmup is not None else []
        parts += [f"rf={self.reduction_factor}"] if self.reduction_factor is not None else []
        parts += [f"startup={self.startup_trials}"] if self.startup_trials is not None else []
        return ":".join(parts)


def _fields(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def _refusal(config: Config, sampler: type, pruner: type) -> str | None:
    """Why a KEY=N part means nothing to this sampler or pruner type, or None."""
    if config.reduction_factor is not None and "reduction_factor" not in _fields(pruner):
        return "rf=N needs a pruner with a reduction factor (successive_halving, promotion_halving, hyperband)"
    if config.startup_trials is not None and "n_startup_trials" not in _fields(sampler):
        return "startup=N needs a sampler with start-up trials (tpe, gp, cmaes)"
    return None


def parse_config(text: str) -> Config:
    form = "optuna, or default or SAMPLER:PRUNER followed by [:WARMUP] and any of :rf=N :startup=N"
    if text == search_reference.NAME:
        return Config(sampler=None, pruner=None, reference=True)
    parts = text.split(":")
    if parts[0] == DEFAULT:
        sampler, pruner, rest = None, None, parts[1:]
    elif len(parts) >= 2 and parts[0] in SAMPLERS and parts[1] in PRUNERS:
        sampler, pruner, rest = parts[0], parts[1], parts[2:]
    else:
        raise argparse.ArgumentTypeError(
            f"expected {form}, with a sampler of {sorted(SAMPLERS)} and a pruner of {sorted(PRUNERS)}; got {text!r}"
        )
    warmup = int(rest.pop(0)) if rest and rest[0].isdigit() else None
    options: dict[str, int] = {}
    for part in rest:
        key, equals, value = part.partition("=")
        if not equals or key not in KEYS or not value.isdigit() or KEYS[key] in options:
            raise argparse.ArgumentTypeError(f"expected {form} (WARMUP and N whole numbers, each key once); got {text!r}")
        options[KEYS[key]] = int(value)
    config = Config(sampler, pruner, warmup, options.get("reduction_factor"), options.get("n_startup_trials"))
    refused = None if sampler is None else _refusal(config, SAMPLERS[sampler], PRUNERS[str(pruner)])
    if refused is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {refused}")
    return config


def _types_chosen(base: StudySpec, config: Config) -> tuple[object, object]:
    """The configuration's sampler and pruner before its WARMUP and KEY=N parts are applied."""
    if config.sampler is None:
        return base.sampler, base.pruner
    # The study file's own settings where it uses the same type, the type's defaults otherwise.
    sampler = base.sampler if isinstance(base.sampler, SAMPLERS[config.sampler]) else SAMPLERS[config.sampler]()
    pruner = base.pruner if isinstance(base.pruner, PRUNERS[str(config.pruner)]) else PRUNERS[str(config.pruner)]()
    if isinstance(pruner, (SuccessiveHalvingPrunerSpec, PromotionHalvingPrunerSpec)):
        pruner = dataclasses.replace(pruner, min_resource=config.warmup or 1)
    if isinstance(pruner, HyperbandPrunerSpec):
        pruner = dataclasses.replace(pruner, min_resource=config.warmup or 1, max_resource=base.train.max_epochs)
    return sampler, pruner


def configured(base: StudySpec, config: Config, *, seed: int) -> StudySpec:
    """The study file with this configuration's sampler and pruner, named and seeded for one run."""
    study = dataclasses.replace(base.study, name=f"{config.label}/seed{seed}", seed=seed)
    if config.reference:
        return dataclasses.replace(base, study=study)  # the optuna line brings its own sampler and pruner
    sampler, pruner = _types_chosen(base, config)
    refused = _refusal(config, type(sampler), type(pruner))
    if refused is not None:
        raise SystemExit(f"--configs {config.label}: {refused}; the study file has {describe(sampler)} and {describe(pruner)}")
    if isinstance(pruner, MedianPrunerSpec) and config.warmup is not None:
        pruner = dataclasses.replace(pruner, n_warmup_steps=config.warmup)
    if isinstance(pruner, (SuccessiveHalvingPrunerSpec, PromotionHalvingPrunerSpec, HyperbandPrunerSpec)) and config.warmup is not None:
        pruner = dataclasses.replace(pruner, min_resource=config.warmup)
    if config.reduction_factor is not None:
        pruner = dataclasses.replace(pruner, reduction_factor=config.reduction_factor)  # type: ignore[type-var]
    if config.startup_trials is not None:
        sampler = dataclasses.replace(sampler, n_startup_trials=config.startup_trials)  # type: ignore[type-var]
    return dataclasses.replace(base, study=study, sampler=sampler, pruner=pruner)  # type: ignore[arg-type]


def describe(setting: object) -> str:
    """'tpe (n_startup_trials=6, multivariate=True, ...)': a sampler or pruner by its study-file name, with its settings."""
    name = next((k for k, v in {**SAMPLERS, **PRUNERS}.items() if v is type(setting)), type(setting).__name__)
    fields = ", ".join(f"{key}={value}" for key, value in dataclasses.asdict(setting).items())  # type: ignore[call-overload]
    return f"{name} ({fields})" if fields else name


@dataclass(frozen=True)
class Bench:
    """What every run of one invocation shares."""

    base: StudySpec  # the study file with the command's flags in place
    storage: optuna.storages.BaseStorage  # bench.db, opened as hpo opens SQLite
    url: str  # the same storage's URL, for hpo's runs
    out: Path
    budget_s: float
    target: float  # validation accuracy, a fraction
    settings: str  # settings_key: what a stored run must have been run with to be reused


def _search(bench: Bench, spec: StudySpec, config: Config, dataset: Dataset) -> optuna.Study:
    """The run's search, hpo's or the optuna line's; its study, in bench.db."""
    if config.reference:
        device = resolve_device(spec.train.device, "--device")
        return search_reference.search(spec, dataset, storage=bench.storage, budget_s=bench.budget_s, device=device)
    settings = SearchSettings(
        n_trials=100_000, storage=bench.url, timeout=bench.budget_s, checkpoint_dir=str(bench.out / "checkpoints"),
        heartbeat_interval=30,
    )
    request = RunRequest(study=str(spec.path), overrides=Overrides(), settings=settings)
    return run_search(request, spec=spec).study  # the configured spec, not the file's


def measure(bench: Bench, config: Config, seed: int, dataset: Dataset) -> Run:
    """One run: search for the budget, choose on validation, retrain and test the choice once; stored in its study."""
    spec = configured(bench.base, config, seed=seed)
    study = _search(bench, spec, config, dataset)
    started, trials = finished_within(study, bench.budget_s)
    chosen = choose(study, trials)  # the search is over: from here on nothing is chosen
    device = resolve_device(spec.train.device, "--device")
    saved = retrain_trial(spec, chosen, from_params(chosen.params, spec.space, spec.model.space), dataset, device)
    run = outcome(config.label, seed, started=started, trials=trials, chosen=chosen, max_epochs=spec.train.max_epochs,
                  target=bench.target, test_accuracy=saved.test_accuracy)
    study.set_user_attr(RESULT_ATTR, {"settings": bench.settings, **run.to_json()})
    return run


def settings_key(spec: StudySpec, budget_s: float, target: float, threads: int | None = None) -> str:
    """What a stored run's figures depend on besides its configuration and seed."""
    data = spec.data
    return (
        f"{spec.path.name} budget {budget_s:g} s, {spec.train.max_epochs} epochs, {data.train_subset}/{data.val_subset} "
        f"images, target {target:g}, {spec.train.device}" + (f", {threads} threads" if threads is not None else "")
    )


def stored_run(bench: Bench, name: str) -> Run | None:
    """The figures run ``name`` stored when it finished; None if it never finished (cut short, or still running)."""
    stored = optuna.load_study(study_name=name, storage=bench.storage).user_attrs.get(RESULT_ATTR)
    if stored is None:
        return None
    if stored.pop("settings") != bench.settings:
        raise SystemExit(f"--out: {bench.out / 'bench.db'} holds run {name!r} of other settings than {bench.settings}; give another --out")
    return Run.from_json(stored)


def warm_up() -> None:
    """Pay the process's one-time costs before any run is timed: torch imports its compiler (torch._dynamo) when the
    first optimizer is built, 2 to 5 s on the 2-core machine, which would otherwise fall in the first run's budget."""
    import torch

    weight = torch.zeros(1, 1, 3, 3, requires_grad=True)
    optimizer = torch.optim.AdamW([weight])
    torch.nn.functional.conv2d(torch.zeros(1, 1, 8, 8), weight).sum().backward()
    optimizer.step()


def collect_runs(bench: Bench, configs: list[Config], seeds: list[int], *, report_only: bool) -> list[Run]:
    """Every (seed, configuration) run: stored, or run now (unless ``report_only``) and stored."""
    taken = set(optuna.get_all_study_names(bench.storage))
    dataset = None if report_only else load_dataset(bench.base.data)  # decoded once; hpo's runs read the same cache
    if not report_only:
        warm_up()
    runs, missing, begun = [], [], time.monotonic()
    for seed in seeds:
        for config in configs:
            name = configured(bench.base, config, seed=seed).study.name
            run = stored_run(bench, name) if name in taken else None
            how = "stored by an earlier run of this command"
            if run is None and report_only:
                missing.append(name)
                continue
            if run is None:
                assert dataset is not None
                if name in taken:  # cut short before its figures were stored: run it again from the start
                    optuna.delete_study(study_name=name, storage=bench.storage)
                run = measure(bench, config, seed, dataset)
                how = f"{(time.monotonic() - begun) / 60:.1f} min so far"
            runs.append(run)
            print(
                f"  {run.config} seed {seed}: {run.trials_finished} trials, best val acc {run.best_val_accuracy:.1%}, "
                f"chose trial {run.chosen_trial}: test acc {run.test_accuracy:.1%} ({how})", flush=True,
            )
    if missing:
        raise SystemExit(f"--report-only: no finished run stored in {bench.out / 'bench.db'} for {', '.join(missing)} "
                         "(still running, cut short or never run): run them first")
    return runs


def report(bench: Bench, runs: list[Run], labels: list[str], *, baseline: str, png: str | None) -> None:
    """The tables, the goal line, the CSVs and the figure."""
    summaries = [summarize(label, [r for r in runs if r.config == label]) for label in labels]
    print()
    print_table(summaries, target=bench.target)
    pairs = paired_rows(runs, labels, baseline)
    print()
    print_paired(pairs, baseline=baseline, target=bench.target)
    found = goal(runs, DEFAULT, search_reference.NAME)
    if found is not None:
        print()
        print(goal_text(found))
        if baseline != search_reference.NAME:  # else the paired rows hold it already
            pairs.append(found)
    write_csvs(bench.out, runs, summaries, pairs)
    figure = bench.out / "best-so-far.html"
    write_figure(figure, runs, labels, budget_s=bench.budget_s)
    written = [bench.out / name for name in ("runs.csv", "summary.csv", "paired.csv")] + [figure]
    if png is not None:
        write_png(figure, Path(png))
        written.append(Path(png))
    print(f"\nWrote {', '.join(str(p) for p in written)}; studies in {bench.url}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_flags(parser)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        help=f"configurations, each optuna, or default or SAMPLER:PRUNER then [:WARMUP] [:rf=N] [:startup=N] "
                             f"(default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--baseline", type=parse_config,
                        help="the configuration every other one is compared with, seed by seed (default: default, "
                             "or the first of --configs when default is not one of them)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="study seeds, one run each (default: 0 1 2)")
    parser.add_argument("--budget", type=float, default=240.0, help="wall-clock seconds per run (default: 240)")
    parser.add_argument("--target", type=float, default=0.5, help="validation accuracy for the time-to-target column (default: 0.5)")
    parser.add_argument("--out", default="bench-search", help="folder for the CSVs, the figure and bench.db (default: bench-search/)")
    parser.add_argument("--threads", type=int, help="torch threads of every run, hpo's and the optuna line's alike "
                                                    "(torch.set_num_threads; default: torch's own, one per core)")
    parser.add_argument("--report-only", action="store_true",
                        help="print and draw the runs stored in --out, run nothing (the last step when processes share --out)")
    parser.add_argument("--png", help="also write a picture of the figure here (headless Chromium), e.g. docs/img/search-bench.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    labels = list(dict.fromkeys(c.label for c in args.configs))
    baseline = args.baseline.label if args.baseline is not None else DEFAULT if DEFAULT in labels else labels[0]
    if baseline not in labels:
        parser.error(f"--baseline {baseline}: not one of --configs ({' '.join(labels)})")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    base = base_spec(args)
    for config in args.configs:
        configured(base, config, seed=args.seeds[0])  # a KEY=N the study file's own types cannot take fails now
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(out / 'bench.db').resolve()}"
    bench = Bench(base=base, storage=open_storage(url, "--out"), url=url, out=out, budget_s=args.budget,
                  target=args.target, settings=settings_key(base, args.budget, args.target, args.threads))
    print(
        f"{base.path.name}: {len(labels)} configurations x {len(args.seeds)} seeds, {args.budget:.0f} s each, "
        f"{base.train.max_epochs} epochs per trial, {base.data.train_subset or 'all'} training / "
        f"{base.data.val_subset or 'all'} validation images, on {args.device}"
        + (f", torch.set_num_threads({args.threads})" if args.threads is not None else ""), flush=True,
    )
    print(f"{DEFAULT}: {describe(base.sampler)}; {describe(base.pruner)}", flush=True)
    configs = list({c.label: c for c in args.configs}.values())
    runs = collect_runs(bench, configs, args.seeds, report_only=args.report_only)
    report(bench, runs, labels, baseline=baseline, png=args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
