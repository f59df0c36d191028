"""The exception types for problems a user can fix (recipe, inputs, resources)."""


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""

    exit_code = 2


class Interrupted(ProDistillError):
    """The user stopped the merge (Ctrl-C); the message says how to continue."""

    exit_code = 130


def one_line(exc: BaseException) -> str:
    """Another library's error message, fit to end a one-line ProDistillError."""
    return " ".join(str(exc).split()) or type(exc).__name__
