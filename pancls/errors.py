"""The one exception type for a user's mistakes.

Anything raised as :class:`UserError` is a problem with the input (a file, an argument, a config
value): the CLI prints its message on one line and exits with status 2. Every other exception is a
bug in pancls and keeps its traceback.
"""
from __future__ import annotations

import os


class UserError(Exception):
    """A problem with the user's input, reported as one line: ``<where>: <reason>``.

    Parameters
    ----------
    reason : str
        What is wrong, in words a user can act on.
    where : str or os.PathLike, optional
        The file, argument or config key the problem is in.
    """

    def __init__(self, reason: str, where: str | os.PathLike | None = None):
        self.reason = str(reason)
        self.where = None if where is None else os.fspath(where)
        super().__init__(f"{self.where}: {self.reason}" if self.where else self.reason)
