"""Errors that starqa reports to the user as one line, with the exit code to use.

Anything else that escapes is a bug: the CLI shows it as one line too, with a hint to rerun with --debug.
"""


class StarqaError(Exception):
    """A failure the user can act on (bad file, damaged cache, ...): exit code 1."""

    exit_code = 1


class UsageError(StarqaError):
    """The command line or config asked for something impossible: exit code 2."""

    exit_code = 2


class Interrupted(StarqaError):
    """Stopped by Ctrl-C or SIGTERM after keeping what was done (e.g. eval's partial report): exit code 130."""

    exit_code = 130


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (libraries' messages span lines, tracebacks and tables), cut at `limit`."""
    message = " ".join(str(error).split()) or type(error).__name__
    if limit is not None and len(message) > limit:
        message = message[: limit - 3] + "..."
    return message


def describe(error: BaseException) -> str:
    """One line for a user: our errors as they are, anything else (a bug, a library's CUDA OOM) with its class."""
    if isinstance(error, StarqaError):
        return one_line(error)
    return f"{error.__class__.__name__}: {one_line(error)}"
