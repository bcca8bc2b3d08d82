"""A narrow spike read at a single column still reaches its tip after resampling."""

from __future__ import annotations

import numpy as np

from pipeline.calibration import spread_ties


def _spike() -> tuple[np.ndarray, np.ndarray]:
    # Baseline at y=100 up to column 10, then up- and down-strokes both read at column 10
    # (one point per pixel row), tip at y=40, then baseline again.
    up = np.arange(99.0, 40.0, -1.0)
    down = np.arange(41.0, 100.0, 1.0)
    xs = np.concatenate([np.arange(0.0, 10.0), np.full(len(up) + len(down), 10.0),
                         np.arange(11.0, 20.0)])
    ys = np.concatenate([np.full(10, 100.0), up, down, np.full(9, 100.0)])
    return xs, ys


def test_points_come_out_strictly_increasing_in_x() -> None:
    x, y = spread_ties(*_spike())
    assert np.all(np.diff(x) > 0)
    assert len(x) == len(y)
    assert x[0] == 0.0 and x[-1] == 19.0


def test_samples_between_columns_see_the_tip() -> None:
    xs, ys = _spike()
    q = np.arange(0.0, 19.0, 0.4)  # 2.5 samples per column, as at 8 px/mm and 25 mm/s
    naive = np.interp(q, xs, ys)
    x, y = spread_ties(xs, ys)
    spread = np.interp(q, x, y)
    # Interpolating over repeated x jumps past the tip; spread points keep most of it.
    assert naive.min() > 90.0
    assert spread.min() < 60.0
    # Away from the spike nothing moves.
    far = np.abs(q - 10.0) > 1.5
    np.testing.assert_allclose(spread[far], 100.0)


def test_single_points_and_increasing_input_are_left_alone() -> None:
    x = np.array([0.0, 1.5, 2.0, 4.0])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    out_x, out_y = spread_ties(x, y)
    np.testing.assert_array_equal(out_x, x)
    np.testing.assert_array_equal(out_y, y)
