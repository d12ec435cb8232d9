"""Errors a user can cause.  The CLI prints a UsageError as one line and exits 2; bugs stay tracebacks."""


class UsageError(Exception):
    """A bad value from the user: the message names it and says what would be accepted."""
