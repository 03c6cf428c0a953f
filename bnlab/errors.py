"""The one exception type for user mistakes.

The CLI turns a ``UsageError`` into a single ``error: ...`` line and exit code 2; anything else
is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input from the user: a config value, a path, a data file."""
