"""``python -m hpo.best``: retrain a trial's configuration, test it once, save the model; or replay a trial.

Default: the study's best trial is retrained on the training and validation parts together, for as
many epochs as the trial ran and with the trial's stored seed, then evaluated once on the held-out
test set; weights, configuration and test figures are saved in one checkpoint that
``torch.load(path, weights_only=True)`` reads.  ``--trial N`` does the same for any trial.

``--top K --seeds S`` first re-evaluates the K best complete trials with S extra seeds each, on
the search's training/validation split, stores the results in the study's user attributes, and
retrains the trial with the best mean instead of the single luckiest run.

``--replay`` retrains a trial exactly as the search did (training part only, same validation
split, same seed, same epochs) and prints its recomputed per-epoch values next to the stored ones.
The work is :mod:`hpo.retraining`'s; this module parses flags and prints.
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
from hpo.retraining import load_model, save_model  # noqa: F401 (load_model: documented here before hpo.retraining)
from hpo.spec import Overrides, StudySpec, find_study, load_spec

if TYPE_CHECKING:
    import optuna
    import torch

    from hpo.data import Dataset

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
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings and the result only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        overrides = Overrides(study_name=args.study_name, data_dir=args.data_dir, device=args.device)
        spec = overrides.apply(load_spec(find_study(args.study)))
        configure_logging(verbose=args.verbose, quiet=args.quiet)
        return _best(spec, args)

    return guarded(PROG, body)


def _best(spec: StudySpec, args: argparse.Namespace) -> int:
    from hpo.data import load_dataset
    from hpo.device import resolve_device
    from hpo.retraining import check_reevaluation, check_test_images, model_path, pick_trial, replay_trial, retrain_trial
    from hpo.space import from_params
    from hpo.study import load_existing_study, resolve_storage

    check_reevaluation(top=args.top, seeds=args.seeds, trial=args.trial, replay=args.replay)
    url, source = resolve_storage(args.storage)
    study = load_existing_study(url, source, spec.study.name, flag="--study-name" if args.study_name else "--study")
    trial = pick_trial(study, args.trial)
    device = resolve_device(spec.train.device, "--device" if args.device else f"{spec.path}: [train] device")
    hp = from_params(trial.params, spec.space)
    dataset = load_dataset(spec.data)
    if args.replay:
        metric = spec.study.metric
        rows = replay_trial(spec, trial, hp, dataset, device)
        print(f"Replay of trial {trial.number} of study {spec.study.name!r} ({trial.state.name}, seed {trial.user_attrs['seed']}) on {device}:")
        print(f"  epoch  stored {metric}  replayed {metric}  difference")
        differences = []
        for row in rows:
            if row.stored is None:
                print(f"  {row.epoch:5d}  {'-':>{7 + len(metric)}}  {row.replayed:>{9 + len(metric)}.6f}")
                continue
            differences.append(abs(row.replayed - row.stored))
            print(f"  {row.epoch:5d}  {row.stored:>{7 + len(metric)}.6f}  {row.replayed:>{9 + len(metric)}.6f}  {row.replayed - row.stored:+.2e}")
        if differences:
            print(f"Largest difference: {max(differences):.2e} over {len(differences)} epochs")
        return 0
    check_test_images(dataset)
    writable_folder(Path(args.out), "--out")  # before training, not after
    if args.seeds > 0:
        trial = _reevaluated_choice(study, spec, dataset, device, top=args.top, seeds=args.seeds)
        hp = from_params(trial.params, spec.space)
    saved = retrain_trial(spec, trial, hp, dataset, device)
    path = model_path(Path(args.out), saved)
    save_model(saved, path)
    print(
        f"Trial {trial.number} of study {spec.study.name!r} retrained on {saved.train_images} images "
        f"for {saved.epochs} epochs (seed {saved.seed}): test accuracy {saved.test_accuracy:.2%}, "
        f"test loss {saved.test_loss:.4f} on {len(dataset.test_labels)} test images"
    )
    accuracy = trial.user_attrs.get("val_accuracy")
    if isinstance(accuracy, float):
        print(f"(The trial itself, trained on the training part only: {accuracy:.2%} validation accuracy.)")
    print(f"Checkpoint: {path}")
    return 0


def _reevaluated_choice(
    study: optuna.Study, spec: StudySpec, dataset: Dataset, device: torch.device, *, top: int, seeds: int
) -> optuna.trial.FrozenTrial:
    """Re-evaluate the top trials, print the comparison, and return the trial with the best mean."""
    from hpo.retraining import REEVALUATION_KEY, chosen_trial, reevaluate

    results = reevaluate(study, spec, dataset, device, top=top, seeds=seeds)
    metric = spec.study.metric
    short = f" (only {len(results)} completed)" if len(results) < top else ""
    print(
        f"Re-evaluated the top {top} trials{short} with {seeds} extra seeds each on the training/validation split "
        f"({metric}, mean ± sd over {seeds + 1} seeds, the trial's own run included):"
    )
    print(f"    trial  own run   {'mean ± sd':<19} val accuracy")
    stored_best = study.best_trial.number
    for index, result in enumerate(results):
        mark = "*" if index == 0 else " "
        print(
            f"  {mark} {result.trial:5d}  {result.values[0]:.4f}    {result.mean:.4f} ± {result.sd:<8.4f} {result.val_accuracy:.2%}"
        )
    chosen = chosen_trial(study, results)
    also = "also the best single run" if chosen.number == stored_best else f"the best single run was trial {stored_best}"
    print(
        f"Chosen: trial {chosen.number} ({also}); stored in study {study.study_name!r} as user attributes "
        f"{REEVALUATION_KEY.format(number='N')}"
    )
    return chosen


if __name__ == "__main__":
    sys.exit(main())
