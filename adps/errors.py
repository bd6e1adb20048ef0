"""Errors that carry a message for the user: what went wrong, which file or key, what to do."""

from __future__ import annotations


class AdpsError(Exception):
    """Base of the project's user-facing errors; the CLI prints the message and exits non-zero."""


class DatasetError(AdpsError):
    """A dataset folder or source that cannot be read or imported."""


class ImageReadError(DatasetError):
    """An image file that cannot be decoded."""


class ValidationFailed(AdpsError):
    """The dataset failed Great Expectations validation; ``failures`` names each bad file."""

    def __init__(self, message: str, failures: list[dict[str, str]]):
        super().__init__(message)
        self.failures = failures
