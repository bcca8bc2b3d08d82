"""Light and colour: flatten uneven illumination and white-balance against the paper.

The paper is the brightest thing on an ECG page almost everywhere (ink, grid and text are
thin and darker), so a wide maximum filter followed by smoothing estimates the light that
fell on blank paper.  Dividing each channel by its own estimate removes shading, shadows
and folds *and* the colour cast in one step: the paper turns white, while the grid keeps its
hue relative to the paper.
"""

from __future__ import annotations

import cv2
import numpy as np

BACKGROUND_MM = 4.0
"""Width of the maximum filter: wider than any trace, text stroke or grid line."""
BACKGROUND_PX_PER_MM = 1.0
"""The light field is smooth, so it is estimated on a 1 px/mm copy."""


def paper_background(rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Per-channel light on blank paper (uint8, same size as ``rgb``)."""
    h, w = rgb.shape[:2]
    s = min(1.0, BACKGROUND_PX_PER_MM / px_per_mm)
    small = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA)
    k = max(3, round(BACKGROUND_MM * px_per_mm * s) | 1)
    bg = cv2.dilate(small, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    bg = cv2.GaussianBlur(bg, (0, 0), k)
    return cv2.resize(np.maximum(bg, 8), (w, h), interpolation=cv2.INTER_LINEAR)


def normalize(rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Flat-field and white-balance ``rgb`` (uint8) so that blank paper is white."""
    out: np.ndarray = cv2.divide(rgb, paper_background(rgb, px_per_mm), scale=255.0)
    return out
