"""The error raised for every problem with input data."""

from cldf.errors import CldfError


class DataError(CldfError, ValueError):
    """Input data is missing, unreadable or inconsistent; the one-line message names the file and problem."""
