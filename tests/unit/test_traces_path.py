"""Trace stage: ink separation, the Viterbi path and the sub-pixel centre line."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.traces import (
    RowSpec,
    _Runs,
    _tips,
    erase_creases,
    extract,
    ink_probability,
    trace_thickness,
    viterbi_path,
)

PPM = 8.0
SHIFT = 4


def _draw(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, width: int = 3) -> None:
    pts = np.round(np.stack([xs, ys], axis=1) * (1 << SHIFT)).astype(np.int32)
    cv2.polylines(img, [pts], False, (20, 20, 25), width, cv2.LINE_AA, SHIFT)


def _page(grid: tuple[int, int, int] | None = None, w: int = 900, h: int = 400) -> np.ndarray:
    img = np.full((h, w, 3), 252, np.uint8)
    if grid is not None:
        for k in range(0, max(w, h), int(PPM)):
            t = 2 if k % int(5 * PPM) == 0 else 1
            cv2.line(img, (k, 0), (k, h - 1), grid, t)
            cv2.line(img, (0, k), (w - 1, k), grid, t)
    return img


def _beat_signal(xs: np.ndarray, baseline: float, period: float = 160.0) -> np.ndarray:
    """A baseline with a sharp 60 px R wave every ``period`` px and a slow T wave."""
    phase = np.mod(xs, period)
    r = 60.0 * np.exp(-0.5 * ((phase - 40.0) / 2.2) ** 2)
    t = 12.0 * np.exp(-0.5 * ((phase - 95.0) / 14.0) ** 2)
    return baseline - r - t


def _assert_grid_gone_trace_kept(img: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                                 grid_below: int, grid_share: float) -> None:
    """Under ``grid_share`` of the grid pixels (darker than ``grid_below``, away from the
    trace) read as ink, and over 90 % of the trace's centre line."""
    prob = ink_probability(img, PPM)
    trace = np.zeros(img.shape[:2], np.uint8)
    _draw(trace, xs, ys, 1)
    grid_only = (trace == 0) & (img[..., 0] < grid_below)
    grid_only &= cv2.dilate(trace, np.ones((7, 7), np.uint8)) == 0
    assert float(np.mean(prob[grid_only] > 0.5)) < grid_share
    assert float(np.mean(prob[trace > 0] > 0.5)) > 0.9


def test_a_black_grid_is_removed_but_the_trace_across_it_is_kept() -> None:
    """A binarized (fax-like) print: major lines as black as the trace hide what lies
    under them, so the trace is kept across a line only where it is inked on both sides."""
    img = np.full((400, 900, 3), 255, np.uint8)
    for k in range(0, 900, int(5 * PPM)):
        cv2.line(img, (k, 0), (k, 399), (0, 0, 0), 2)
        if k < 400:
            cv2.line(img, (0, k), (899, k), (0, 0, 0), 2)
    xs = np.arange(20, 880, 0.25)
    _draw(img, xs, _beat_signal(xs, 210.0))
    img = np.where(img < 128, 0, 255).astype(np.uint8)
    _assert_grid_gone_trace_kept(img, xs, _beat_signal(xs, 210.0), 128, 0.05)


def test_the_lines_at_a_black_grids_edge_are_removed_too() -> None:
    """The outermost lines of a grid have blank margin, not lines, on their outer side;
    they are grid all the same (read as ink, they lengthen the rows beside them)."""
    margin, step = 240, int(5 * PPM)
    img = np.full((880, 1300, 3), 255, np.uint8)
    for k in range(margin, 1300 - margin + 1, step):
        cv2.line(img, (k, margin), (k, 880 - margin), (0, 0, 0), 2)
    for k in range(margin, 880 - margin + 1, step):
        cv2.line(img, (margin, k), (1300 - margin, k), (0, 0, 0), 2)
    xs = np.arange(margin + 20, 1300 - margin - 20, 0.25)
    _draw(img, xs, _beat_signal(xs, 450.0))
    img = np.where(img < 128, 0, 255).astype(np.uint8)
    _assert_grid_gone_trace_kept(img, xs, _beat_signal(xs, 450.0), 128, 0.05)


def test_viterbi_prefers_continuity_over_a_shortcut() -> None:
    cost = np.ones((30, 50), np.float32)
    cost[:, 10] = 0.0  # a line at y=10 all along
    cost[12:18, 40] = 0.0  # a stray blob far away
    path = viterbi_path(cost)
    assert (path == 10).all()


def test_grey_grid_is_removed_but_the_trace_over_it_is_kept() -> None:
    img = _page(grid=(160, 160, 160))
    xs = np.arange(20, 880, 0.25)
    _draw(img, xs, _beat_signal(xs, 200.0))
    _assert_grid_gone_trace_kept(img, xs, _beat_signal(xs, 200.0), 200, 0.02)


def test_centre_line_and_qrs_tips_are_recovered() -> None:
    img = _page(grid=(240, 170, 170))
    xs = np.arange(20, 880, 0.1)
    ys = _beat_signal(xs, 220.0)
    _draw(img, xs, ys)
    prob = ink_probability(img, PPM)
    row = RowSpec(baseline=220.0, band=(60, 360), xs=(30, 870), pitch=160.0)
    (got,) = extract(prob, [row], PPM, trace_thickness(prob, PPM))
    y = np.interp(xs, got.x, got.y)
    inside = (xs > 40) & (xs < 860)
    err = np.abs(y - ys)[inside]
    # away from the R waves (tips are checked below)
    flat = (np.abs(np.mod(xs, 160.0) - 40.0) > 12.0)[inside]
    assert float(np.sqrt(np.mean(err[flat] ** 2))) < 0.35
    # every R tip (60 px tall) is reached to within a pixel and a half
    for k in range(5):
        tip = 20 + 40.0 + 160.0 * k + (160 - 20 % 160) % 160
        near = (got.x > tip - 6) & (got.x < tip + 6)
        if near.any():
            assert got.y[near].min() < _beat_signal(np.array([tip]), 220.0)[0] + 1.5


def test_a_neighbour_rows_spike_does_not_capture_the_path() -> None:
    img = _page(h=420)
    xs = np.arange(20, 880, 0.1)
    upper = 120.0 + 110.0 * np.exp(-0.5 * ((np.mod(xs, 200.0) - 100.0) / 2.5) ** 2)
    lower = 260.0 + 4.0 * np.sin(xs / 40.0)
    _draw(img, xs, upper)
    _draw(img, xs, lower)
    prob = ink_probability(img, PPM)
    rows = [RowSpec(120.0, (0, 255), (30, 870), 140.0),
            RowSpec(260.0, (125, 400), (30, 870), 140.0)]
    got = extract(prob, rows, PPM)
    y = np.interp(xs, got[1].x, got[1].y)
    inside = (xs > 40) & (xs < 860)
    off = np.abs(y - lower)[inside]
    assert float(np.mean(off > 3.0)) < 0.03
    # the upper row keeps its spike, which reaches 30 px from the lower baseline
    assert float(got[0].y.max()) > 225.0


def _three_rows(img: np.ndarray, xs: np.ndarray) -> list[np.ndarray]:
    ys = [_beat_signal(xs, base) for base in (130.0, 260.0, 390.0)]
    for y in ys:
        _draw(img, xs, y)
    return ys


def test_a_crease_across_the_rows_is_not_read_as_a_qrs() -> None:
    img = _page(h=460)
    xs = np.arange(20, 880, 0.1)
    truth = _three_rows(img, xs)
    cv2.line(img, (600, 0), (606, 459), (150, 150, 150), 2, cv2.LINE_AA)  # fold, grey
    prob = ink_probability(img, PPM)
    rows = [RowSpec(b, (max(0, int(b) - 120), min(460, int(b) + 120)), (30, 870), 130.0)
            for b in (130.0, 260.0, 390.0)]
    got = extract(prob, rows, PPM)
    near = (xs > 585) & (xs < 620)  # between beats
    for trace, want in zip(got, truth, strict=True):
        y = np.interp(xs[near], trace.x, trace.y)
        assert float(np.max(np.abs(y - want[near]))) < 3.0


def test_crease_eraser_keeps_strokes_grid_lines_and_short_lines() -> None:
    prob = np.zeros((460, 900), np.float32)
    prob[200:320, 100:102] = 1.0  # a QRS-long vertical stroke: kept
    for x in range(300, 900, 40):  # periodic 5 mm grid lines: left to the grid stage
        prob[:, x] = 0.5
    prob[:, 640:642] = 0.45  # an isolated line across every row, off the grid: erased
    out = erase_creases(prob, PPM, 0, 460)
    assert (out[200:320, 100:102] == 1.0).all()
    assert (out[:, 300] == 0.5).all()
    assert float(out[:, 640:642].max()) == 0.0


def test_an_r_and_an_s_tip_on_one_column_are_both_kept() -> None:
    """A narrow RS complex drawn with a wide pen: the R's and the S's tips share the
    same columns, and the trace must reach both, not only the larger one."""
    img = _page(h=400)
    xs = np.array([20.0, 297.2, 300.2, 300.6, 303.6, 880.0])
    ys = np.array([200.0, 200.0, 130.0, 290.0, 200.0, 200.0])  # R 70 px up, S 90 px down
    _draw(img, xs, ys, 3)
    prob = ink_probability(img, PPM)
    got = extract(prob, [RowSpec(200.0, (0, 400), (30, 870), 200.0)], PPM)[0]
    near = (got.x > 290) & (got.x < 310)
    assert float(got.y[near].min()) < 136.0
    assert float(got.y[near].max()) > 284.0


def _deep_s_wave(level: float, break_every: int | None, x0: int, x1: int) -> np.ndarray:
    """A baseline at y=200 with an S wave 130 px deep between ``x0`` and ``x1``, drawn at
    probability ``level`` and broken every ``break_every`` pixel rows."""
    prob = np.zeros((420, 900), np.float32)
    cv2.line(prob, (20, 200), (x0, 200), 1.0, 3)
    cv2.line(prob, (x1, 200), (880, 200), 1.0, 3)
    mid = (x0 + x1) // 2
    stroke = np.zeros_like(prob)
    pts = np.array([[x0, 200], [mid - 1, 330], [mid + 1, 330], [x1, 200]], np.int32)
    cv2.polylines(stroke, [pts], False, level, 3)
    if break_every:
        stroke[np.arange(420) % break_every == 0, :] = 0.0
    return np.maximum(prob, stroke)


def test_a_broken_s_wave_is_followed_down() -> None:
    """A deep S wave whose stroke is broken every few pixel rows (a phone photo's thin
    pen) costs less to follow down and back than the blank columns under it."""
    prob = _deep_s_wave(1.0, 7, 294, 308)
    got = extract(prob, [RowSpec(200.0, (0, 420), (30, 870), 200.0)], PPM, thickness=3.0)[0]
    near = (got.x > 290) & (got.x < 316)
    assert float(got.y[near].max()) > 290.0  # cutting across reaches 250 only


def test_a_faint_deep_s_wave_is_not_passed_under() -> None:
    """Following a faint S wave 130 px down and back costs more ink than the blank columns
    under it; the extra cost of a blank column keeps the path on the wave."""
    prob = _deep_s_wave(0.25, None, 290, 312)
    got = extract(prob, [RowSpec(200.0, (0, 420), (30, 870), 200.0)], PPM, thickness=3.0)[0]
    assert int(got.path[300 - got.x0]) > 290  # the path goes down the wave


def test_a_print_that_stops_short_is_not_continued_on_a_border() -> None:
    """The trace stops 15 mm before the row's end; a line 20 mm below (a grid border)
    joined by a vertical line must not be read as the rest of the row."""
    img = _page(h=420)
    xs = np.arange(20, 760, 0.1)
    _draw(img, xs, _beat_signal(xs, 200.0))
    cv2.line(img, (20, 360), (880, 360), (20, 20, 25), 2)  # the border
    cv2.line(img, (780, 200), (780, 360), (20, 20, 25), 1)  # a line down to it
    prob = ink_probability(img, PPM)
    row = RowSpec(baseline=200.0, band=(40, 400), xs=(30, 880), pitch=160.0)
    (got,) = extract(prob, [row], PPM)
    assert float(got.x.max()) < 790.0
    assert float(got.y.max()) < 260.0
    tail = got.columns >= 790
    assert not got.col_ok[tail].any()
    # the trace itself is kept (the path may leave it a little early), R waves and all
    assert float(got.x.min()) < 35.0 and float(got.x.max()) > 700.0
    assert float(got.y.min()) < 145.0


def test_the_round_bottom_of_a_wide_s_trough_is_a_tip() -> None:
    """Column runs read off a blurred scan at the bottom of a wide S trough (synthetic
    scan 19): the lowest column's run is under two pens long and its lower edge ties
    with the next column's. It must still be a downward tip, or the stroke from the R
    tip is cut straight across to the trough's far side."""
    lo = np.array([226.3, 235.1, 241.2, 246.8, 245.2, 240.9, 235.1, 229.1])
    hi = np.array([250.1, 252.3, 252.74, 252.75, 252.75, 252.4, 250.9, 248.1])
    n = lo.size
    runs = _Runs(lo=lo.astype(int), hi=hi.astype(int), lo_edge=lo, hi_edge=hi,
                 centre=(lo + hi) / 2, conf=np.ones(n), ok=np.ones(n, bool))
    up, down, _ = _tips(runs, thickness=3.5)
    assert down[3:5].any()
    assert not up.any()


def test_a_thick_pens_narrow_trough_is_a_downward_tip() -> None:
    """Column runs of a narrow Q-S trough drawn with a 4 px pen (synthetic scan 35): the
    down and up strokes merge into one blob, whose top (the notch between the strokes)
    ties across three columns. The middle one is the trough's tip, not an R's: judged
    from the columns inside the blob it looked like one, and the down stroke was cut
    straight across the trough."""
    lo = np.array([259.8, 259.8, 260.3, 261.2, 262.9, 271.3, 271.2, 271.2, 260.3, 252.7,
                   250.8, 250.3, 250.3, 250.7, 253.1, 259.5])
    hi = np.array([266.0, 272.9, 291.1, 314.8, 323.9, 325.8, 326.3, 326.3, 325.9, 317.9,
                   291.1, 273.7, 265.8, 266.0, 267.9, 268.9])
    centre = np.array([262.9, 265.7, 274.1, 285.6, 293.0, 299.3, 300.0, 299.9, 294.1, 284.3,
                       269.7, 261.2, 257.8, 258.3, 260.6, 264.2])
    n = lo.size
    runs = _Runs(lo=lo.astype(int), hi=hi.astype(int), lo_edge=lo, hi_edge=hi,
                 centre=centre, conf=np.ones(n), ok=np.ones(n, bool))
    up, down, _ = _tips(runs, thickness=4.0)
    assert not up[4:9].any()
    assert down[6]
