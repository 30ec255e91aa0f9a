"""Errors the CLI turns into a one-line message: exit 2 for bad input, 1 for a stopped or
failed run, 130 for Ctrl-C."""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the run is stopped and marked FAILED."""


class RunStopped(RuntimeError):
    """The run could not go on (its results directory became unwritable, the disk filled up);
    the message says what is kept and how to continue."""


class PeerLost(RuntimeError):
    """Another rank of a distributed run failed (or the launcher stopped this one): the run is
    marked FAILED and can be resumed from its last checkpoint."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying what was kept and how to continue."""
