"""The one exception type hnkit raises for a user's mistake.

The CLI prints its message as a single line and exits with code 2; library users can catch it.
"""

import reprlib


class HnkitError(Exception):
    """Bad input: a file, an option or a model that hnkit cannot use. The message is one line."""


class HnkitWarning(UserWarning):
    """Something the user should know that is not an error (the CLI prints it as one line)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 3


def shown(value) -> str:
    """A value from a file or a request, for a one-line message: cut short (strings, nesting)."""
    return _SHORT.repr(value)
