"""Errors that tell bad input from bugs.

Every error a user can cause (a bad config, a hostile or broken file, a missing download, a full disk)
is a :class:`BadInput` (or an ``OSError`` naming its file): `ect` prints it as one line and exits 2.
Anything else is a bug to report: its traceback is printed and `ect` exits 1. Messages never carry
terminal control characters from a file or a name: :func:`printable` escapes them.
"""
from __future__ import annotations


class BadInput(ValueError):
    """Input no run can use: the message says which, in one line."""


def printable(text: str, limit: int = 2000) -> str:
    """One line with every control character (escape sequences, newlines, carriage returns) escaped, as
    Python would write it in a string literal, cut to ``limit`` characters."""
    text = str(text)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit] + "..."
