"""The one exception type for problems a user can fix (recipe, inputs, resources)."""


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""


def one_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message, for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
