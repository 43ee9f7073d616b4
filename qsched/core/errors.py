"""User-facing errors.

Everything a user can cause (bad flags, a missing model, a corrupt artifact) raises a subclass of
:class:`QschedError`; the CLI prints its message on one line and exits non-zero, with no traceback.
Anything else is a bug and keeps its traceback.
"""


class QschedError(Exception):
    """An error caused by the input, with a message that says what was wrong and what to do."""


class BitSpecError(QschedError):
    """A ``--bits`` string that is not in the grammar."""


class ModelNotFoundError(QschedError):
    """A model name that is neither a registry name, a local directory nor a reachable hub id."""


class RecipeError(QschedError):
    """A recipe file with unknown keys or bad values."""


class ArtifactError(QschedError):
    """An artifact that cannot be written or read: corrupt, truncated, newer schema, bad path."""
