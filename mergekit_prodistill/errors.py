"""The one exception type for problems a user can fix (recipe, inputs, resources)."""


class ProDistillError(ValueError):
    """A user-facing error: its message says what is wrong and where."""
