"""A stand-in digitizer for the DICOM delivery tests (``engine: dicom_fake_engine:digitize``).

It exercises the service's DICOM path, not digitization (the real digitizer has its own
tests, and the end-to-end test uses it): a page whose pixels hardly vary holds no ECG and
is refused with the digitizer's reason; any other page gives a 3x4+1 record whose values
are a deterministic function of the picture, so two different scans give two different
waveforms. It reads no ground truth.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import NoGridError
from pipeline.leads import LAYOUTS, LEADS, PAGE_SECONDS, Layout, segment_span
from pipeline.result import Box, Digitization, Metrics


def digitize(image_rgb: np.ndarray, *, fs: int = 500, engine: str = "auto",
             qa: bool = True) -> Digitization:
    if float(image_rgb.std()) < 3.0:
        raise NoGridError("the page is blank")
    n = round(PAGE_SECONDS * fs)
    t = np.arange(n) / fs
    profile = image_rgb.mean(axis=(0, 2))
    rate = 0.8 + (float(profile.mean()) % 1.0)  # beats per second, from the picture
    beat = np.exp(-((((t * rate) % 1.0) - 0.5) / 0.03) ** 2)
    signals = np.stack([(1.2 - 0.1 * i) * beat + 0.002 * (profile[i % profile.size] - 128)
                        for i in range(len(LEADS))], axis=1)
    printed = np.zeros(signals.shape, dtype=bool)
    for row in LAYOUTS[Layout.STANDARD].rows:
        for column, lead in enumerate(row):
            start, end = segment_span(len(row), column)
            printed[round(start * fs):round(end * fs), LEADS.index(lead)] = True
    signals[~printed] = np.nan
    return Digitization(
        signals=signals, fs=float(fs), layout=str(Layout.STANDARD), paper_speed_mm_s=25.0,
        gain_mm_mv=10.0, px_per_mm=8.0, grid_confidence=0.9,
        confidence={lead: 0.8 for lead in LEADS},
        lead_boxes={lead: Box(0.1, 0.1, 0.2, 0.2) for lead in LEADS},
        metrics=Metrics(hr_bpm=round(60 * rate, 1), qrs_ms=96.0, qt_ms=380.0, axis_deg=30.0),
        engine=f"fake-{engine}",
        qa_images={"overlay": image_rgb[:40, :60].copy()} if qa else {},
    )
