"""The one exception type for bad user input.

Anything raised as `EmberError` is the user's to fix: the CLI prints its message on one line and exits
with code 2, the server answers 4xx. Everything else is a bug and keeps its traceback.
"""


class EmberError(ValueError):
    """Bad input: a message that names the value and what is allowed."""
