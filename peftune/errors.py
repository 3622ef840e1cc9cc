"""The one exception type for mistakes a user can fix."""


class PeftuneError(Exception):
    """A user error: the message is one line that names the problem and the fix.

    The CLI prints it without a traceback and exits with code 2. Line breaks that user input brings into the
    message (a key or a value with a newline in it) are shown escaped, so the message stays one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for folding a library error into a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
