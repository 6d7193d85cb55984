"""The one error type of bad training data (a module of its own so that every data module can raise it)."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A record that is not valid training data; the message starts with ``file:line:``."""
