"""``python -m hpo.best``: retrain a trial's configuration, test it once, save the model; or replay a trial.

Default: the study's best trial is retrained on the training and validation parts together, for as
many epochs as the trial ran and with the trial's stored seed, then evaluated once on the held-out
test set; weights, configuration and test figures are saved in one checkpoint that
``torch.load(path, weights_only=True)`` reads, and uploaded as an artifact of the study (``--artifacts``,
hpo.tuning.artifacts) for optuna-dashboard.  The study's stored epochs, subsets and split
(hpo.studyfile.stored) are used, not those of a study file edited since.  ``--trial N`` does the same for any trial.

``--top K --seeds S`` first re-evaluates the K best complete trials with S extra seeds each, on
the search's training/validation split, stores the results in the study's user attributes, and
retrains the trial with the best mean instead of the single luckiest run.

``--replay`` retrains a trial exactly as the search did (training part only, same validation
split, same seed, same epochs) and prints its recomputed per-epoch values next to the stored ones.
The work is :mod:`hpo.results.retrain`'s (:func:`~hpo.results.retrain.retrain`, :func:`~hpo.results.retrain.replay`);
this module parses flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.cli import Parser, add_study_flags, configure_logging, guarded, non_negative_int, positive_int, writable_folder
from hpo.cli import device as device_flag
from hpo.studyfile.spec import Overrides, find_study, load_spec

if TYPE_CHECKING:
    import optuna

    from hpo.results.retrain import Reevaluation, Replay

logger = logging.getLogger("hpo.best")  # not __name__: that is "__main__" under python -m

PROG = "hpo.best"
DEFAULT_OUT = "checkpoints"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=f"python -m {PROG}",
        description="Retrain the best (or any) trial on training + validation data, test it once and save it; or replay a trial.",
    )
    add_study_flags(parser)
    parser.add_argument("--trial", type=non_negative_int, help="trial number (default: the study's best trial)")
    parser.add_argument(
        "--replay", action="store_true",
        help="retrain exactly as the trial did (training part, same seed) and compare with its stored values; saves nothing",
    )
    parser.add_argument(
        "--top", type=positive_int, default=1, metavar="K",
        help="re-evaluate the K best complete trials and retrain the best by mean validation value (default: 1, needs --seeds)",
    )
    parser.add_argument(
        "--seeds", type=non_negative_int, default=0, metavar="S",
        help="extra seeds per re-evaluated trial, on the training/validation split (default: 0, no re-evaluation)",
    )
    parser.add_argument("--device", type=device_flag, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the checkpoint (default: {DEFAULT_OUT}/)")
    parser.add_argument(
        "--artifacts", help="Optuna artifact store the checkpoint is uploaded to, as an artifact of the study: a folder, "
        "s3://bucket/prefix or none (default: beside a SQLite file, e.g. hpo-artifacts/, else ./hpo-artifacts)",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        spec = Overrides(study_name=args.study_name).apply(load_spec(find_study(args.study)))
        configure_logging(verbose=args.verbose, quiet=args.quiet)
        from hpo.results.retrain import check_reevaluation
        from hpo.tuning.storage import resolve_storage
        from hpo.tuning.study import load_existing_study

        check_reevaluation(top=args.top, seeds=args.seeds, trial=args.trial, replay=args.replay)
        url, source = resolve_storage(args.storage)
        study = load_existing_study(url, source, spec.study.name, flag="--study-name" if args.study_name else "--study")
        if args.replay:
            return _replay(study, spec.path, args)
        from hpo.tuning.artifacts import open_artifacts

        artifacts = open_artifacts(args.artifacts, url)  # checked before training, like --out
        path = _retrain(study, spec.path, args)
        if artifacts is not None:  # for optuna-dashboard; of the study, since Optuna attaches none to a finished trial
            print(f"Artifact {artifacts.upload(study, path)} of study {study.study_name!r} in {artifacts.shown}")
        return 0

    return guarded(PROG, body)


def _replay(study: optuna.Study, study_file: Path, args: argparse.Namespace) -> int:
    from hpo.results.retrain import replay

    result = replay(study, args.trial, study_file=study_file, device=args.device, data_dir=args.data_dir)
    _print_replay(study, result)
    return 0


def _print_replay(study: optuna.Study, result: Replay) -> None:
    trial, metric = result.trial, result.metric
    print(
        f"Replay of trial {trial.number} of study {study.study_name!r} ({trial.state.name}, "
        f"seed {trial.user_attrs['seed']}) on {result.device}:"
    )
    print(f"  epoch  stored {metric}  replayed {metric}  difference")
    differences = []
    for row in result.epochs:
        if row.stored is None:
            print(f"  {row.epoch:5d}  {'-':>{7 + len(metric)}}  {row.replayed:>{9 + len(metric)}.6f}")
            continue
        differences.append(abs(row.replayed - row.stored))
        print(
            f"  {row.epoch:5d}  {row.stored:>{7 + len(metric)}.6f}  {row.replayed:>{9 + len(metric)}.6f}  "
            f"{row.replayed - row.stored:+.2e}"
        )
    if differences:
        print(f"Largest difference: {max(differences):.2e} over {len(differences)} epochs")


def _retrain(study: optuna.Study, study_file: Path, args: argparse.Namespace) -> Path:
    """Retrain, save and print; the checkpoint's path."""
    from hpo.results.retrain import model_path, retrain, save_model

    def show(results: list[Reevaluation], chosen: optuna.trial.FrozenTrial) -> None:
        _print_reevaluations(study, results, chosen, top=args.top, seeds=args.seeds)

    saved = retrain(
        study, args.trial, top=args.top, seeds=args.seeds, study_file=study_file, device=args.device,
        data_dir=args.data_dir, on_reevaluated=show, before_training=lambda: writable_folder(Path(args.out), "--out"),
    )
    path = model_path(Path(args.out), saved)
    save_model(saved, path)
    print(
        f"Trial {saved.trial} of study {saved.study!r} retrained on {saved.train_images} images "
        f"for {saved.epochs} epochs (seed {saved.seed}): test accuracy {saved.test_accuracy:.2%}, "
        f"test loss {saved.test_loss:.4f} on {saved.test_images} test images"
    )
    accuracy = study.trials[saved.trial].user_attrs.get("val_accuracy")
    if isinstance(accuracy, float):
        print(f"(The trial itself, trained on the training part only: {accuracy:.2%} validation accuracy.)")
    print(f"Checkpoint: {path}")
    return path


def _print_reevaluations(
    study: optuna.Study, results: list[Reevaluation], chosen: optuna.trial.FrozenTrial, *, top: int, seeds: int
) -> None:
    """The comparison of the re-evaluated trials, best mean first, and which one was chosen."""
    from hpo.results.retrain import REEVALUATION_KEY

    metric = study.metric_names[0] if study.metric_names else "value"
    short = f" (only {len(results)} completed)" if len(results) < top else ""
    print(
        f"Re-evaluated the top {top} trials{short} with {seeds} extra seeds each on the training/validation split "
        f"({metric}, mean ± sd over {seeds + 1} seeds, the trial's own run included):"
    )
    print(f"    trial  own run   {'mean ± sd':<19} val accuracy")
    for index, result in enumerate(results):
        mark = "*" if index == 0 else " "
        print(
            f"  {mark} {result.trial:5d}  {result.values[0]:.4f}    {result.mean:.4f} ± {result.sd:<8.4f} {result.val_accuracy:.2%}"
        )
    stored_best = study.best_trial.number
    also = "also the best single run" if chosen.number == stored_best else f"the best single run was trial {stored_best}"
    print(
        f"Chosen: trial {chosen.number} ({also}); stored in study {study.study_name!r} as user attributes "
        f"{REEVALUATION_KEY.format(number='N')}"
    )


if __name__ == "__main__":
    sys.exit(main())
