"""The one exception type users see: it carries a message that says what to do."""


class AlignkitError(Exception):
    """A problem the user can fix (bad input, missing file, offline hub).

    The CLI prints the message without a traceback and exits with code 2.
    """
