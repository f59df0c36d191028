"""The one exception type for problems a user can fix (recipe, inputs, resources)."""


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""


def one_line(exc: BaseException) -> str:
    """Another library's error message, fit to end a one-line ProDistillError."""
    return " ".join(str(exc).split())
