"""Errors the job store raises (the inbound routes map them to protocol statuses), and
which digitizer failures are worth another attempt."""

from __future__ import annotations


class StoreError(Exception):
    """The object could not be stored (database or file system trouble)."""


class StoreFullError(StoreError):
    """Out of disk (ENOSPC, or free space under ``spool_min_free_bytes``): DICOM 0xA700,
    HTTP 507."""


class JobNotFoundError(StoreError, LookupError):
    """No job with that id."""


class JobStateError(StoreError):
    """The operation does not apply to the job in its current state (e.g. retry of a
    running job)."""


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt at digitizing may succeed, decided by the failure's type.

    The picture's fault is final: :class:`~pipeline.errors.NotAnECGError` (and its
    ``NoGridError``), :class:`~pipeline.errors.UnreadableImageError`, and any other
    :class:`~pipeline.errors.DigitizationError` the digitizer raises about the picture (no
    readable layout, no lead). Everything else may pass: the time limit
    (:class:`~pipeline.errors.DigitizationTimeout`), running out of memory, and bugs — the
    latter also when the digitizer wraps them (``raise DigitizationError(...) from exc``).
    A crashed digitizer process never gets here; :mod:`service.digitize_worker` calls it
    transient itself.
    """
    from pipeline.errors import (
        DigitizationError,
        DigitizationTimeout,
        NotAnECGError,
        UnreadableImageError,
    )

    if isinstance(exc, NotAnECGError | UnreadableImageError):
        return False
    if isinstance(exc, DigitizationTimeout):
        return True
    if isinstance(exc, DigitizationError):
        cause = exc.__cause__
        return cause is not None and not isinstance(cause, DigitizationError)
    return True
