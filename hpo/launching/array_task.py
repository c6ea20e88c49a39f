"""``python -m hpo.launching.array_task ARGS``: one task of ``slurm/hpo-array.sbatch``, which becomes hpo.run.

ARGS are hpo.run's; the task adds its device (``$HPO_DEVICE``, default cuda) and its worker index
(``$SLURM_ARRAY_TASK_ID``) with :func:`hpo.launching.run_args.task_flags`, and replaces itself by
``python -m hpo.run`` (exec: Slurm's signals reach hpo.run directly).
"""

from __future__ import annotations

import os
import sys

from hpo.launching.run_args import run_command, task_flags


def main() -> None:
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    argv = [*sys.argv[1:], *task_flags(index=index, device=os.environ.get("HPO_DEVICE", "cuda"))]
    command = run_command(argv)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
