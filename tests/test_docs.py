"""The README and docs/ say what is true: every command in them is checked or marked as not run, every link lands.

A command in a ``bash`` block, on a ``$ `` line of a ``text`` block, or in running text with a flag
(``python -m hpo.run --study cifar`` in backticks) is *checked* when it is one of hpo's commands, a
``bench/`` script or ``docs/make_pictures.py``: its argv goes through the command's own argument parser,
the study it names is loaded, and ``hpo.submit`` runs its checks up to the queueing. Nothing trains,
connects or queues. Any other command (pip, docker, kubectl, sbatch, pytest…) must be marked: its block
follows ``<!-- not run by the tests: why -->``, or its line ends in ``# not run by the tests``.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "not run by the tests"
SHELL = {"bash", "sh", "shell"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
# The README is the newcomer's first screen: issue 19 asks for at most about 250 lines.
README_MAX_LINES = 250


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: where it starts (1-based line of the fence), its language, its text."""

    page: Path
    line: int
    language: str
    text: str
    marked: bool  # the line before the fence is an HTML comment saying the block is not run


@dataclass(frozen=True)
class Command:
    """One shell command of a block, split into words, with where it stands."""

    where: str  # "docs/x.md:12", for messages and test ids
    argv: list[str]
    marked: bool


def _prose(page: Path) -> str:
    """The page with its code blocks blanked out (line numbers kept), where headings and links are read."""

    def blank(block: re.Match[str]) -> str:
        return "\n" * block.group(0).count("\n")

    return re.sub(r"^```.*?^```", blank, page.read_text(encoding="utf-8"), flags=re.S | re.M)


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    start: int | None = None
    for number, line in enumerate(lines):
        if not line.startswith("```"):
            continue
        if start is None:
            start = number
            continue
        before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marked = before.strip().startswith("<!--") and NOT_RUN in before
        found.append(Block(page, start + 1, lines[start][3:].strip(), "\n".join(lines[start + 1 : number]), marked))
        start = None
    assert start is None, f"{page.name}:{start + 1 if start is not None else 0}: a code block is never closed"
    return found


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each command line of a block, backslash continuations joined."""
    joined: list[tuple[int, str]] = []
    pending = ""
    first = 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.strip()
        if block.language == "text":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending:
            first = block.line + 1 + offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append((first, pending + line))
        pending = ""
    return [(number, line) for number, line in joined if line and not line.startswith("#")]


def _commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    for number, line in _logical_lines(block):
        marked = block.marked or line.rstrip().endswith(f"# {NOT_RUN}")
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word not in {"&&", "||", ";", "|"}:
                words.append(word)
                continue
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before a command
                words.pop(0)
            if words:
                commands.append(Command(f"{block.page.relative_to(ROOT)}:{number}", words, marked))
            words = []
    return commands


def _inline_commands(page: Path) -> list[Command]:
    """Commands of hpo, bench/ or docs/ written in running text (`python -m hpo.run --study …`) with a flag:
    a bare name such as `python -m hpo.run` is a mention, not a command."""
    found: list[Command] = []
    text = _prose(page)
    for span in re.finditer(r"`(python\s(?:-m\shpo\.|bench/|docs/)[^`]*)`", text):  # may wrap across lines
        argv = shlex.split(span.group(1))
        if any(word.startswith("-") for word in argv[2:]):
            number = text.count("\n", 0, span.start()) + 1
            found.append(Command(f"{page.relative_to(ROOT)}:{number}", argv, marked=False))
    return found


def _all_commands() -> list[Command]:
    in_blocks = [c for page in PAGES for b in _blocks(page) if b.language in SHELL | {"text"} for c in _commands(b)]
    return in_blocks + [c for page in PAGES for c in _inline_commands(page)]


class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args: the script parsed its argv and is stopped there."""


class _Queued(Exception):
    """Raised in place of submitit's submission: hpo.submit got through every check."""


def _load_study(study: str | None) -> None:
    from hpo.studyfile.spec import find_study, load_spec

    if study is not None:
        load_spec(find_study(study))


def _check_run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo.launching.run_args import parse_run_args

    _load_study(parse_run_args(argv).study)


def _check_results(module: str) -> Callable[[list[str], pytest.MonkeyPatch], None]:
    def check(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
        import importlib

        args = importlib.import_module(module).build_parser().parse_args(argv)
        _load_study(getattr(args, "study", None))

    return check


def _check_submit(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """hpo.submit's own checks (flags, hpo.run's arguments, study file, time limit), short of the storage
    connection and the submission itself."""
    pytest.importorskip("submitit")
    import hpo.launching.slurm
    import hpo.submit
    import hpo.tuning.storage

    def queue(*args: object, **kwargs: object) -> None:
        raise _Queued()

    cut = argv.index("--") if "--" in argv else len(argv)
    args = hpo.submit.build_parser().parse_args(argv[:cut])
    assert cut < len(argv), "hpo.submit needs hpo.run's arguments after --"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Queued):  # undone before the next check
        patch.setattr(hpo.tuning.storage, "check_storage", lambda url, source: None)
        patch.setattr(hpo.launching.slurm, "submit_array", queue)
        patch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
        hpo.submit._submit(args, hpo.submit.queued_run(argv[cut + 1 :]))


def _check_script(script: Path) -> Callable[[list[str], pytest.MonkeyPatch], None]:
    def check(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
        original = argparse.ArgumentParser.parse_args

        def parse_only(self: argparse.ArgumentParser, args: object = None, namespace: object = None) -> None:
            raise _Parsed(original(self, args, namespace))

        with pytest.MonkeyPatch.context() as patch, pytest.raises(_Parsed):  # undone before the next check
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
            patch.setattr(sys, "argv", [str(script), *argv])
            runpy.run_path(str(script), run_name="__main__")

    return check


# The commands this test checks: `python -m MODULE` and `python SCRIPT`, each with its checker.
CHECKED: dict[str, Callable[[list[str], pytest.MonkeyPatch], None]] = {
    "hpo.run": _check_run,
    "hpo.best": _check_results("hpo.best"),
    "hpo.report": _check_results("hpo.report"),
    "hpo.dashboard": _check_results("hpo.dashboard"),
    "hpo.submit": _check_submit,
    **{f"bench/{p.name}": _check_script(p) for p in sorted((ROOT / "bench").glob("*.py"))},
    "docs/make_pictures.py": _check_script(ROOT / "docs" / "make_pictures.py"),
}


def _program(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the CHECKED key of a command, its arguments), or (None, argv) for any other command."""
    if len(argv) >= 2 and argv[0] == "hpo" and f"hpo.{argv[1]}" in CHECKED:  # a console entry point: hpo run …
        return f"hpo.{argv[1]}", argv[2:]
    if len(argv) >= 3 and argv[0] in PYTHONS and argv[1] == "-m":
        return (argv[2], argv[3:]) if argv[2] in CHECKED else (None, argv)
    if len(argv) >= 2 and argv[0] in PYTHONS and argv[1] in CHECKED:
        return argv[1], argv[2:]
    return None, argv


COMMANDS = _all_commands()


def test_the_pages_hold_commands() -> None:
    """The extraction finds what the pages hold (a broken fence parser would make every check below vacuous)."""
    programs = {_program(c.argv)[0] for c in COMMANDS}
    assert {"hpo.run", "hpo.best", "hpo.report", "hpo.dashboard", "hpo.submit"} <= programs, programs
    assert any(p and p.startswith("bench/") for p in programs), programs


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.argv[0]}" for c in COMMANDS])
def test_every_command_is_checked_or_marked_as_not_run(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    program, args = _program(command.argv)
    if program is None:
        assert command.marked, (
            f"{command.where}: {shlex.join(command.argv)!r} is not checked by tests/test_docs.py: mark its block "
            f"with <!-- {NOT_RUN}: why --> or end the line with '# {NOT_RUN}'"
        )
        return
    monkeypatch.chdir(ROOT)  # paths in the pages (examples/mynet.toml, studies/) are from the repository root
    try:
        CHECKED[program](args, monkeypatch)
    except Exception as exc:
        pytest.fail(f"{command.where}: {shlex.join(command.argv)!r}: {type(exc).__name__}: {exc}")
    except SystemExit as exc:  # a script's argparse refusing its argv
        pytest.fail(f"{command.where}: {shlex.join(command.argv)!r} is refused by its parser (exit {exc.code})")


def test_a_wrong_flag_in_a_page_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented mistakes of issue 19 fail their checkers: the checks can fail."""
    from hpo.errors import HpoError, UsageError

    monkeypatch.chdir(ROOT)
    with pytest.raises(UsageError, match="--study"):
        CHECKED["hpo.dashboard"](["--study", "quick"], monkeypatch)
    with pytest.raises(UsageError, match="--time"):
        CHECKED["hpo.submit"](["slurm", "--workers", "2", "--time", "3", "--", "--study", "quick", "--n-trials", "4",
                               "--storage", "postgresql+psycopg2://u@db-host/hpo"], monkeypatch)
    with pytest.raises(SystemExit):
        CHECKED["bench/search.py"](["--seeds", "0"], monkeypatch)
    with pytest.raises(HpoError, match="unknown study 'nosuch'"):
        CHECKED["hpo.run"](["--study", "nosuch", "--n-trials", "1"], monkeypatch)


def test_every_code_block_names_its_language() -> None:
    """An unlabelled block would hide its commands from the check above: ```bash, ```text, ```toml, ```python…"""
    unlabelled = [f"{b.page.relative_to(ROOT)}:{b.line}" for page in PAGES for b in _blocks(page) if not b.language]
    assert not unlabelled, unlabelled


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _prose(page), flags=re.M):
        slug = _slug(heading)
        count = sum(1 for a in anchors if a == slug or re.fullmatch(rf"{re.escape(slug)}-\d+", a))
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_lands(page: Path) -> None:
    broken: list[str] = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _prose(page))):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not followed here
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_fits_on_a_few_screens() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_commands_are_recognized_however_they_are_spelled() -> None:
    """python -m, a venv's python, a script path and a console entry point all reach their checker."""
    assert _program(["python", "-m", "hpo.run", "--study", "quick"]) == ("hpo.run", ["--study", "quick"])
    assert _program([".venv/bin/python", "-m", "hpo.best", "-q"]) == ("hpo.best", ["-q"])
    assert _program(["hpo", "report", "--study", "quick"]) == ("hpo.report", ["--study", "quick"])
    assert _program(["python", "bench/search.py", "--data", "x"]) == ("bench/search.py", ["--data", "x"])
    assert _program(["python", "-m", "pytest"])[0] is None and _program(["pip", "install", "."])[0] is None


@pytest.mark.parametrize("module", ["hpo.launching.run_args", "hpo.report", "hpo.best", "hpo.dashboard", "hpo.submit"])
def test_every_flag_of_every_command_is_in_the_command_reference(module: str) -> None:
    import argparse
    import importlib

    parser = importlib.import_module(module).build_parser()
    parsers = [parser, *(p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values())]
    flags = {o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    text = (ROOT / "docs" / "commands.md").read_text()
    assert not sorted(f for f in flags if f"`{f}" not in text), "flags missing from docs/commands.md"
