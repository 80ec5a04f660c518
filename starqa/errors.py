"""Errors that starqa reports to the user as one line, with the exit code to use.

Anything else that escapes is a bug: the CLI shows it as one line too, with a hint to rerun with --debug.
"""


class StarqaError(Exception):
    """A failure the user can act on (bad file, damaged cache, ...): exit code 1."""

    exit_code = 1


class UsageError(StarqaError):
    """The command line or config asked for something impossible: exit code 2."""

    exit_code = 2
