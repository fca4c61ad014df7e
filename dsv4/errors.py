"""The one error type users see: a one-line message naming the problem. The CLI prints it and exits non-zero."""


class DSV4Error(Exception):
    """A user-facing error: bad input, missing device or package, corrupt checkpoint, unmet determinism level."""
