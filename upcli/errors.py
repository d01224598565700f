"""Errors that upcli raises for bad input, each with a one-line message.

``cli.py`` maps them to exit codes in one place: ``UsageError`` is 2, every other ``UpcliError`` is 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (at most 200 characters), or its type's name: for one-line errors."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


class UpcliError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code = EXIT_ERROR


class UsageError(UpcliError):
    """A bad flag value or argument combination (exit 2)."""

    exit_code = EXIT_USAGE


class BadImageError(UpcliError):
    """An input image that cannot be decoded."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(UpcliError):
    """A checkpoint that is missing, unreadable, or of the wrong layout."""


class StoreError(UpcliError):
    """An output folder that cannot be written, resumed or read."""
