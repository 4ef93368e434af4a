"""User-facing errors: one line that names the file, tensor or key and says what to do."""

from __future__ import annotations


class MergeError(Exception):
    """A problem with the user's input or environment (not a bug in mergesmith).

    The CLI prints ``error: <message>`` on one line and exits with status 2; no traceback.
    """


class RecipeError(MergeError):
    """The recipe is malformed or inconsistent."""


class CheckpointError(MergeError):
    """A checkpoint cannot be read, or models do not fit together."""
