"""The one error type that reaches the user as a readable message (exit code 2)."""


class InputError(Exception):
    """A problem with the user's input: a file, a line, a config key or a module.

    The message names what is wrong and how to fix it. The command line prints it
    without a traceback and exits with status 2.
    """
