"""Errors that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input or usage: the message names the problem and the fix; the CLI exits with code 2."""


class NonFiniteError(UserError):
    """A computation met NaN or infinite values (a damaged input, divergence or float16 overflow)."""


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); the message says what was kept. The CLI exits with code 130."""
