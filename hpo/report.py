"""``python -m hpo.report``: one self-contained HTML report of a study, plus ``trials.csv`` and ``summary.json``.

The report itself is :mod:`hpo.reporting`'s; this module parses flags and prints the paths.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hpo.cli import Parser, add_study_flags, configure_logging, guarded, positive_int, writable_folder
from hpo.spec import Overrides, StudySpec, find_study, load_spec

PROG = "hpo.report"
DEFAULT_OUT = "reports"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"python -m {PROG}", description="Write an HTML report, trials.csv and summary.json of a study.")
    add_study_flags(parser)
    parser.add_argument("--out", help=f"folder for the report (default: {DEFAULT_OUT}/<study name>/)")
    parser.add_argument(
        "--max-epochs", type=positive_int,
        help="epochs per trial the study ran with, if hpo.run was given --max-epochs (for the pruning saving)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the paths written")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        overrides = Overrides(study_name=args.study_name, max_epochs=args.max_epochs)
        spec = overrides.apply(load_spec(find_study(args.study)))
        configure_logging(verbose=False, quiet=True)  # optuna's per-figure warnings are explained in the report
        return _report(spec, args)

    return guarded(PROG, body)


def _report(spec: StudySpec, args: argparse.Namespace) -> int:
    from hpo.reporting import report_study
    from hpo.study import load_existing_study, redact, resolve_storage

    url, source = resolve_storage(args.storage)
    study = load_existing_study(url, source, spec.study.name, flag="--study-name" if args.study_name else "--study")
    metric = study.metric_names[0] if study.metric_names else spec.study.metric
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / spec.study.name
    writable_folder(out, "--out" if args.out else "default report folder")
    summary, files = report_study(study, out, storage_shown=redact(url), metric=metric, max_epochs=spec.train.max_epochs)
    if not args.quiet:
        states = ", ".join(f"{name} {count}" for name, count in summary.states.items() if count) or "none"
        print(f"Study {summary.study!r} in {summary.storage}: {summary.trials} trials ({states})")
        if summary.best is None:
            print("No completed trial yet: the report shows what there is and says what is missing.")
        else:
            print(f"Best trial {summary.best.number}: {metric} {summary.best.value:.4f}")
        print(
            f"Epochs: {summary.epochs_trained} trained, {summary.epochs_without_pruning} without pruning "
            f"(saved {summary.epochs_saved_fraction:.0%}); {summary.training_seconds:.1f} s of training"
        )
    for path in (files.page, files.trials, files.summary):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
