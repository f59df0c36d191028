"""The exception types for problems a user can fix (recipe, inputs, resources), and how a
command line reports them: one line on stderr and an exit code, never a traceback."""

import sys


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""

    exit_code = 2


class Interrupted(ProDistillError):
    """The user stopped the merge (Ctrl-C); the message says how to continue."""

    exit_code = 130


def one_line(exc: BaseException) -> str:
    """Another library's error message, fit to end a one-line ProDistillError."""
    return " ".join(str(exc).split()) or type(exc).__name__


def exit_with(exc: BaseException) -> None:
    """End a command on a user error: its message on stderr, its exit code (2 by default)."""
    print(f"mergekit-prodistill: error: {exc}", file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 2))
