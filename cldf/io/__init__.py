"""NIfTI reading and validation, dataset layouts (BraTS, FLARE, synthetic phantom)."""

from cldf.io.errors import DataError

__all__ = ["DataError"]
