"""The one error type that reaches the user as a readable message (exit code 2)."""


class InputError(Exception):
    """A problem with the user's input: a file, a line, a config key or a module.

    The message names what is wrong and how to fix it. The command line prints it
    without a traceback and exits with status 2.
    """


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a run after its checkpoint was saved; the CLI exits 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}; a checkpoint was saved: continue with train.resume=true")
        self.signum = signum
