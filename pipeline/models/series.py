"""Trace-probability map -> one sub-pixel trace position per column, per printed row.

A row's trace is found in two steps:

1. **Path.** A Viterbi pass over the columns of the row's band picks one integer y per
   column: emission ``-log p``, an L1 jump cost (so steep QRS strokes cost only their
   height, and a jump through empty paper is dear), and a weak pull toward the row's
   baseline, so that a neighbour row's trace that reaches into the band is not followed.
2. **Sub-pixel value.** Around the path, the run of pixels above ``threshold`` in that
   column is the stroke. A short run (a flat stretch) gives its probability-weighted
   centre of mass (a windowed soft-argmax). A long run is a steep stroke or a peak: if it
   reaches above both neighbouring runs it holds a positive peak and the value is its top
   edge moved down by the half-width of the line; below both, a negative peak, the bottom
   edge moved up; otherwise the stroke passes through and the value is its middle. A hard
   per-column argmax would cut every R and S wave.

Rows are tracked independently, so traces of neighbouring rows that touch or cross do
not merge: each row keeps its own continuity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

EPS = 1e-3
"""Floor on probabilities before the log: bounds the cost of a column with no trace."""
DEFAULT_THRESHOLD = 0.3
JUMP_COST = 4.0
"""Cost of a jump of one row gap in one column (nats)."""
PRIOR_COST = 0.4
"""Cost per column of sitting one row gap away from the row's baseline (nats)."""
RIDGE_TOLERANCE = 0.02
"""A pixel is on a horizontal ridge if no side neighbour beats it by more than this."""
H_SPREAD = 0.5
"""How far (px) a pixel's horizontal ridge may sit from the column and still count."""
REACH = 1.3
"""A row's band spans this many row gaps above and below its baseline."""


@dataclass(frozen=True)
class RowTrace:
    """One row's trace in map pixels: ``y[i]`` is the trace centre at column ``x[i]``."""

    baseline: float
    x: np.ndarray
    y: np.ndarray
    """Sub-pixel trace centre; NaN where the map shows no trace on this row's path."""
    confidence: np.ndarray
    """Map probability on the path, 0..1."""


def edge_offset(sigma_px: float, threshold: float) -> float:
    """Distance from a Gaussian line's centre to where it falls to ``threshold`` of 1."""
    return sigma_px * math.sqrt(2.0 * math.log(1.0 / threshold))


def find_baselines(prob: np.ndarray, *, min_gap_px: float, threshold: float = 0.5
                   ) -> np.ndarray:
    """Row baselines (y, map px) from where the map's rows of trace lie.

    A trace spends most of its time near its baseline, so the column-count of confident
    pixels per image row peaks there. Useful when no layout analysis is at hand.
    """
    profile = (prob > threshold).sum(axis=1).astype(np.float64)
    profile = gaussian_filter1d(profile, sigma=max(1.0, min_gap_px / 12))
    if profile.max() <= 0:
        return np.zeros(0)
    peaks, _ = find_peaks(profile, distance=max(1, int(min_gap_px)),
                          height=0.25 * profile.max())
    return peaks.astype(np.float64)


def _l1_min_plus(cost: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out[r, y] = min_y' cost[r, y'] + lam[r] |y - y'|`` and its argmin, per row ``r``."""
    n_rows, h = cost.shape
    ys = np.arange(h, dtype=np.float64)
    lam_y = lam[:, None] * ys[None, :]
    # from above: min over y' <= y of (cost[y'] - lam y') + lam y
    a = cost - lam_y
    run_a = np.minimum.accumulate(a, axis=1)
    new_a = np.concatenate([np.ones((n_rows, 1), bool), a[:, 1:] <= run_a[:, :-1]], axis=1)
    arg_a = np.maximum.accumulate(np.where(new_a, np.arange(h), 0), axis=1)
    fwd = run_a + lam_y
    # from below: min over y' >= y of (cost[y'] + lam y') - lam y
    b = (cost + lam_y)[:, ::-1]
    run_b = np.minimum.accumulate(b, axis=1)
    new_b = np.concatenate([np.ones((n_rows, 1), bool), b[:, 1:] < run_b[:, :-1]], axis=1)
    arg_b = (h - 1) - np.maximum.accumulate(np.where(new_b, np.arange(h), 0), axis=1)
    bwd = run_b[:, ::-1] - lam_y
    arg_b = arg_b[:, ::-1]
    take_b = bwd < fwd
    return np.where(take_b, bwd, fwd), np.where(take_b, arg_b, arg_a)


def _bands(prob: np.ndarray, baselines: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                             np.ndarray]:
    """Per row: band top (int), gap (px) and the band's probabilities ``(rows, Hb, W)``."""
    h, w = prob.shape
    b = np.sort(np.asarray(baselines, dtype=np.float64))
    if len(b) > 1:
        d = np.diff(b)
        gaps = np.minimum(np.concatenate([d[:1], d]), np.concatenate([d, d[-1:]]))
    else:
        gaps = np.array([h / 3.0])
    gaps = np.maximum(gaps, 4.0)
    reach = np.ceil(REACH * gaps).astype(int)
    tops = np.round(b).astype(int) - reach
    hb = int((2 * reach + 1).max())
    band = np.zeros((len(b), hb, w), dtype=np.float32)
    for r in range(len(b)):
        y0, y1 = tops[r], tops[r] + 2 * reach[r] + 1
        s0, s1 = max(0, y0), min(h, y1)
        if s1 > s0:
            band[r, s0 - y0:s1 - y0] = prob[s0:s1]
    return tops, gaps, band


def _viterbi(band: np.ndarray, centre: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Integer path ``(rows, W)`` through each row's band."""
    n_rows, hb, w = band.shape
    ys = np.arange(hb, dtype=np.float64)
    emit = -np.log(np.maximum(band, EPS)).astype(np.float64)
    prior = PRIOR_COST * np.abs(ys[None, :] - centre[:, None]) / gaps[:, None]
    lam = JUMP_COST / gaps
    back = np.zeros((n_rows, w, hb), dtype=np.int16 if hb < 32000 else np.int32)
    acc = emit[:, :, 0] + prior
    for x in range(1, w):
        best, arg = _l1_min_plus(acc, lam)
        back[:, x] = arg
        acc = best + emit[:, :, x] + prior
        acc -= acc.min(axis=1, keepdims=True)
    path = np.zeros((n_rows, w), dtype=np.int64)
    path[:, -1] = np.argmin(acc, axis=1)
    rows = np.arange(n_rows)
    for x in range(w - 1, 0, -1):
        path[:, x - 1] = back[rows, x, path[:, x]]
    return path


def _refine(band: np.ndarray, path: np.ndarray, threshold: float, sigma_px: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel y (band coordinates) and confidence per row and column."""
    n_rows, hb, w = band.shape
    r_idx = np.arange(n_rows)[:, None]
    c_idx = np.arange(w)[None, :]
    conf = band[r_idx, path, c_idx]
    above = band > threshold
    ys = np.arange(hb)[None, :, None]
    # Last pixel at or above the path row that is below threshold, and first below it.
    last_off = np.maximum.accumulate(np.where(~above, ys, -1), axis=1)
    first_off = np.minimum.accumulate(np.where(~above, ys, hb)[:, ::-1], axis=1)[:, ::-1]
    top = last_off[r_idx, path, c_idx] + 1  # first pixel of the run
    bot = first_off[r_idx, path, c_idx] - 1  # last pixel of the run

    def value(yy: np.ndarray) -> np.ndarray:
        return band[r_idx, np.clip(yy, 0, hb - 1), c_idx].astype(np.float64)

    # Sub-pixel threshold crossings at the run's ends.
    p_top, p_above = value(top), value(top - 1)
    top_edge = top - 1 + (threshold - p_above) / np.maximum(p_top - p_above, 1e-6)
    top_edge = np.where(top > 0, top_edge, top.astype(np.float64))
    p_bot, p_below = value(bot), value(bot + 1)
    bot_edge = bot + 1 - (threshold - p_below) / np.maximum(p_bot - p_below, 1e-6)
    bot_edge = np.where(bot < hb - 1, bot_edge, bot.astype(np.float64))

    # Centre of mass over the run plus one pixel each side. On a steep stroke each pixel is
    # weighted by whether the map's horizontal ridge on its pixel row passes through this
    # column, which keeps only the pixels where the stroke crosses the column's centre.
    left = np.concatenate([band[:, :, :1], band[:, :, :-1]], axis=2)
    right = np.concatenate([band[:, :, 1:], band[:, :, -1:]], axis=2)
    curv = left - 2.0 * band + right
    ridge = band >= np.maximum(left, right) - RIDGE_TOLERANCE
    delta = np.where(curv < -1e-3, 0.5 * (left - right) / np.minimum(curv, -1e-3), 0.0)
    weight = band * ridge * np.exp(-0.5 * (delta / H_SPREAD) ** 2)
    lo = np.clip(top - 1, 0, hb)
    hi = np.clip(bot + 2, 0, hb)
    ys_f = np.arange(hb, dtype=np.float32)[None, :, None]

    def centroid(wt: np.ndarray) -> np.ndarray:
        z = np.zeros((n_rows, 1, w))
        c0 = np.concatenate([z, np.cumsum(wt, axis=1)], axis=1)
        c1 = np.concatenate([z, np.cumsum(wt * ys_f, axis=1)], axis=1)
        m0 = c0[r_idx, hi, c_idx] - c0[r_idx, lo, c_idx]
        m1 = c1[r_idx, hi, c_idx] - c1[r_idx, lo, c_idx]
        return np.where(m0 > 1e-6, m1 / np.maximum(m0, 1e-9), 0.5 * (top_edge + bot_edge))

    off = edge_offset(sigma_px, threshold)
    long_run = (bot_edge - top_edge) > 2.0 * off + 2.0
    prev_top = np.concatenate([top_edge[:, :1], top_edge[:, :-1]], axis=1)
    next_top = np.concatenate([top_edge[:, 1:], top_edge[:, -1:]], axis=1)
    prev_bot = np.concatenate([bot_edge[:, :1], bot_edge[:, :-1]], axis=1)
    next_bot = np.concatenate([bot_edge[:, 1:], bot_edge[:, -1:]], axis=1)
    peak_up = long_run & (top_edge < np.minimum(prev_top, next_top))
    peak_down = long_run & (bot_edge > np.maximum(prev_bot, next_bot))
    flat = centroid(band)
    steep = centroid(weight)
    y = np.where(peak_up & ~peak_down, top_edge + off,
                 np.where(peak_down & ~peak_up, bot_edge - off,
                          np.where(long_run, steep, flat)))
    y = np.where(conf >= threshold, y, np.nan)
    return y, conf.astype(np.float64)


def track_rows(prob: np.ndarray, baselines: Sequence[float] | np.ndarray, *,
               sigma_px: float = 1.0, threshold: float = DEFAULT_THRESHOLD) -> list[RowTrace]:
    """Follow each row's trace across the whole width of ``prob`` (H, W), values 0..1.

    ``baselines`` are the rows' isoelectric y positions in map pixels (from the layout
    analysis, or :func:`find_baselines`). ``sigma_px`` is the half-width of the line in
    the map (the training targets' Gaussian sigma). Returns one :class:`RowTrace` per
    baseline, in the order of sorted baselines.
    """
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"expected a 2-D probability map, got shape {prob.shape}")
    if len(baselines) == 0:
        return []
    tops, gaps, band = _bands(prob, np.asarray(baselines, dtype=np.float64))
    centre = np.sort(np.asarray(baselines, dtype=np.float64)) - tops
    path = _viterbi(band, centre, gaps)
    y_band, conf = _refine(band, path, threshold, sigma_px)
    xs = np.arange(prob.shape[1], dtype=np.float64)
    return [RowTrace(baseline=float(tops[r] + centre[r]), x=xs, y=y_band[r] + tops[r],
                     confidence=conf[r]) for r in range(len(tops))]


def resample(trace: RowTrace, x0: float, x1: float, n: int, *,
             max_gap_px: float = 3.0) -> np.ndarray:
    """The trace's y at ``n`` evenly spaced times over columns ``[x0, x1)``.

    Gaps of at most ``max_gap_px`` columns are bridged linearly; longer gaps stay NaN,
    so a stretch the map did not see is never invented.
    """
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n - 0.5
    ok = np.isfinite(trace.y)
    if ok.sum() < 2:
        return np.full(n, np.nan)
    xv, yv = trace.x[ok], trace.y[ok]
    out = np.interp(xs, xv, yv, left=np.nan, right=np.nan)
    j = np.clip(np.searchsorted(xv, xs), 1, len(xv) - 1)
    gap = xv[j] - xv[j - 1]
    exact = np.isin(xs, xv)
    out[(gap > max_gap_px + 1) & ~exact] = np.nan
    return out
