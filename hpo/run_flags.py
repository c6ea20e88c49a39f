"""The flags of ``python -m hpo.run``, in a module of their own.

``hpo.submit`` checks the hpo.run arguments it hands to every Slurm array task with this same parser,
before anything is queued; commands never import each other, so the parser lives here.
"""

from __future__ import annotations

import argparse

from hpo import cli
from hpo.outage import DEFAULT_PATIENCE_S

PROG = "hpo.run"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog=f"python -m {PROG}",
        description="Run or resume an Optuna hyperparameter search over CNNs described by a study file.",
    )
    parser.add_argument("--study", required=True, help="study name in studies/ (e.g. cifar) or path to a .toml file")
    parser.add_argument(
        "--n-trials", type=cli.positive_int, required=True,
        help="total budget: finished (complete or pruned) trials the study should have; a resumed study runs only the rest",
    )
    parser.add_argument("--timeout", type=cli.positive_seconds, help="stop starting new trials after this many seconds")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study storage (default: $HPO_STORAGE or sqlite:///hpo.db)")
    parser.add_argument("--device", type=cli.device, help="auto, cpu, cuda, cuda:N or mps (overrides [train] device)")
    parser.add_argument("--data-dir", help="dataset folder or .tar.gz archive (overrides [data] data_dir)")
    parser.add_argument("--seed", type=cli.non_negative_int, help="sampler and trial seed (overrides [study] seed)")
    parser.add_argument("--study-name", help="name of the study in the storage (overrides [study] name)")
    parser.add_argument("--max-epochs", type=cli.positive_int, help="epochs per trial at most (overrides [train] max_epochs)")
    parser.add_argument(
        "--gpus", help="start one worker process per GPU: 'all' or a list like 0,2,3 (no GPU: CPU workers)",
    )
    parser.add_argument(
        "--workers-per-gpu", type=cli.positive_int, default=1,
        help="worker processes per GPU (or on the CPU when there is none); default 1",
    )
    parser.add_argument("--checkpoint-dir", help="where running trials keep their last-epoch checkpoint (default: beside the SQLite file, else ./hpo-checkpoints)")
    parser.add_argument(
        "--heartbeat-interval", type=cli.positive_int, default=10,
        help="seconds between a running trial's heartbeats in the storage (default 10)",
    )
    parser.add_argument(
        "--grace-period", type=cli.positive_int,
        help="seconds without a heartbeat after which a trial is failed and re-queued; above the interval (default 3 x interval)",
    )
    parser.add_argument(
        "--storage-patience", type=cli.positive_seconds, default=DEFAULT_PATIENCE_S,
        help=f"seconds a worker waits out an unreachable storage before it exits with code {cli.EXIT_STORAGE_UNAVAILABLE} "
        f"(default {DEFAULT_PATIENCE_S:.0f})",
    )
    parser.add_argument("--worker-index", type=cli.non_negative_int, help=argparse.SUPPRESS)
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every epoch of every trial")
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and the summary only")
    return parser
