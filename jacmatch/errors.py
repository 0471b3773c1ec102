"""The two kinds of failure: what the user gave cannot be used, or jacmatch has a bug.

:class:`UsageError` is the first kind (an option, a shape, a file, a model that cannot
run): the command line reports it in one line with exit code 2. Every other exception is
the second kind and keeps its traceback (exit code 1). ``UsageError`` is a ``ValueError``,
so code that catches ``ValueError`` around jacmatch's calls keeps working.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Something the user gave cannot be used; the message says what and what to do."""
