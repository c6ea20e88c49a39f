"""The values that shape a study's trials, stored with the study when it is created.

A study's trials are comparable only if they trained alike: the same epochs per trial (the pruner's
rungs are epochs), the same subsets, validation split, image size and seed.  These values come from
the study file and hpo.run's flags (``--max-epochs``, ``--seed``); hpo.run stores them in the study's
user attr :data:`STARTED_WITH_ATTR` when it creates the study, refuses a resume whose values differ
(one line naming each, unless ``--accept-changed-overrides``), and ``hpo.best`` and the report read
them back instead of trusting a study file that may have changed since.

Where the trials run (``--device``, ``--data-dir``) is not stored: it may differ between workers and
machines without changing what a trial computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from hpo.studyfile.spec import Overrides, StudySpec

# The study user attr holding :func:`started_with`'s mapping.
STARTED_WITH_ATTR = "started_with"

# Stored value: what a study file key may hold (JSON-able, as Optuna stores user attrs).
Value = int | float | bool | None

# (section, key, hpo.run flag that overrides it or None): each a field of the spec's section of that name.
KEYS: tuple[tuple[str, str, str | None], ...] = (
    ("train", "max_epochs", "--max-epochs"),
    ("study", "seed", "--seed"),
    ("data", "train_subset", None),
    ("data", "val_subset", None),
    ("data", "val_fraction", None),
    ("data", "split_seed", None),
    ("data", "image_size", None),
    ("data", "channels", None),
    ("train", "augment", None),
)


@dataclass(frozen=True)
class Change:
    """One stored value a resume would change."""

    key: str
    stored: Value
    now: Value
    source: str  # where the new value comes from: its flag, or "[section] key" of the study file

    def __str__(self) -> str:
        return f"{self.key} {self.stored!r}, not {self.now!r} ({self.source})"


def started_with(spec: StudySpec) -> dict[str, Value]:
    """The values of :data:`KEYS` in ``spec`` (the study file with hpo.run's overrides applied)."""
    return {key: getattr(getattr(spec, section), key) for section, key, _ in KEYS}


def changes(spec: StudySpec, stored: Mapping[str, object], overrides: Overrides = Overrides()) -> list[Change]:
    """The values of ``spec`` that differ from the ``stored`` ones; a key the study did not store (an older hpo) is not compared."""
    now = started_with(spec)
    found = []
    for section, key, flag in KEYS:
        if key in stored and stored[key] != now[key]:
            # The flag when it was given (its Overrides field is named like the key), else the study file's key.
            given = flag is not None and getattr(overrides, key) is not None
            source = flag if flag is not None and given else f"{spec.path}: [{section}] {key}"
            found.append(Change(key=key, stored=stored[key], now=now[key], source=source))  # type: ignore[arg-type]
    return found


def refusal(study_name: str, found: list[Change]) -> str:
    """The one line that refuses a resume with changed values."""
    listed = "; ".join(str(change) for change in found)
    return (
        f"study {study_name!r} was started with {listed}: resuming would mix trials trained differently; "
        "use the study's values, another --study-name, or --accept-changed-overrides"
    )


def with_stored(spec: StudySpec, stored: object) -> StudySpec:
    """``spec`` with the values its study was started with in place of the study file's (a study without them: ``spec``)."""
    if not isinstance(stored, Mapping):
        return spec
    sections = {section: getattr(spec, section) for section, _, _ in KEYS}
    for section, key, _ in KEYS:
        if key in stored:
            sections[section] = dataclasses.replace(sections[section], **{key: stored[key]})
    return dataclasses.replace(spec, **sections)
