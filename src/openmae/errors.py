"""Errors that mean "the input is wrong" (the CLI prints them in one line and exits with 2)."""


class UsageError(ValueError):
    """Bad configuration, data path or argument; raised before a run writes anything, except for
    what only training can find (`engine.loop.UnreadableDataError`: an epoch of unreadable files)."""
