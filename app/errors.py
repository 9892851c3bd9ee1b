"""The one exception type that the CLI turns into a one-line message and exit code 1."""


class DjinnsimError(Exception):
    """Bad input or an unusable file: the message names the problem in one line."""
