"""Stage 4: separate the trace ink from the grid and follow each row's trace.

The seam between engines is the **trace-probability map**: an (H, W) float32 array in
[0, 1] over the rectified page saying how likely each pixel is printed trace ink. The
classic engine computes it from colour and morphology (:func:`ink_probability`); a
learned engine (``pipeline.models``) predicts it with a network. Everything downstream
(rows, pulses, the path search, sub-pixel centres, calibration) reads only this map, so
an engine swaps in by handing its own map to the same calls::

    prob = model.predict(rect.image, rect.px_per_mm)      # or ink_probability(...)
    page = layout.detect_layout(prob, ppm, trace_thickness(prob, ppm))
    rows = extract(prob, page.row_specs(), ppm)            # list[RowTrace]

Each row's trace is found by a global path search (Viterbi over columns, all rows in
one pass). A step from column ``x-1`` at height ``y1`` to column ``x`` at ``y2`` costs
the *non-ink* along the vertical run ``(y1, y2]`` of column ``x`` plus a small
``SLOPE_COST`` per pixel, so a steep QRS stroke that is inked all the way is cheap (a
pixel inside an ink run, weak or in a short break, costs at most ``RUN_COST``), a
jump across blank paper is dear, and a thin diagonal line costs nothing; each column the
path spends on blank paper costs ``BLANK_COLUMN_COST`` more, so it does not pass under a
narrow, deep wave. The minimum over
all ``y1`` of that run cost is a 1-D distance transform, computed in O(H) per column with
two running minima. Bands reach to the neighbour rows' baselines so a tall R wave is
followed; a first pass with half-way bands tells each row which ink its neighbours own.
Before the search, straight lines crossing the rows (a crease, a scanner streak) are
erased (:func:`erase_creases`).

The path only picks which ink run of each column is the row's. The centre line is then
read with sub-pixel precision: a column's run centroid on gentle stretches (the centre
line for any slope), and, on QRS complexes, row by row across each stroke between tips,
with tips at the extreme edge moved in by half the pen (see :func:`_steep_points`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np
from scipy.ndimage import maximum_filter1d

from pipeline.errors import DigitizationError
from pipeline.masks import runs

INK_LEVEL = 0.5
"""Probability above which a pixel counts as ink for runs and extents."""
INK_LO, INK_HI = 0.2, 0.55
"""Darkness, as shares of the page's ink darkness, mapped to probability 0 and 1."""
RUN_LEVEL = 0.2
"""Weaker ink that still extends a run the path touches (thin, faint QRS strokes)."""
RUN_GAP_PX = 3
"""Vertical closing length: a column's ink broken for up to 2 px (a faint, thin QRS
stroke on a phone photo) is still one run."""
PATH_FULL_INK = 0.4
"""Probability from which the path search treats a pixel as fully inked: a thin, faint
QRS stroke costs no more to climb than a bold one, so the path does not cut the spike."""
RUN_COST = 0.2
"""Path cost, at most, of a pixel inside an ink run (weak ink and the short breaks the
run closes): a faint, broken S stroke on a photo is cheaper to follow down and back
than cutting across the few blank columns under its tip."""
BLANK_COLUMN_COST = 4.0
"""Extra cost, per column, of the path lying on blank paper (a share of it on weak ink):
passing under a narrow, deep S or R wave must cost more than following its strokes down
and back, whose breaks and faint pixels add up over their height."""
SLOPE_COST = 0.001
"""Cost per pixel of vertical movement, on top of the non-ink along the run."""
BASELINE_PULL = 0.15
"""Cost per column for lying a whole row pitch away from the row's baseline."""
OTHER_ROW_COST = 0.85
"""Ink explained by a neighbour row's path is treated as this much non-ink."""
PAD_COST = 1e3
"""Cost of the padding rows when bands of different heights are stacked."""
TIP_RUN_PENS = 1.5
"""A tip's column holds a run at least this many pens long (a trough's rounded bottom
is little more than one pen; a flat line's bump is less)."""
RUNOFF_MM = 8.0
"""A row-end stretch this far from the baseline, entered in a jump, is run-off."""
RUNOFF_MIN_MM = 2.5
"""Shortest run-off (0.1 s at 25 mm/s): a row ending mid-QRS is shorter."""
RUNOFF_STEP_PX = 3
"""Columns over which the path must make half that move to count as a jump off the trace."""
GRID_PERCENTILE = 20.0
"""Row/column percentile taken as grid (not ink) darkness; a trace covers far less."""
OPEN_MIN_PEN_PX = 3.0
"""Pen width (px) from which one-pixel grid remnants are opened away."""
GRID_LEFT_SHARE = 0.1
"""More of the page than this reading as ink means grid remnants (a fax-like scan)."""
GRID_WINDOW_MM = 3.0
"""Length of the stretches of a grid line whose darkness is read at once."""
PERIODIC_PERCENTILE = 30.0
"""Percentile of the same-phase samples (six 5 mm periods either way) read as the grid."""
PERIODIC_MIN_SAMPLES = 4
"""Same-phase samples on the grid (the pixel's own included) needed to show a grid line:
two strokes 5 mm apart (a 0.2 s calibration pulse at 25 mm/s) do not make one."""
GRID_EDGE_DARKNESS = 0.06
"""Darkness below which the same-phase samples from there outward are off the grid."""
GRID_PERIOD_MM = 5.0
"""Major grid pitch: the line pattern repeats with it."""
OPAQUE_GRID = 0.8
"""Grid-line darkness from which the line hides what is printed under it."""
OPAQUE_REACH_MM = 0.6
"""Farthest a pixel off an opaque line is looked for across it (the line as read is a
pixel wider each side than printed)."""
LINE_PX_PER_MM = 2.0
"""Resolution at which long straight lines (creases, scanner streaks) are looked for."""
LINE_MIN_MM = 40.0
"""Shortest straight piece of ink taken as part of a line: longer than any QRS stroke."""
LINE_MAX_TILT_DEG = 10.0
"""Lines further than this from vertical are not creases across the rows."""
LINE_SPAN_SHARE = 0.7
"""Share of the rows' height a line must cross to be erased: a crease or streak crosses
the whole sheet, while QRS strokes of touching rows chain over two rows at most."""
LINE_GRID_TOL = 0.12
"""A line this close (share of 5 mm) to a whole number of 5 mm periods from another
line is a grid line, left to the grid division."""
LINE_STROKE_MM = 0.6
"""Vertical extent from which ink near a line counts as the line (a trace crossing it
horizontally is thinner and is kept)."""


@dataclass
class RowTrace:
    """The trace of one printed row on the rectified page.

    ``x``/``y`` are points of the trace's centre line in time order (``x`` increasing,
    sub-pixel, rectified px): one per column on gentle stretches, one per pixel row on
    steep QRS strokes. Per column from ``x0``: ``col_ok`` (the column holds this row's
    ink), ``col_conf`` (mean ink probability along the path), ``lo``/``hi`` (the ink run
    taken as this row's), ``path`` (the Viterbi path). ``thickness`` is the pen width (px).
    """

    row: int
    x0: int
    x: np.ndarray
    y: np.ndarray
    col_ok: np.ndarray
    col_conf: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    path: np.ndarray
    thickness: float

    @property
    def columns(self) -> np.ndarray:
        return self.x0 + np.arange(self.col_ok.shape[0])


def _periodic_floor(profile: np.ndarray, period: float, reach: int = 6) -> np.ndarray:
    """Low percentile of ``profile`` (n, m), along axis 0, over the same grid phase
    ``-reach..reach`` periods away.

    Grid lines repeat every 5 mm, so every sample at a line's phase shows the line; a
    flat trace, a pulse stroke or a QRS falls on a few of them only and drops out. A local
    window (13 periods) tolerates a slight error in the pitch. Samples beyond the grid's
    edge (blank from there outward) are not counted: the lines nearest the edge have
    margin, not lines, on their outer side.
    """
    n = profile.shape[0]
    idx = np.arange(n, dtype=np.float64)
    sides = []
    for ks in (range(1, reach + 1), range(-1, -reach - 1, -1)):
        samples = []
        for k in ks:
            pos = idx + k * period
            ok = (pos >= 0) & (pos <= n - 1)
            lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
            hi = np.clip(lo + 1, 0, n - 1)
            f = (pos - lo)[:, None]
            v = (1.0 - f) * profile[lo] + f * profile[hi]
            v[~ok] = 0.0
            samples.append(v)
        side = np.stack(samples)  # nearest first
        beyond = np.maximum.accumulate(side[::-1], axis=0)[::-1] < GRID_EDGE_DARKNESS
        sides.append(np.where(beyond, np.nan, side))
    stack = np.sort(np.concatenate([profile[None], *sides]), axis=0)  # NaN sort last
    count = np.isfinite(stack).sum(axis=0)
    k = np.floor(PERIODIC_PERCENTILE / 100.0 * (count - 1)).astype(np.int64)
    low = np.take_along_axis(stack, k[None], axis=0)[0]
    return np.where(count >= PERIODIC_MIN_SAMPLES, low, 0.0)


def _window_percentile(d: np.ndarray, win: int, q: float) -> np.ndarray:
    """Percentile ``q`` of each row of ``d`` over windows of ``win`` columns -> (H, W//win)."""
    h, w = d.shape
    n = max(1, w // win)
    blocks = d[:, : n * win].reshape(h, n, win)
    k = round(q / 100.0 * (win - 1))
    return np.partition(blocks, k, axis=2)[:, :, k]


def _line_darkness(d: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Darkness (H, W) of the horizontal grid lines: a low percentile along each row in
    5 mm windows (local, so a slightly curved line still lines up), limited by the same
    figure one and more 5 mm periods above and below (a flat trace filling a window is
    not repeated there, a grid line is)."""
    w = d.shape[1]
    win = max(8, round(GRID_WINDOW_MM * px_per_mm))
    # a line that wanders by a pixel over the window still fills the middle row
    prof = _window_percentile(maximum_filter1d(d, size=3, axis=0), win, GRID_PERCENTILE)
    per = _periodic_floor(prof, GRID_PERIOD_MM * px_per_mm)
    prof = np.minimum(prof, per)
    cols = np.minimum(np.arange(w) // win, prof.shape[1] - 1)
    return prof[:, cols]


def _grid_darkness(d: np.ndarray, px_per_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel darkness (H, W) of the axis-aligned grid's horizontal and vertical line
    families, each read by :func:`_line_darkness`."""
    rows = _line_darkness(d, px_per_mm)
    cols = _line_darkness(np.ascontiguousarray(d.T), px_per_mm).T
    return rows, cols


def _across_opaque_lines(d: np.ndarray, line: np.ndarray, axis: int, reach: int
                         ) -> np.ndarray:
    """``d`` with the pixels of opaque grid lines (``line``) replaced by the lighter of
    the nearest pixels off the line on either side across it (``axis`` 0: above and
    below a horizontal line).

    Under a black line (a binarized or fax-like print) dividing the grid out cannot tell
    trace from line; a trace crossing the line is inked on both sides of it, a line
    alone on neither.
    """
    pos = np.nonzero(line)
    if pos[0].size == 0:
        return d
    across = pos[axis]
    size = d.shape[axis]
    sides = []
    for step in (1, -1):
        got = np.full(across.shape, np.nan, np.float32)
        for k in range(1, reach + 1):
            at = list(pos)
            at[axis] = np.clip(across + step * k, 0, size - 1)
            off = np.isnan(got) & ~line[tuple(at)]
            got[off] = d[tuple(at)][off]
        sides.append(np.nan_to_num(got, nan=0.0))
    out = d.copy()
    out[pos] = np.minimum(d[pos], np.minimum(sides[0], sides[1]))
    return out


def ink_probability(image_rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Classic trace-probability map (H, W) float32 in [0, 1].

    Light is read in the brightest channel (max of R, G, B), where red, pink, orange and
    green grid lines are nearly as light as paper but the black or blue-black trace stays
    dark. Layers of a print multiply their transmittances, so the paper's shading (a
    median over ~9 mm) and then the grid lines (:func:`_grid_darkness`) are divided out:
    a trace pixel printed over a grid line keeps its full darkness, the line vanishes.
    """
    img = np.asarray(image_rgb)
    t = img.max(axis=2).astype(np.float32) / 255.0
    h, w = t.shape
    f = max(1.0, px_per_mm)
    small = cv2.resize(t, (max(8, round(w / f)), max(8, round(h / f))),
                       interpolation=cv2.INTER_AREA)
    paper = cv2.medianBlur(np.clip(small * 255, 0, 255).astype(np.uint8), 9)
    paper_t = cv2.resize(paper.astype(np.float32) / 255.0, (w, h),
                         interpolation=cv2.INTER_LINEAR)
    t = np.clip(t / np.maximum(paper_t, 0.05), 0.0, 1.0)
    d = 1.0 - t
    rows, cols = _grid_darkness(d, px_per_mm)
    grid_t = 1.0 - np.maximum(rows, cols)
    d = np.clip(1.0 - t / np.maximum(grid_t, 0.05), 0.0, 1.0)
    reach = max(2, round(OPAQUE_REACH_MM * px_per_mm))
    d = _across_opaque_lines(d, rows >= OPAQUE_GRID, 0, reach)
    d = _across_opaque_lines(d, cols >= OPAQUE_GRID, 1, reach)
    ink_level = float(np.percentile(d, 99.7))
    if ink_level <= 0.03:
        return np.zeros_like(d)
    lo, hi = INK_LO * ink_level, INK_HI * ink_level
    prob: np.ndarray = np.clip((d - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if (_stroke_widths(prob, px_per_mm, 75.0) >= OPEN_MIN_PEN_PX
            or float(np.mean(prob > INK_LEVEL)) > GRID_LEFT_SHARE):
        # a pen this wide survives a 2x2 opening; one-pixel grid remnants do not
        # (erode towards one corner, dilate back towards the other: an even kernel with
        # one anchor for both, as MORPH_OPEN does, would shift the map by a pixel)
        k = np.ones((2, 2), np.uint8)
        prob = cv2.dilate(cv2.erode(prob, k, anchor=(1, 1)), k, anchor=(0, 0))
    return prob


def _crossing_lines(ink: np.ndarray, px_per_mm: float, top: int, bottom: int
                    ) -> list[tuple[float, float]]:
    """Near-vertical straight lines whose ink covers most of rows ``top..bottom``:
    ``(x at top, dx per row)`` each.

    A Hough accumulator at ~2 px/mm counts every ink pixel on a line, gaps or not,
    and is deterministic; only lines within ``LINE_MAX_TILT_DEG`` of vertical are voted.
    """
    f = max(1, round(px_per_mm / LINE_PX_PER_MM))
    sub = np.ascontiguousarray(ink[top:bottom])
    pooled = cv2.dilate(sub.astype(np.uint8), np.ones((f, f), np.uint8))[::f, ::f]
    votes = max(8, round(LINE_SPAN_SHARE * pooled.shape[0]))
    tilt = np.radians(LINE_MAX_TILT_DEG)
    lines: list[tuple[float, float]] = []
    for lo, hi in ((0.0, tilt), (np.pi - tilt, np.pi)):
        found = cv2.HoughLines(pooled * 255, 1, np.pi / 720, votes, min_theta=lo,
                               max_theta=hi)
        for rho, theta in ([] if found is None else found[:, 0].tolist()):
            # rho = x cos(theta) + y sin(theta), in pooled pixels
            c, s = np.cos(theta), np.sin(theta)
            lines.append((rho * f / c, -s / c))
    # grid lines repeat every 5 mm; a crease or a streak stands alone
    period = GRID_PERIOD_MM * px_per_mm
    mid = np.array([x + dx * 0.5 * (bottom - top) for x, dx in lines])
    out = []
    for (x, dx), m in zip(lines, mid, strict=True):
        gaps = np.abs(mid - m)
        gaps = gaps[gaps > 0.5 * period]  # not the same line found twice
        if not np.any(np.abs(gaps - np.round(gaps / period) * period)
                      <= LINE_GRID_TOL * period):
            out.append((x, dx))
    return out


def erase_creases(prob: np.ndarray, px_per_mm: float, top: int, bottom: int
                  ) -> np.ndarray:
    """``prob`` without the straight lines that cross the rows (``top..bottom``).

    A crease of a folded sheet, a scanner streak or a surviving grid line is a long,
    straight, near-vertical line; a path search would climb it as a QRS. A line whose
    ink covers most of the rows' height is erased where its ink is vertical over
    ``LINE_STROKE_MM`` and no darker than the line itself, so a trace stroke lying on it
    stays, and a trace crossing it keeps its pixels but for the crossing, which the
    calibration stage interpolates as a short gap.
    """
    ink = prob >= RUN_LEVEL
    top, bottom = max(0, top), min(prob.shape[0], bottom)
    lines = _crossing_lines(ink, px_per_mm, top, bottom)
    if not lines:
        return prob
    reach = max(2, round(0.5 * px_per_mm))
    tall = max(3, round(LINE_STROKE_MM * px_per_mm))
    vertical = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN,
                                np.ones((tall, 1), np.uint8)) > 0
    out = prob.copy()
    for x_top, dx in lines:
        band = np.zeros(prob.shape, np.uint8)
        cv2.line(band, (round(x_top), top), (round(x_top + dx * (bottom - top)), bottom),
                 1, 2 * reach + 1)
        line = (band > 0) & vertical
        if not line.any():
            continue
        level = max(RUN_LEVEL, 1.25 * float(np.median(prob[line])))
        out[line & (prob <= level)] = 0.0
    return out


def viterbi_path(cost: np.ndarray, slope_cost: float = SLOPE_COST,
                 restarts: np.ndarray | None = None, blank_cost: float = 0.0
                 ) -> np.ndarray:
    """Minimum-cost path through ``cost`` (W, H): one row index per column.

    The cost of moving from ``y1`` at column ``x-1`` to ``y2`` at column ``x`` is the
    sum of ``cost[x]`` over ``(y1, y2]`` (or ``[y2, y1)`` upward; ``cost[x, y2]`` when
    staying) plus ``slope_cost * |y2 - y1|``. At a column where ``restarts`` (W,) is
    true the path may start afresh at any height for free: a lead boundary, where the
    printer lifts the pen and the next lead starts at its own first value.
    The height the path takes at each column costs ``blank_cost`` times its own cost
    (capped at 1) on top of that: a column spent on blank paper is dearer than a pixel
    of blank crossed on the way.
    """
    return viterbi_paths(cost[None], slope_cost,
                         None if restarts is None else restarts[None], blank_cost)[0]


def viterbi_paths(cost: np.ndarray, slope_cost: float = SLOPE_COST,
                  restarts: np.ndarray | None = None,
                  blank_cost: float = 0.0) -> np.ndarray:
    """:func:`viterbi_path` for a stack of bands (R, W, H) at once -> (R, W).

    The minimum over all predecessors of the run cost is a distance transform: with
    ``C'`` the cumulative cost plus the slope term, coming down from ``y1 < y2`` costs
    ``C'(y2) - C'(y1)`` and going up costs ``(C'(y1) - c(y1)) - (C'(y2) - c(y2))``, so
    two running minima per column give the best predecessor for every ``y2``.
    ``blank_cost`` is as in :func:`viterbi_path`.
    """
    rr, w, h = cost.shape
    idx = np.arange(h)
    inf = np.float32(np.inf)
    csum = np.cumsum(cost, axis=2, dtype=np.float32) + np.float32(slope_cost) * idx
    back = np.empty((rr, w, h), dtype=np.int32)
    back[:, 0] = idx
    acc = cost[:, 0].astype(np.float32).copy()
    down = np.empty((rr, h), np.float32)
    up = np.empty((rr, h), np.float32)
    di = np.empty((rr, h), np.int64)
    ui = np.empty((rr, h), np.int64)
    down[:, 0] = inf
    up[:, -1] = inf
    di[:, 0] = 0
    ui[:, -1] = h - 1
    for x in range(1, w):
        c = cost[:, x]
        cp = csum[:, x]
        stay = acc + c
        a = acc - cp
        am = np.minimum.accumulate(a, axis=1)
        ai = np.maximum.accumulate(np.where(a <= am, idx, 0), axis=1)
        down[:, 1:] = am[:, :-1] + cp[:, 1:]
        di[:, 1:] = ai[:, :-1]
        b = (acc + cp - c)[:, ::-1]
        bm = np.minimum.accumulate(b, axis=1)
        bi = np.maximum.accumulate(np.where(b <= bm, idx, 0), axis=1)
        up[:, :-1] = bm[:, ::-1][:, 1:] - cp[:, :-1] + c[:, :-1]
        ui[:, :-1] = (h - 1 - bi[:, ::-1])[:, 1:]
        choice = np.where(down < stay, di, idx)
        best = np.minimum(down, stay)
        choice = np.where(up < best, ui, choice)
        acc_prev = acc
        acc = np.minimum(up, best)
        if restarts is not None and restarts[:, x].any():
            r = np.flatnonzero(restarts[:, x])
            start = np.argmin(acc_prev[r], axis=1)
            acc[r] = acc_prev[r, start][:, None] + c[r]
            choice[r] = start[:, None]
        if blank_cost:
            acc = acc + blank_cost * np.minimum(c, 1.0)
        back[:, x] = choice
    paths = np.empty((rr, w), dtype=np.int64)
    paths[:, -1] = np.argmin(acc, axis=1)
    rows = np.arange(rr)
    for x in range(w - 1, 0, -1):
        paths[:, x - 1] = back[rows, x, paths[:, x]]
    return paths


def _stroke_widths(prob: np.ndarray, px_per_mm: float, q: float) -> float:
    """Percentile ``q`` of the ink width across near-vertical strokes (px), edges read as
    :func:`_edges`; 0 when too few strokes are seen."""
    ink = prob > INK_LEVEL
    reach = max(4, round(0.6 * px_per_mm))
    vert = ink.copy()
    vert[reach:] &= ink[:-reach]
    vert[:-reach] &= ink[reach:]
    vert[:reach] = False
    vert[-reach:] = False
    ys = np.flatnonzero(vert.any(axis=1))
    widths = []
    limit = max(3.0, 1.2 * px_per_mm)
    for y in ys[:: max(1, ys.size // 400)]:
        line = ink[y]
        for a, end in runs(line):
            if not vert[y, a:end].any():
                continue
            left, right = _edges(prob[y], a, end - 1)
            if right - left <= limit:
                widths.append(right - left)
    if len(widths) < 10:
        return 0.0
    return float(np.percentile(widths, q))


def trace_thickness(prob: np.ndarray, px_per_mm: float) -> float:
    """Width (px) of the trace's ink across a steep stroke, edges read as :func:`_edges`.

    Measured on horizontal runs through near-vertical strokes (inked well above and
    below), the same way the steep-stroke reader measures edges, so that "edge moved in
    by half this width" lands on the centre line whatever the pen and the blur.
    """
    w = _stroke_widths(prob, px_per_mm, 50.0)
    return max(1.0, w) if w > 0 else max(1.0, 0.35 * px_per_mm)


def _edges(p: np.ndarray, a: int, b: int) -> tuple[float, float]:
    """Sub-pixel edges of the ink run ``a..b`` of a line of probabilities ``p``."""
    return a - 0.5 + (1.0 - float(p[a])), b + 0.5 - (1.0 - float(p[b]))


@dataclass
class _Runs:
    """Per column of a band: the ink run taken as the row's, its edges and centroid."""

    lo: np.ndarray
    hi: np.ndarray
    lo_edge: np.ndarray
    hi_edge: np.ndarray
    centre: np.ndarray
    conf: np.ndarray
    ok: np.ndarray


def _column_runs(prob: np.ndarray, ink: np.ndarray, path: np.ndarray,
                 restarts: np.ndarray | None = None) -> _Runs:
    """The contiguous ink run each column's path segment touches (band coordinates).

    The path only says which ink run of a column is this row's; the whole run is taken,
    since on a spike the baseline and the tip lie in one run. At a restart column the
    path's jump is not a stroke: only the run at the new height counts.
    """
    w, h = prob.shape
    cols = np.arange(w)
    prev = np.concatenate(([path[0]], path[:-1]))
    if restarts is not None:
        prev = np.where(restarts, path, prev)
    a = np.minimum(prev, path) + (prev < path)  # the segment (prev, path] or [path, prev)
    b = np.maximum(prev, path) - (prev > path)
    a = np.minimum(a, b)
    idx = np.arange(h)
    cum_p = np.concatenate([np.zeros((w, 1), np.float32),
                            np.cumsum(prob, axis=1, dtype=np.float32)], axis=1)
    conf = (cum_p[cols, b + 1] - cum_p[cols, a]) / (b - a + 1)
    nxt = np.minimum.accumulate(np.where(ink, idx, h)[:, ::-1], axis=1)[:, ::-1]
    first = nxt[cols, a]
    hit = first <= b
    seed = np.where(hit, first, -1)
    up1 = np.clip(path - 1, 0, h - 1)
    dn1 = np.clip(path + 1, 0, h - 1)
    near_up = ~hit & (path - 1 >= 0) & ink[cols, up1]
    near_dn = ~hit & ~near_up & (path + 1 < h) & ink[cols, dn1]
    seed = np.where(near_up, up1, np.where(near_dn, dn1, seed))
    ok = seed >= 0
    seed = np.maximum(seed, 0)
    # a run starts after the last blank pixel above and ends before the next one below
    start = np.maximum.accumulate(np.where(~ink, idx + 1, 0), axis=1)
    stop = np.minimum.accumulate(np.where(~ink, idx - 1, h - 1)[:, ::-1], axis=1)[:, ::-1]
    lo = np.where(ok, start[cols, seed], 0)
    hi = np.where(ok, stop[cols, seed], 0)
    cum_py = np.concatenate([np.zeros((w, 1), np.float32),
                             np.cumsum(prob * idx, axis=1, dtype=np.float32)], axis=1)
    mass = cum_p[cols, hi + 1] - cum_p[cols, lo]
    moment = cum_py[cols, hi + 1] - cum_py[cols, lo]
    centre = np.where(ok, moment / np.maximum(mass, 1e-6), np.nan)
    lo_edge = lo - 0.5 + (1.0 - prob[cols, lo])  # partial cover of edge pixels
    hi_edge = hi + 0.5 - (1.0 - prob[cols, hi])
    return _Runs(lo.astype(np.int64), hi.astype(np.int64), lo_edge.astype(np.float64),
                 hi_edge.astype(np.float64), centre.astype(np.float64),
                 conf.astype(np.float64), ok)


def _beside(r: _Runs, x: int, step: int, thickness: float) -> float:
    """Centre of the nearest column before (``step`` -1) or after (+1) ``x`` whose run
    does not span ``x``'s whole run (a thick pen merges an RS complex over several
    columns); NaN if there is none within a few pens."""
    w = r.ok.shape[0]
    for k in range(x + step, x + step * (3 + int(3 * thickness)), step):
        if not 0 <= k < w or not r.ok[k]:
            break
        if r.lo_edge[k] > r.lo_edge[x] + thickness or r.hi_edge[k] < r.hi_edge[x] - thickness:
            return float(r.centre[k])
    return float("nan")


def _tips(r: _Runs, thickness: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns holding an upward / downward tip: a long run beyond both neighbours'; and
    the columns holding both where the downward (S) tip is drawn first."""
    w = r.ok.shape[0]
    up = np.zeros(w, bool)
    down = np.zeros(w, bool)
    s_first = np.zeros(w, bool)
    for x in range(1, w - 1):
        if not (r.ok[x - 1] and r.ok[x] and r.ok[x + 1]):
            continue
        if r.hi_edge[x] - r.lo_edge[x] < TIP_RUN_PENS * thickness:
            continue
        # an extreme, or either end of a flat extreme (a round trough's bottom)
        lo, lo_l, lo_r = r.lo_edge[x], r.lo_edge[x - 1], r.lo_edge[x + 1]
        hi, hi_l, hi_r = r.hi_edge[x], r.hi_edge[x - 1], r.hi_edge[x + 1]
        u = bool(lo <= min(lo_l, lo_r) and lo < max(lo_l, lo_r))
        d = bool(hi >= max(hi_l, hi_r) and hi > min(hi_l, hi_r))
        if u and d:
            # both in one column: the R's and the S's tips on one stroke when the
            # neighbours lie at its opposite ends (R before, S after, or S then R);
            # else one narrow spike, whose larger excursion is the tip
            beside = (_beside(r, x, -1, thickness), _beside(r, x, 1, thickness))
            before, after = beside[0] - r.centre[x], beside[1] - r.centre[x]
            if not (min(abs(before), abs(after)) > thickness and before * after < 0):
                # measured from the trace beside the merged strokes: the columns next
                # to a thick pen's narrow spike lie inside the same blob
                seen = [v for v in beside if np.isfinite(v)]
                ref = (float(np.mean(seen)) if seen
                       else 0.5 * (r.centre[x - 1] + r.centre[x + 1]))
                u = ref - r.lo_edge[x] >= r.hi_edge[x] - ref
                d = not u
            else:
                s_first[x] = before > 0  # coming up from below
        up[x], down[x] = u, d
    return up, down, s_first


def _steep_points(prob: np.ndarray, ink: np.ndarray, r: _Runs, xa: int, xb: int,
                  thickness: float, up: np.ndarray, down: np.ndarray,
                  s_first: np.ndarray) -> tuple[list[float], list[float]]:
    """Centre-line points of a steep stretch (columns ``xa..xb``), scanned along rows.

    On a QRS a column holds many heights, so the curve is read the other way round.
    The stretch is cut at its tips (and its flat ends) into strokes along which the
    height is monotonic; each pixel row between a stroke's end heights crosses the
    stroke once, at the centre of its ink run across the row. Where a narrow spike's
    two strokes merge into one run, the run's edge on this stroke's side, moved in by
    half the pen, is the crossing. Points come out in time order.
    """
    half = thickness / 2.0
    w_band = r.ok.shape[0]
    xa, xb = max(xa, 0), min(xb, w_band - 1)
    cols = np.arange(xa, xb + 1)
    good = cols[r.ok[cols]]
    if good.size == 0:
        return [], []
    ymin, ymax = int(r.lo[good].min()), int(r.hi[good].max())
    width = xb - xa + 1
    sub_ink = np.zeros((ymax - ymin + 1, width), bool)
    sub_p = prob[xa:xb + 1, ymin:ymax + 1].T
    for x in good:
        sub_ink[r.lo[x] - ymin:r.hi[x] - ymin + 1, x - xa] = ink[x, r.lo[x]:r.hi[x] + 1]

    def row_run(row: int, j: int) -> tuple[int, int]:
        line = sub_ink[row]
        a, b = j, j
        while a > 0 and line[a - 1]:
            a -= 1
        while b < width - 1 and line[b + 1]:
            b += 1
        return a, b

    def edges(row: int, a: int, b: int) -> tuple[float, float]:
        left, right = _edges(sub_p[row], a, b)
        return xa + left, xa + right

    # vertices: flat entry, tips in time order, flat exit
    verts: list[tuple[float, float]] = [(float(good[0]), float(r.centre[good[0]]))]
    for x in good:
        order = ((up[x], -1), (down[x], 1))
        for is_tip, sign in (order[::-1] if s_first[x] else order):
            if not is_tip or x in (good[0], good[-1]):
                continue
            row = (r.lo[x] if sign < 0 else r.hi[x]) - ymin
            a, b = row_run(row, x - xa)
            left, right = edges(row, a, b)
            yt = r.lo_edge[x] + half if sign < 0 else r.hi_edge[x] - half
            verts.append((0.5 * (left + right), float(yt)))
    verts.append((float(good[-1]), float(r.centre[good[-1]])))
    px: list[float] = [verts[0][0]]
    py: list[float] = [verts[0][1]]
    for (x0, y0), (x1, y1) in itertools.pairwise(verts):
        if x1 < x0:
            x1 = x0
        step = 1 if y1 > y0 else -1
        rows = np.arange(int(np.floor(y0)) + (1 if step > 0 else 0),
                         int(np.ceil(y1)), step)
        rows = rows[(rows > min(y0, y1)) & (rows < max(y0, y1))]
        last = x0
        for y in rows:
            row = int(y) - ymin
            if not 0 <= row < sub_ink.shape[0]:
                continue
            t = (y - y0) / (y1 - y0)
            guess = x0 + t * (x1 - x0)
            j0 = max(0, int(np.floor(min(x0, guess) - xa - thickness)))
            j1 = min(width - 1, int(np.ceil(max(x1, guess) - xa + thickness)))
            hits = np.flatnonzero(sub_ink[row, j0:j1 + 1])
            if hits.size == 0:
                continue
            j = j0 + int(hits[np.argmin(np.abs(j0 + hits + xa - guess))])
            a, b = row_run(row, j)
            left, right = edges(row, a, b)
            merged_left = left < x0 - half  # shares its run with the stroke before
            merged_right = right > x1 + half  # ... or with the stroke after
            if merged_left and not merged_right:
                xc = right - half
            elif merged_right and not merged_left:
                xc = left + half
            elif merged_left and merged_right:
                xc = guess
            else:
                xc = 0.5 * (left + right)
            xc = min(max(xc, last, x0), x1)
            last = xc
            px.append(xc)
            py.append(float(y))
        px.append(x1)
        py.append(y1)
    return px, py


def _curve(prob: np.ndarray, ink: np.ndarray, r: _Runs, thickness: float,
           restarts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points (x, y in band coordinates), sorted by x.

    A steep stretch never spans a restart column: the leads on either side are
    separate strokes.
    """
    w = r.ok.shape[0]
    up, down, s_first = _tips(r, thickness)
    steep = r.ok & (r.hi_edge - r.lo_edge > 2.5 * thickness + 1.0)
    steep = np.asarray(maximum_filter1d(steep.astype(np.uint8), size=3) > 0) & r.ok
    if restarts is not None:
        steep[restarts] = False
    px: list[float] = []
    py: list[float] = []
    in_span = np.zeros(w, bool)
    for a, end in runs(steep):
        sx, sy = _steep_points(prob, ink, r, a, end - 1, thickness, up, down, s_first)
        if sx:
            px.extend(sx)
            py.extend(sy)
            in_span[a:end] = True
    half = thickness / 2.0
    for x in np.flatnonzero(r.ok & ~in_span):
        if up[x]:
            y = r.lo_edge[x] + half
        elif down[x]:
            y = r.hi_edge[x] - half
        else:
            y = r.centre[x]
        px.append(float(x))
        py.append(float(y))
    xs = np.asarray(px)
    ys = np.asarray(py)
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order]


def _band_arrays(prob: np.ndarray, band: tuple[int, int], xs: tuple[int, int],
                 baseline: float, pitch: float, blocked: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-major probability, ink and path cost of one row's band."""
    top, bot = band
    sub = prob[top:bot, xs[0]:xs[1]]
    ink = sub >= RUN_LEVEL
    ink = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_CLOSE,
                           np.ones((RUN_GAP_PX, 1), np.uint8)).astype(bool)
    cost = 1.0 - np.clip(sub / PATH_FULL_INK, 0.0, 1.0)
    cost = np.where(ink, np.minimum(cost, RUN_COST), cost)
    if blocked is not None:
        ink &= ~blocked
        cost = np.where(blocked, np.maximum(cost, OTHER_ROW_COST), cost)
    ys = np.arange(top, bot, dtype=np.float32)
    pull = BASELINE_PULL * (np.abs(ys - baseline) / max(pitch, 1.0)) ** 2
    cost = cost + pull[:, None]
    return (np.ascontiguousarray(sub.T), np.ascontiguousarray(ink.T),
            np.ascontiguousarray(cost.T, dtype=np.float32))


def _follow(prob: np.ndarray, bands: list[tuple[int, int]], specs: list[RowSpec],
            thickness: float, blocked: list[np.ndarray | None], curves: bool
            ) -> list[RowTrace]:
    """Path search for several rows at once (one Viterbi pass over stacked bands)."""
    arrays = [_band_arrays(prob, band, s.xs, s.baseline, s.pitch, blk)
              for band, s, blk in zip(bands, specs, blocked, strict=True)]
    w = max(c.shape[0] for _, _, c in arrays)
    h = max(c.shape[1] for _, _, c in arrays)
    stack = np.full((len(arrays), w, h), PAD_COST, np.float32)
    for i, (_, _, c) in enumerate(arrays):
        stack[i, :c.shape[0], :c.shape[1]] = c
    restarts = np.zeros((len(arrays), w), bool)
    for i, s in enumerate(specs):
        for cut in s.cuts:
            if s.xs[0] < cut < s.xs[1]:
                restarts[i, cut - s.xs[0]] = True
    paths = viterbi_paths(stack, restarts=restarts, blank_cost=BLANK_COLUMN_COST)
    out = []
    for i, ((p_t, ink_t, c), band, s) in enumerate(zip(arrays, bands, specs, strict=True)):
        top = band[0]
        path = np.clip(paths[i, :c.shape[0]], 0, c.shape[1] - 1)
        cuts = restarts[i, :c.shape[0]]
        taken = _column_runs(p_t, ink_t, path, cuts)
        if curves:
            px, py = _curve(p_t, ink_t, taken, thickness, cuts)
        else:
            px = py = np.zeros(0)
        out.append(RowTrace(row=i, x0=s.xs[0], x=px + s.xs[0], y=py + top, col_ok=taken.ok,
                            col_conf=taken.conf, lo=taken.lo + top, hi=taken.hi + top,
                            path=path + top, thickness=thickness))
    return out


def _claimed(trace: RowTrace, band: tuple[int, int], xs: tuple[int, int], margin: int
             ) -> np.ndarray:
    """(band rows, columns) mask of the ink ``trace`` took, widened by ``margin``."""
    top, bot = band
    ys = np.arange(top, bot)[:, None]
    k = np.arange(xs[0], xs[1]) - trace.x0
    valid = (k >= 0) & (k < trace.col_ok.shape[0])
    k = np.clip(k, 0, trace.col_ok.shape[0] - 1)
    ok = trace.col_ok[k]
    lo = np.where(ok, trace.lo[k], trace.path[k]) - margin
    hi = np.where(ok, trace.hi[k], trace.path[k]) + margin
    return np.asarray((ys >= lo[None, :]) & (ys <= hi[None, :]) & valid[None, :])


@dataclass(frozen=True)
class RowSpec:
    """What the path search needs to know about one row (from the layout stage)."""

    baseline: float
    band: tuple[int, int]
    xs: tuple[int, int]
    pitch: float
    cuts: tuple[int, ...] = ()
    """Columns where one lead ends and the next begins (the path restarts there)."""


def extract(prob: np.ndarray, rows: list[RowSpec], px_per_mm: float,
            thickness: float | None = None, check: Callable[[], None] | None = None
            ) -> list[RowTrace]:
    """Follow every row's trace; two passes so touching rows do not steal ink.

    The first pass keeps each row to half way to its neighbours; the second gives each
    row a band reaching to the neighbours' baselines (tall R waves) but treats the ink
    the neighbours took in the first pass as theirs. ``check`` is called between passes
    (the caller's deadline).
    """
    if thickness is None:
        thickness = trace_thickness(prob, px_per_mm)
    h, w = prob.shape
    rows = [RowSpec(r.baseline, (max(0, r.band[0]), min(h, r.band[1])),
                    (max(0, r.xs[0]), min(w, r.xs[1])), r.pitch, r.cuts) for r in rows]
    if any(r.band[1] - r.band[0] < 3 or r.xs[1] - r.xs[0] < 3 for r in rows):
        raise DigitizationError("a trace row lies outside the page")
    prob = erase_creases(prob, px_per_mm, min(r.band[0] for r in rows),
                         max(r.band[1] for r in rows))
    half_bands = []
    for i, r in enumerate(rows):
        half_up = 0.5 * (r.baseline - rows[i - 1].baseline) if i > 0 else r.pitch
        half_dn = 0.5 * (rows[i + 1].baseline - r.baseline) if i + 1 < len(rows) else r.pitch
        half_bands.append((max(r.band[0], int(r.baseline - half_up)),
                           min(r.band[1], int(r.baseline + half_dn) + 1)))
    if check is not None:
        check()
    first = _follow(prob, half_bands, rows, thickness, [None] * len(rows), curves=False)
    if check is not None:
        check()
    margin = max(1, int(np.ceil(thickness)))
    blocked: list[np.ndarray | None] = []
    for i, r in enumerate(rows):
        others = [t for j, t in enumerate(first) if j != i and abs(j - i) <= 2]
        if not others:
            blocked.append(None)
            continue
        own = _claimed(first[i], r.band, r.xs, margin)
        theirs = np.zeros_like(own)
        for t in others:
            theirs |= _claimed(t, r.band, r.xs, 0)
        blocked.append(theirs & ~own)
    final = _follow(prob, [r.band for r in rows], rows, thickness, blocked, curves=True)
    return [_without_runoff(t, r.baseline, px_per_mm) for t, r in zip(final, rows, strict=True)]


def _without_runoff(trace: RowTrace, baseline: float, px_per_mm: float) -> RowTrace:
    """The trace less a run-off at either end: a stretch that leaves the row's baseline
    by more than ``RUNOFF_MM`` in a jump and stays away up to the row's end.

    A print may stop short of the row's nominal end (or start late); the path then
    spends the rest of the row on whatever ink the band holds (a grid border, a footer,
    reached down a grid line). A trace that far out is a QRS, back within a tenth of a
    second; the cut columns read as blank (NaN), never as a flat invention.
    """
    far = np.abs(trace.path - baseline) > RUNOFF_MM * px_per_mm
    jump = 0.5 * RUNOFF_MM * px_per_mm
    shortest = RUNOFF_MIN_MM * px_per_mm
    keep = np.ones(far.shape[0], bool)
    tail = _runoff_length(far, trace.path, jump, shortest)
    keep[keep.shape[0] - tail:] = False
    head = _runoff_length(far[::-1], trace.path[::-1], jump, shortest)
    keep[:head] = False
    if keep.all():
        return trace
    cols = np.flatnonzero(keep)
    lo_x, hi_x = trace.x0 + cols[0], trace.x0 + cols[-1]
    # the jump's own stroke, read at the last kept column, goes with the run-off
    near = np.abs(trace.y - baseline) <= RUNOFF_MM * px_per_mm
    pts = (trace.x >= lo_x) & (trace.x <= hi_x) & (near | ((trace.x > lo_x) & (trace.x < hi_x)))
    return replace(trace, x=trace.x[pts], y=trace.y[pts], col_ok=trace.col_ok & keep)


def _runoff_length(far: np.ndarray, path: np.ndarray, jump: float, shortest: float) -> int:
    """Columns of run-off at the end of a path: its closing run of ``far`` columns, when
    that run is at least ``shortest`` long, is not the whole path, and the path entered
    it by a move of ``jump`` px or more within ``RUNOFF_STEP_PX`` columns; else 0."""
    n = far.shape[0]
    tail = n if far.all() else int(np.argmin(far[::-1]))
    if tail == n or tail < shortest:
        return 0
    k = n - tail
    step = abs(float(path[k]) - float(path[max(0, k - RUNOFF_STEP_PX)]))
    return tail if step >= jump else 0
