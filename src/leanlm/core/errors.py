"""One exception type for every user-facing problem.

A `LeanLMError` carries a single line that says what is wrong and what to do about it.
The CLI prints it without a traceback and exits with status 2.
"""


class LeanLMError(Exception):
    """A problem with the user's input or environment, stated in one line with the fix."""
