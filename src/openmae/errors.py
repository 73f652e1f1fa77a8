"""Errors the CLI prints in one line: the input is wrong (exit code 2), or training diverged (1)."""


class UsageError(ValueError):
    """Bad configuration, data path or argument; raised before a run writes anything, except for
    what only training can find (`engine.loop.UnreadableDataError`: an epoch of unreadable files)."""


class DivergedError(RuntimeError):
    """Training produced non-finite losses or weights (often an lr too high): the run stops."""
