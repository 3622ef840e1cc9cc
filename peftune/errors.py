"""The one exception type for mistakes a user can fix."""


class PeftuneError(Exception):
    """A user error: the message is one line that names the problem and the fix.

    The CLI prints it without a traceback and exits with code 2.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for folding a library error into a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
