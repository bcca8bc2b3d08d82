"""Stage 6: pictures a person checks a digitization with (the seed API's ``steps``).

* ``overlay``: the rectified page, lightened, with every extracted lead drawn over its
  printing in its own colour; where the colour leaves the ink, the reading is wrong.
* ``boxes``: each lead's cell on the page, named, with the calibration pulses found.
* ``plot``: the 12 digitized leads redrawn on ECG paper (25 mm/s, 10 mm/mV), one strip
  per lead over the whole record, blank where the page did not print the lead.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.layout import PageLayout
from pipeline.leads import LEAD_INDEX, LEADS
from pipeline.masks import runs
from pipeline.traces import RowTrace

LEAD_COLORS: dict[str, tuple[int, int, int]] = dict(zip(LEADS, [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 190, 190), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40),
    (128, 0, 0), (0, 100, 0),
], strict=True))
"""RGB per lead, distinct on pink, green and grey paper."""
PLOT_PX_PER_MM = 4.0
PLOT_ROW_MM = 20.0
PLOT_SPEED_MM_S = 25.0
PLOT_GAIN_MM_MV = 10.0
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _lighten(image: np.ndarray) -> np.ndarray:
    return (0.45 * image.astype(np.float32) + 0.55 * 255).astype(np.uint8)


def overlay(image: np.ndarray, layout: PageLayout, traces: list[RowTrace]) -> np.ndarray:
    """The rectified page with each lead's extracted trace drawn in its colour."""
    out = _lighten(image)
    thick = max(1, round(layout.px_per_mm * 0.25))
    for trace, row in zip(traces, layout.rows, strict=True):
        k = len(row.leads)
        span = (layout.x_end - layout.x_start) / k
        for c, lead in enumerate(row.leads):
            x0 = layout.x_start + c * span
            sel = (trace.x >= x0) & (trace.x < x0 + span) & np.isfinite(trace.y)
            if sel.sum() < 2:
                continue
            pts = np.stack([trace.x[sel], trace.y[sel]], axis=1)
            cv2.polylines(out, [np.round(pts * 4).astype(np.int32)], False, LEAD_COLORS[lead],
                          thick, cv2.LINE_AA, shift=2)
    return out


def boxes(image: np.ndarray, layout: PageLayout) -> np.ndarray:
    """Each lead's cell, outlined and named, and the calibration pulses."""
    out = _lighten(image)
    ppm = layout.px_per_mm
    scale = max(0.4, ppm / 8.0)
    for r, row in enumerate(layout.rows):
        for c, lead in enumerate(row.leads):
            x0, y0, x1, y1 = (round(v) for v in layout.segment_box(r, c))
            color = LEAD_COLORS[lead]
            cv2.rectangle(out, (x0, y0), (x1, y1), color, max(1, round(ppm / 5)))
            cv2.putText(out, lead, (x0 + round(2 * ppm), y0 + round(5 * ppm)), _FONT, scale,
                        color, max(1, round(ppm / 5)), cv2.LINE_AA)
    for p in layout.pulses:
        cv2.rectangle(out, (round(p.x0), round(p.y_top)), (round(p.x1), round(p.y_base)),
                      (0, 0, 0), max(1, round(ppm / 5)))
    return out


def _paper(width: int, height: int, ppm: float) -> np.ndarray:
    img = np.full((height, width, 3), (255, 246, 246), np.uint8)
    for mm in range(int(max(width, height) / ppm) + 1):
        color = (240, 160, 160) if mm % 5 == 0 else (250, 215, 215)
        p = round(mm * ppm)
        if p < width:
            img[:, p] = color
        if p < height:
            img[p, :] = color
    return img


def plot(signals: np.ndarray, fs: float) -> np.ndarray:
    """The 12 leads on ECG paper, one strip each, at 25 mm/s and 10 mm/mV."""
    ppm = PLOT_PX_PER_MM
    seconds = signals.shape[0] / fs
    label_mm = 12.0
    width = round((label_mm + seconds * PLOT_SPEED_MM_S + 5.0) * ppm)
    height = round((len(LEADS) * PLOT_ROW_MM + 5.0) * ppm)
    img = _paper(width, height, ppm)
    t = np.arange(signals.shape[0]) / fs
    xs = (label_mm + t * PLOT_SPEED_MM_S) * ppm
    for lead in LEADS:
        j = LEAD_INDEX[lead]
        base = (j + 0.6) * PLOT_ROW_MM * ppm
        cv2.putText(img, lead, (round(1.5 * ppm), round(base)), _FONT, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
        y = base - signals[:, j] * PLOT_GAIN_MM_MV * ppm
        ok = np.isfinite(y)
        for a, b in runs(ok):
            if b - a < 2:
                continue
            pts = np.stack([xs[a:b], np.clip(y[a:b], 0, height - 1)], axis=1)
            cv2.polylines(img, [np.round(pts * 4).astype(np.int32)], False, (20, 20, 30), 1,
                          cv2.LINE_AA, shift=2)
    return img


def qa_images(image: np.ndarray, layout: PageLayout, traces: list[RowTrace],
              signals: np.ndarray, fs: float) -> dict[str, np.ndarray]:
    """``overlay``, ``boxes`` and ``plot`` for one digitization."""
    return {
        "overlay": overlay(image, layout, traces),
        "boxes": boxes(image, layout),
        "plot": plot(signals, fs),
    }
