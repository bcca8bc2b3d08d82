"""A QRS that falls on a lead boundary with a separator tick is read up to the tick."""

from __future__ import annotations

import numpy as np

from pipeline.calibration import _sample_row
from pipeline.layout import PageLayout, RowGeometry
from pipeline.leads import Layout
from pipeline.traces import RowTrace

PPM = 8.0
THICKNESS = 5.0
X_START = 100.0
BOUNDARY = X_START + 2.5 * 25.0 * PPM  # I -> aVR at 2.5 s


COLS = np.arange(int(X_START), int(X_START + 250 * PPM) + 1)
"""The row's columns, one reading each."""


def _row(y: np.ndarray, read: np.ndarray) -> RowTrace:
    """A row trace at height ``y`` per column of ``COLS``, read where ``read`` is true."""
    return RowTrace(row=0, x0=int(COLS[0]), x=COLS[read].astype(float), y=y[read],
                    col_ok=read, col_conf=read.astype(float), lo=y.astype(int),
                    hi=y.astype(int), path=y.astype(int), thickness=THICKNESS)


def _row_rising_into_the_boundary() -> RowTrace:
    """Flat at y=300, then a steep R upstroke over the last 8 px before the boundary;
    the next lead starts back at the baseline (the tick's columns hold no reading)."""
    y = np.full(COLS.shape, 300.0)
    ramp = (COLS >= BOUNDARY - 8) & (COLS < BOUNDARY)
    y[ramp] = 300.0 - 6.0 * (COLS[ramp] - (BOUNDARY - 8))  # 42 px (5 mm) up
    return _row(y, np.ones(COLS.shape, bool))


def _layout(separators: bool) -> PageLayout:
    row = RowGeometry(0, 300.0, (200, 400), 200.0, ("I", "aVR", "V1", "V4"), 300.0)
    return PageLayout(Layout.THREE_BY_FOUR, [row], X_START, X_START + 250 * PPM, PPM, 25.0,
                      10.0, separators=separators)


def test_the_upstroke_before_a_separator_tick_is_kept() -> None:
    fs = 500
    yq, _ = _sample_row(_row_rising_into_the_boundary(), _layout(True), 10 * fs, fs, 4)
    last_of_i = yq[round(2.5 * fs) - 1]  # 2 ms before the boundary: ~1 px below the top
    assert last_of_i < 300.0 - 30.0  # most of the 42 px stroke, not the flat baseline
    first_of_avr = yq[round(2.5 * fs) + 2]
    assert abs(first_of_avr - 300.0) < 1.0


def _row_read_up_to(last_x: float) -> RowTrace:
    """A flat reading at y=300 from the row's start up to column ``last_x``."""
    return _row(np.full(COLS.shape, 300.0), np.less_equal(COLS, int(last_x)))


def test_a_lead_read_up_to_a_few_pixels_before_its_end_is_continued_to_it() -> None:
    """The last columns of a row often hold no reading (a QRS cut at the row's end, a
    faint pen cap); up to MAX_GAP_S of them are continued, as a gap inside would be."""
    fs = 500
    end = X_START + 250 * PPM
    near, _ = _sample_row(_row_read_up_to(end - 5), _layout(False), 10 * fs, fs, 4)
    assert np.isfinite(near[-3:]).all()
    far, _ = _sample_row(_row_read_up_to(end - 40), _layout(False), 10 * fs, fs, 4)
    assert np.isnan(far[-3:]).all()  # 5 mm short: not invented
