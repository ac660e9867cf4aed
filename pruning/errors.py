"""The one exception type for a user's mistake.

A ``UserError`` carries a single line that names the problem and the fix. The CLI prints it to
stderr and exits with status 2, without a stack trace; everything else is a bug and keeps its trace.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and how to fix it, on one line."""
