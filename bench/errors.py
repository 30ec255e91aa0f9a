"""Errors the CLI turns into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run is stopped and marked FAILED."""
