"""The error raised for every problem with input data."""


class DataError(ValueError):
    """Input data is missing, unreadable or inconsistent; the one-line message names the file and problem."""
