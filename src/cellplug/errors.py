"""Errors meant for the user: one line, naming the file or value and the problem."""

from __future__ import annotations


class CellplugError(Exception):
    """A problem with the user's input or setup (bad file, unknown model, ...).

    The CLI prints ``str(error)`` as a single line and exits with a non-zero code;
    anything else escaping is a bug.
    """


class InputError(CellplugError):
    """An input file cannot be used (unreadable, wrong dimensions, NaNs, empty...)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class AxesGuessWarning(UserWarning):
    """An image's dimension order was guessed (no axis metadata); ``--axes`` says it."""
