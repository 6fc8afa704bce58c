"""The base class of every expected failure: the CLI turns it into one line, never a traceback."""


class CldfError(Exception):
    """An expected failure (bad input, bad config, a missing or foreign artifact); its message is one line."""


class PipelineError(CldfError, RuntimeError):
    """A step cannot make a meaningful output from its inputs (e.g. no training slice of a class)."""
