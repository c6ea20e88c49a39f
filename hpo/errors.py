"""Errors a user can fix. ``hpo.run`` prints each as one line on stderr and exits with code 2."""

from __future__ import annotations


class HpoError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class SpecError(HpoError):
    """A study file that cannot be read or does not validate; the message names the file and key."""


class UsageError(HpoError):
    """A command-line flag with a bad value; the message names the flag."""


class DataError(HpoError):
    """A dataset that cannot be found or read; the message says where it looked."""


class StorageError(HpoError):
    """A storage URL that cannot be parsed or reached; the message never shows a password."""
