"""``hpo COMMAND ...``: the console command, which runs ``python -m hpo.COMMAND ...`` in this process.

A dispatcher, not a command: it imports only the command it was asked for (by name, so that ``hpo best``
loads neither the search nor the dashboard), and the commands still never import each other.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from hpo.cli import EXIT_USAGE, version

# Command name → what it does: the order and words of ``hpo --help``.
COMMANDS = {
    "run": "run or resume a search (python -m hpo.run)",
    "best": "retrain the best trial, test it once and save it (python -m hpo.best)",
    "report": "write a study's HTML report, trials.csv and summary.json (python -m hpo.report)",
    "dashboard": "serve optuna-dashboard on the study storage (python -m hpo.dashboard)",
    "submit": "queue workers on a cluster (python -m hpo.submit)",
}


def usage() -> str:
    lines = ["usage: hpo COMMAND [ARGS ...]   (hpo COMMAND --help: the command's flags)", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, about in COMMANDS.items()]
    lines += ["", "  --version  print hpo's version and exit"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--version":
        print(f"hpo {version()}")
        return 0
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"hpo: error: no command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_USAGE
    command = importlib.import_module(f"hpo.{name}")  # the one command asked for, imported on demand
    return int(command.main(rest))


if __name__ == "__main__":
    sys.exit(main())
