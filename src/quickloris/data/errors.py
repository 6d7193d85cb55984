"""The one error type of bad training data (its own module so that every reader and converter can raise it)."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A record or file that is not valid training data; the message starts with ``file:line:`` (``file:row N:``
    for Parquet / Arrow rows, ``file:`` for a whole file)."""
