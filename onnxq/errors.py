"""The one error type users see: a single line naming the problem and the fix."""


class OnnxqError(Exception):
    """A user-facing failure; `str(err)` is one line with the problem and how to fix it."""
