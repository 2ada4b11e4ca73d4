"""The one exception type for user mistakes: the CLI prints its message as one line, no traceback."""


class MlaifyError(ValueError):
    """Bad input that the user can fix; the message names the problem and the fix."""
