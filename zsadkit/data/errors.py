"""Errors raised on bad input data. Each message names the file or folder and what was expected.

All of them are `ValueError`s, so callers that only care about "bad input" can catch that.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "ImageReadError",
    "LayoutError",
    "MaskError",
]


class DataError(ValueError):
    """Base class of every bad-input error of `zsadkit.data`."""


class ImageReadError(DataError):
    """An image or mask file is missing, unreadable or truncated."""


class MaskError(DataError):
    """A mask is missing for an anomalous image, or does not match its image."""


class LayoutError(DataError):
    """A dataset folder does not have the expected layout (unknown layout, empty class, stray files)."""
