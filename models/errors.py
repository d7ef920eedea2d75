"""The project's error type for user mistakes: bad configs, bad checkpoints."""


class PKMError(Exception):
    """A user-facing error: the message says what was expected, what was found and what exists."""
