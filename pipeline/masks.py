"""Runs of true values in 1-D masks and small blobs in 2-D ones: how every stage finds
its strokes, gaps and printed stretches, and drops specks and grid dots, written once."""

from __future__ import annotations

import cv2
import numpy as np


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` index ranges of the runs where ``mask`` is true."""
    d = np.diff(np.concatenate(([0], np.asarray(mask).astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(),
                    strict=True))


def small_blobs(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Pixels of the 8-connected blobs of ``mask`` at most ``max_px`` wide and high."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                           connectivity=8)
    small = ((stats[:, cv2.CC_STAT_WIDTH] <= max_px)
             & (stats[:, cv2.CC_STAT_HEIGHT] <= max_px))
    small[0] = False  # the background
    out: np.ndarray = small[labels]
    return out
