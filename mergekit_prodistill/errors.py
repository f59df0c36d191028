"""The exception types for problems a user can fix (recipe, inputs, resources)."""


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""

    exit_code = 2


class Interrupted(ProDistillError):
    """The user stopped the merge (Ctrl-C); the message says how to continue."""

    exit_code = 130


def one_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message, for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
