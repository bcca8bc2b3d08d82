"""Why a picture could not be digitized: each reason is one exception class.

The service maps them to a DICOM status, an HTTP problem or an OperationOutcome,
and the CLI prints ``str(error)`` as the one-line reason.
"""

from __future__ import annotations


class DigitizationError(Exception):
    """The picture could not be turned into 12 leads; ``str()`` is the reason."""


class NotAnECGError(DigitizationError):
    """The picture holds no ECG at all (no grid, no traces)."""


class NoGridError(NotAnECGError):
    """No ECG paper grid could be found."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("no ECG grid found" + (f": {detail}" if detail else ""))


class UnreadableImageError(DigitizationError):
    """The file is not an image this project can decode."""


class DigitizationTimeout(DigitizationError):
    """The per-image time limit ran out."""
