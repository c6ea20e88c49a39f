"""``python -m hpo.report``: one self-contained HTML report of a study, plus ``trials.csv`` and ``summary.json``.

The three files are also uploaded as artifacts of the study (``--artifacts``, hpo.tuning.artifacts), where
optuna-dashboard shows them.

The report itself is :func:`hpo.results.report.write_report`'s; this module parses flags and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hpo.cli import Parser, add_study_flags, configure_logging, guarded, positive_int, writable_folder
from hpo.studyfile.spec import Overrides, StudySpec, find_study, load_spec

PROG = "hpo.report"
DEFAULT_OUT = "reports"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"python -m {PROG}", description="Write an HTML report, trials.csv and summary.json of a study.")
    add_study_flags(parser)
    parser.add_argument("--out", help=f"folder for the report (default: {DEFAULT_OUT}/<study name>/)")
    parser.add_argument(
        "--max-epochs", type=positive_int,
        help="epochs per trial (for the pruning saving); default: those the study was started with, stored in it "
        "(a study that stored none: the study file's)",
    )
    parser.add_argument(
        "--artifacts", help="Optuna artifact store the report's files are uploaded to, as artifacts of the study: a folder, "
        "s3://bucket/prefix or none (default: beside a SQLite file, e.g. hpo-artifacts/, else ./hpo-artifacts)",
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
    from hpo.results.report import write_report
    from hpo.results.summary import summary_lines
    from hpo.tuning.artifacts import open_artifacts
    from hpo.tuning.storage import redact, resolve_storage
    from hpo.tuning.study import load_existing_study

    url, source = resolve_storage(args.storage)
    study = load_existing_study(url, source, spec.study.name, flag="--study-name" if args.study_name else "--study")
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / spec.study.name
    artifacts = open_artifacts(args.artifacts, url)
    writable_folder(out, "--out" if args.out else "default report folder")  # named by its flag, before writing
    files = write_report(
        study, out=out, study_file=spec.path, max_epochs=args.max_epochs, storage_shown=redact(url)
    )
    if not args.quiet:
        for line in summary_lines(files.study_summary):
            print(line)
    for path in (files.page, files.trials, files.summary):
        print(path)
        if artifacts is not None:  # for optuna-dashboard, which lists a study's artifacts on its page
            artifact_id = artifacts.upload(study, path)
            if not args.quiet:
                print(f"  artifact {artifact_id} of study {study.study_name!r} in {artifacts.shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
