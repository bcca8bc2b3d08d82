"""Grid calibration: pitch in px/mm on both axes and a dense warp from paper mm to pixels.

The ECG grid is the only ruler on the page, so everything metric comes from it:

1. :mod:`pipeline.geometry` removes perspective with a homography from the two line families.
2. The pitch of each axis is read from the summed power spectra of tile profiles.  Major
   (5 mm) and minor (1 mm) lines make a comb whose fundamental is the major pitch; the
   5th harmonic tells that minor lines (or dots) are there.  A grid showing one level only
   is named by the size of the page it would imply.
3. In a frame with that pitch fixed at ``DETECT_PX_PER_MM``, the grid channel is demodulated
   at the major frequency on each axis (a Gabor filter).  The phase of the response is where
   the grid lines are, relative to a perfectly regular grid; unwrapped and smoothed, it is a
   dense displacement field that straightens curled, folded and wrinkled paper.
4. The page is resampled once, from the full-resolution source, through the combined map
   (output px -> paper mm -> detection frame -> work image -> source px).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import (
    breadth_first_order,
    connected_components,
    minimum_spanning_tree,
)

from pipeline import geometry, illumination
from pipeline.errors import NoGridError

DEFAULT_PX_PER_MM = 8.0
"""Scale of the rectified page unless the caller asks otherwise (~200 dpi)."""
DETECT_PX_PER_MM = 5.0
"""Scale of the axis-aligned frame the grid phase is measured in."""
MAJOR_MM = 5.0
MINOR_MM = 1.0
PITCH_TILE = 256
PITCH_STEP = 128
PITCH_PAD = 4096
MIN_PEAK_PROMINENCE = 8.0
"""A spectral peak counts when it stands this many times above the local median."""
HARMONIC_PROMINENCE = 4.0
"""A harmonic of an accepted comb counts as seen from this prominence."""
TYPICAL_PAGE_MM = 250.0
"""Typical extent of the printed grid; names a grid that shows one line level only."""
MAX_SINGLE_LEVEL_MAJORS = 120
"""More periods than this across the grid means the one visible level is 1 mm lines."""
MIN_PHASE_AMPLITUDE = 0.025
"""Share of local grid-channel energy the demodulated grid must hold to be followed."""
PAGE_MARGIN_MM = 10.0
"""Rendered beyond the last place the grid showed (pulses and labels sit at the edges)."""
MAX_TRACE_COVER = 0.25
"""Ink covering more of the page than this is grid, not trace."""
UNWRAP_STEP = 12
"""Detection-frame px between the samples the phase is unwrapped on."""
MAP_STEP = 8
"""Output px between exactly computed samples of the remap tables."""
LOCAL_WARP_MM = (0.15, 0.25)
"""RMS (mm) of the grid's local departure from its smooth trend below which it is read
as measurement noise (traces and text beside the lines; on flat scans up to ~0.15 mm,
a pixel of false time warp) and dropped, and above which it is a real wrinkle or curl
and kept in full; in between it is kept in proportion."""


@dataclass(frozen=True)
class AxisPitch:
    """Periodicity of one axis: ``period_px`` of the comb's fundamental and its harmonics."""

    period_px: float
    prominence: float
    minor_seen: bool
    subharmonic_seen: bool


@dataclass
class RectifiedPage:
    """The page with the grid axis-aligned at a uniform ``px_per_mm`` on both axes.

    ``to_source`` maps rectified px ``(k, 2)`` (x, y) to source image px.  ``grid_origin_px``
    is a crossing of major (5 mm) grid lines in the rectified image; lines lie every
    ``5 * px_per_mm`` px from it.  ``source_px_per_mm`` is the grid's scale in the source
    picture (median over the page), ``quarter_turns`` how many clockwise quarter turns were
    applied to the grid-aligned page to bring the traces upright.
    """

    image: np.ndarray
    px_per_mm: float
    grid_confidence: float
    grid_origin_px: tuple[float, float]
    to_source: Callable[[np.ndarray], np.ndarray]
    steps: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    source_px_per_mm: float = 0.0
    quarter_turns: int = 0
    major_mm: float = MAJOR_MM
    minor_lines: bool = True


# ---------------------------------------------------------------------------------------
# Pitch


def _profile_spectra(channel: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """Summed power spectra (length ``PITCH_PAD//2+1``) of tile profiles along ``axis``.

    ``axis=1``: profiles across x (vertical lines); ``axis=0``: across y.  ``weight`` (same
    shape, 0..1) masks out what is not page.
    """
    t = PITCH_TILE if min(channel.shape) >= PITCH_TILE else _pow2_floor(min(channel.shape))
    step = max(t // 2, 1)
    stack, _, _ = geometry._tile_stack(channel, t, step)
    wstack, _, _ = geometry._tile_stack(weight, t, step)
    keep = wstack.mean(axis=(1, 2)) > 0.8
    if not keep.any():
        keep = wstack.mean(axis=(1, 2)) >= wstack.mean(axis=(1, 2)).max() * 0.8
    prof = stack[keep].mean(axis=1 if axis == 1 else 2)
    prof = prof - prof.mean(axis=1, keepdims=True)
    prof *= np.hanning(t).astype(np.float32)
    spec = scipy.fft.rfft(prof, n=PITCH_PAD, axis=1)
    power = spec.real**2 + spec.imag**2
    power /= power.sum(axis=1, keepdims=True) + 1e-12
    total: np.ndarray = power.sum(axis=0)
    return total


def _pow2_floor(n: int) -> int:
    return 1 << max(int(n).bit_length() - 1, 3)


def _local_floor(spec: np.ndarray) -> np.ndarray:
    """Running median of the spectrum (the noise floor under the peaks).

    The window is wider than a peak's main lobe (4 bins of the unpadded tile) so that a
    peak does not lift its own floor, and narrow enough to follow the 1/f slope.
    """
    lobe = PITCH_PAD // PITCH_TILE
    size = 12 * lobe + 1
    return ndimage.median_filter(spec, size=size, mode="nearest") + 1e-12


def _prominence_at(prom: np.ndarray, f_bins: np.ndarray, spacing: float) -> np.ndarray:
    """Highest prominence near each (fractional) bin: within half an unpadded bin or 1 %,
    but never reaching a fifth of the way to the next harmonic (``spacing`` bins)."""
    half = max(PITCH_PAD // PITCH_TILE // 2, 1)
    tol = np.minimum(np.maximum(half, 0.01 * f_bins), 0.2 * spacing)
    lo = np.clip(np.floor(f_bins - tol).astype(int), 0, len(prom) - 1)
    hi = np.clip(np.ceil(f_bins + tol).astype(int) + 1, 1, len(prom))
    return np.array([prom[a:b].max() if b > a else 0.0 for a, b in zip(lo, hi, strict=True)])


def _peak_at(spec: np.ndarray, f_bin: float) -> tuple[float, float]:
    """Sub-bin position and power of the strongest bin within a half-lobe of ``f_bin``."""
    half = max(PITCH_PAD // PITCH_TILE // 2, 1)
    tol = max(half, 0.01 * f_bin)
    lo = max(int(np.floor(f_bin - tol)), 1)
    hi = min(int(np.ceil(f_bin + tol)) + 1, len(spec) - 1)
    if hi <= lo:
        return f_bin, 0.0
    i = lo + int(np.argmax(spec[lo:hi]))
    a, b, c = np.log(spec[i - 1 : i + 2] + 1e-20)
    den = a - 2 * b + c
    off = 0.5 * (a - c) / den if den < 0 else 0.0
    return i + float(np.clip(off, -0.5, 0.5)), float(spec[i])


def _comb_score(prom: np.ndarray, f0: float, hi: float) -> float:
    """How well harmonics of ``f0`` (bins) explain the peaks of a prominence spectrum."""
    harmonics = f0 * np.arange(1, int(hi / f0) + 1)
    if len(harmonics) == 0:
        return -np.inf
    p = _prominence_at(prom, harmonics, f0)
    sig = np.nonzero(p >= HARMONIC_PROMINENCE)[0]
    if len(sig) == 0:
        return -np.inf
    # Blur fades high harmonics: only those up to the last one seen must be there.
    p = p[: sig[-1] + 1]
    return float(np.sum(np.clip(np.log(p / HARMONIC_PROMINENCE), -1.5, 3.0)))


def axis_pitch(spec: np.ndarray, max_period_px: float) -> AxisPitch | None:
    """The grid comb in one axis' spectrum, or None when there is no sharp periodicity.

    The fundamental is the frequency whose harmonics best explain the peaks: each harmonic
    up to the last one seen scores the log of its prominence over a threshold, so a
    missing harmonic (what a sub-harmonic of the true fundamental has) costs, and the comb
    explaining the most peaks wins over one that skips every other peak.
    """
    n_pad = 2 * (len(spec) - 1)
    prom = spec / _local_floor(spec)
    lo = int(np.ceil(n_pad / max_period_px))
    hi = int(n_pad / 2.2)  # periods shorter than 2.2 px are not resolvable
    if hi <= lo + 2:
        return None
    band = prom[lo:hi]
    is_max = (band >= np.roll(band, 1)) & (band >= np.roll(band, -1))
    order = np.argsort(np.where(is_max, band, 0))[::-1][:8]
    peaks = [lo + int(i) for i in order if band[i] >= MIN_PEAK_PROMINENCE]
    if not peaks:
        return None
    threshold = HARMONIC_PROMINENCE
    best, best_score = float(peaks[0]), -np.inf
    for f in peaks:
        for k in range(1, 13):
            f0 = f / k
            if f0 < lo:
                break
            score = _comb_score(prom, f0, hi)
            if score > best_score + 1e-9:
                best, best_score = f0, score
    f0 = best
    # Refine from the harmonics (higher ones pin the frequency better).
    est, wts = [], []
    top = 0.0
    for k in range(1, int(hi / f0) + 1):
        pos, _ = _peak_at(spec, k * f0)
        p = prom[round(pos)]
        top = max(top, float(p))
        if p >= threshold and abs(pos - k * f0) < 0.2 * f0:
            est.append(pos / k)
            wts.append(k * k * p)
    if est:
        f0 = float(np.average(est, weights=wts))
    nyq = n_pad / 2.05
    p4, p5, p6 = (_peak_at(spec, k * f0)[1] if k * f0 < nyq else 0.0 for k in (4, 5, 6))
    minor = (5 * f0 < nyq and float(_prominence_at(prom, np.array([5 * f0]), f0)[0]) >= threshold
             and p5 > 2.0 * max(p4, p6))
    sub = f0 / 5 >= lo and float(_prominence_at(prom, np.array([f0 / 5]), f0 / 5)[0]) >= threshold
    return AxisPitch(period_px=n_pad / f0, prominence=top,
                     minor_seen=bool(minor), subharmonic_seen=bool(sub))


@dataclass(frozen=True)
class GridPitch:
    """Major-line period on each axis (px of the frame measured in) and what was seen."""

    major_px: tuple[float, float]
    major_mm: float  # what the measured fundamental is in mm: 5 normally, 1 for a 1-mm-only grid
    minor_lines: bool
    prominence: float


def measure_pitch(channel: np.ndarray, weight: np.ndarray, extent_px: float) -> GridPitch:
    """Grid period on both axes of an axis-aligned ``channel``; raises NoGridError."""
    # A fundamental needs 4 cycles per tile to be resolved from its neighbours' main lobes.
    max_period = min(min(channel.shape) / 3.0, PITCH_TILE / 4.0)
    pitches, proms = [], []
    for axis in (1, 0):
        spec = _profile_spectra(channel, weight, axis)
        ap = axis_pitch(spec, max_period)
        if ap is None:
            raise NoGridError("no regular line spacing along " + ("x" if axis else "y"))
        pitches.append(ap)
        proms.append(spec / _local_floor(spec))
    px, py = pitches
    # Both axes show the same grid; one whose major lines are faint may report a harmonic
    # (or sub-harmonic) of the fundamental.  Then both periods are tried on both axes.
    ratio = px.period_px / py.period_px
    for k in (2, 3, 4, 5):
        if abs(ratio / k - 1) < 0.12 or abs(ratio * k - 1) < 0.12:
            short, long_ = sorted((px.period_px, py.period_px))
            hi = PITCH_PAD / 2.2

            def joint(period: float, hi: float = hi) -> float:
                return sum(_comb_score(pr, PITCH_PAD / period, hi) for pr in proms)

            best = long_ if joint(long_) >= joint(short) else short
            minor = px.minor_seen or py.minor_seen

            def adopt(ap: AxisPitch, best: float = best, minor: bool = minor) -> AxisPitch:
                period = ap.period_px if abs(ap.period_px / best - 1) < 0.12 else best
                return AxisPitch(period, ap.prominence, minor, ap.subharmonic_seen)

            px, py = adopt(px), adopt(py)
            break
    ratio = px.period_px / py.period_px
    if not 0.8 < ratio < 1.25:
        raise NoGridError(f"line spacing differs between axes ({ratio:.2f})")
    minor = px.minor_seen or py.minor_seen
    period = float(np.sqrt(px.period_px * py.period_px))
    if minor:
        major_mm = MAJOR_MM
    else:
        # One level of lines only: 5 mm lines (common on plain-paper prints) unless there
        # are so many of them that the page would be metres wide.
        major_mm = MINOR_MM if extent_px / period > MAX_SINGLE_LEVEL_MAJORS else MAJOR_MM
    return GridPitch((px.period_px, py.period_px), major_mm, minor,
                     float(min(px.prominence, py.prominence)))


# ---------------------------------------------------------------------------------------
# Phase field


def demodulate(channel: np.ndarray, period_px: float, axis: int, step: int,
               window_px: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Local phase and amplitude of the grid along ``axis``, sampled every ``step`` px.

    Lines at ``x = (n - r) * period`` give phase ``r`` (periods, in [-0.5, 0.5)):
    ``x + r * period`` is where the point would be on a perfectly regular grid.  Sample
    ``(i, j)`` sits at px ``(j * step + (step - 1) / 2, i * step + (step - 1) / 2)``.
    The demodulated product is box-averaged down to the sample lattice first and then
    Gaussian-smoothed there, which is the same low-pass at a fraction of the cost.  The
    window is sized on ``window_px`` (default: the period), 0.75 across the lines and 1.5
    along them.
    """
    h, w = channel.shape
    h, w = h - h % step, w - w % step
    ch = channel[:h, :w]
    coord = np.arange(w if axis == 1 else h, dtype=np.float64)
    cos_c = np.cos(2 * np.pi * coord / period_px).astype(np.float32)
    sin_c = -np.sin(2 * np.pi * coord / period_px).astype(np.float32)
    win = period_px if window_px is None else window_px
    if axis == 1:
        re, im = ch * cos_c[None, :], ch * sin_c[None, :]
        sx, sy = 0.75 * win / step, 1.5 * win / step
    else:
        re, im = ch * cos_c[:, None], ch * sin_c[:, None]
        sx, sy = 1.5 * win / step, 0.75 * win / step
    size = (w // step, h // step)
    lo_re, lo_im, energy = (
        cv2.GaussianBlur(cv2.resize(layer, size, interpolation=cv2.INTER_AREA), (0, 0),
                         sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
        for layer in (re, im, ch * ch))
    amp = np.sqrt(lo_re**2 + lo_im**2) / (np.sqrt(np.maximum(energy, 0)) + 1e-6)
    phase = np.arctan2(lo_im, lo_re) / (2 * np.pi)
    return phase.astype(np.float32), amp.astype(np.float32)


def unwrap_quality_guided(wrapped: np.ndarray, quality: np.ndarray, valid: np.ndarray
                          ) -> np.ndarray:
    """Unwrap a phase map (periods) along the tree of its best neighbour links.

    Quality-guided unwrapping: the maximum spanning tree of the sample graph, each link
    weighted by the poorer quality of its two ends, is the set of paths that avoid weak
    samples; each sample takes the branch nearest its parent on the tree.  Only the
    connected region holding the best sample is unwrapped; the rest stays NaN.
    """
    h, w = wrapped.shape
    out = np.full(h * w, np.nan)
    if not valid.any():
        return out.reshape(h, w)
    q = np.where(valid, quality, 0.0).ravel()
    idx = np.arange(h * w).reshape(h, w)
    pairs = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]
    rows, cols, wts = [], [], []
    for a_, b_ in pairs:
        a_, b_ = a_.ravel(), b_.ravel()
        ok = valid.ravel()[a_] & valid.ravel()[b_]
        rows.append(a_[ok])
        cols.append(b_[ok])
        wts.append(1.0 / (np.minimum(q[a_[ok]], q[b_[ok]]) + 1e-6))
    graph = csr_matrix((np.concatenate(wts), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(h * w, h * w))
    tree = minimum_spanning_tree(graph)
    _, comp = connected_components(tree, directed=False)
    sizes = np.bincount(comp, weights=valid.ravel().astype(float))
    root = int(np.argmax(np.where(comp == int(np.argmax(sizes)), q, -1.0)))
    order, pred = breadth_first_order(tree, root, directed=False, return_predecessors=True)
    ph = wrapped.ravel().astype(np.float64)
    step = ph[order[1:]] - ph[pred[order[1:]]]
    step -= np.round(step)
    res = out.tolist()
    res[root] = float(ph[root])
    for node, parent, d in zip(order[1:].tolist(), pred[order[1:]].tolist(), step.tolist(),
                               strict=True):
        res[node] = res[parent] + d
    return np.asarray(res).reshape(h, w)


def smooth_fill(values: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution: a smooth field through weighted samples.

    Away from the samples the field fades to 0 (callers smooth residuals from a trend).
    """
    ok = (weight > 0) & np.isfinite(values)
    v = np.where(ok, values, 0.0).astype(np.float32)
    w = np.where(ok, weight, 0.0).astype(np.float32)
    num = cv2.GaussianBlur(v * w, (0, 0), sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    full = float(np.percentile(den[ok], 90)) if ok.any() else 1.0
    out: np.ndarray = num / (den + 0.1 * full + 1e-12) * (1.1 * full / (full + 1e-12))
    return np.where(den > 0.02 * full, out, out * den / (0.02 * full + 1e-12))


def poly_trend(values: np.ndarray, weight: np.ndarray, degree: int = 3) -> np.ndarray:
    """Robust weighted polynomial surface through a lattice field (extrapolates sanely)."""
    h, w = values.shape
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx / max(w - 1, 1)) * 2 - 1
    v = (yy / max(h - 1, 1)) * 2 - 1
    terms = [u**i * v**j for i in range(degree + 1) for j in range(degree + 1 - i)]
    basis = np.stack([t.ravel() for t in terms], axis=1)
    ok = ((weight > 0) & np.isfinite(values)).ravel()
    if ok.sum() < 3 * basis.shape[1]:
        level = float(np.nanmedian(values[weight > 0])) if (weight > 0).any() else 0.0
        return np.full((h, w), level)
    a, y, w0 = basis[ok], values.ravel()[ok], weight.ravel()[ok].astype(np.float64)
    wt = w0.copy()
    coef = np.zeros(basis.shape[1])
    for _ in range(4):  # Cauchy IRLS: unwrapping slips are outliers of a whole period
        aw = a * wt[:, None]
        coef = np.linalg.solve(aw.T @ a + 1e-9 * np.eye(a.shape[1]), aw.T @ y)
        res = y - a @ coef
        wt = w0 / (1.0 + (res / 0.1) ** 2)
    # Beyond the samples' bounding box hold the trend at its edge: no wild extrapolation.
    on = (weight > 0) & np.isfinite(values)
    rows, cols = np.nonzero(on)
    uc = np.clip(u, u[0, cols.min()], u[0, cols.max()])
    vc = np.clip(v, v[rows.min(), 0], v[rows.max(), 0])
    clamped = np.stack([(uc**i * vc**j).ravel() for i in range(degree + 1)
                        for j in range(degree + 1 - i)], axis=1)
    trend: np.ndarray = (clamped @ coef).reshape(h, w)
    return trend


@dataclass
class PhaseField:
    """Smooth grid phase on a coarse lattice of the detection frame (periods)."""

    rx: np.ndarray  # (gh, gw) phase of the vertical lines (x axis)
    ry: np.ndarray
    valid: np.ndarray  # (gh, gw) samples where both axes showed the grid
    step: int
    residual_mm: float  # RMS misfit of the measured phase to the smooth field


def _follow(ph: np.ndarray, amp: np.ndarray, inside: np.ndarray, period_mm: float
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Smooth unwrapped phase through the samples where the lines show.

    The field is a polynomial trend plus, on a sheet whose grid departs from the trend by
    more than :data:`LOCAL_WARP_MM` (RMS over the page), those local departures. Returns
    the field (periods), the samples used, and the RMS misfit (periods).
    """
    valid = inside & (amp > max(MIN_PHASE_AMPLITUDE,
                                0.35 * float(np.percentile(amp[inside], 75))))
    if valid.sum() < 16:
        raise NoGridError("grid too faint to follow")
    un = unwrap_quality_guided(ph, amp, valid)
    wt = np.where(valid, amp, 0.0)
    degree = 3 if valid.sum() > 600 else (2 if valid.sum() > 200 else 1)
    trend = poly_trend(un, wt, degree)
    smooth = trend + smooth_fill(un - trend, wt, sigma=1.5)
    # Snap every sample to the branch nearest the smooth field, drop those that still
    # disagree with their neighbourhood (text, trace, creases) and fit again.
    snapped = ph + np.round(smooth - ph)
    good = valid & (np.abs(snapped - smooth) < 0.15)
    wt = np.where(good, amp, 0.0)
    trend = poly_trend(snapped, wt, degree)
    local = smooth_fill(snapped - trend, wt, sigma=1.5)
    # the local departure's RMS over the page, in mm, says whether it is paper or noise
    if good.any():
        local_mm = period_mm * float(np.sqrt(np.average(local[good] ** 2, weights=wt[good])))
        lo, hi = LOCAL_WARP_MM
        local *= float(np.clip((local_mm - lo) / (hi - lo), 0.0, 1.0))
    smooth = trend + local
    res = (ph + np.round(smooth - ph)) - smooth
    misfit = float(np.sqrt(np.mean(res[good] ** 2))) if good.any() else 1.0
    return smooth, valid, misfit


def _major_class(channel: np.ndarray, fine: np.ndarray, minor_px: float, axis: int,
                 step: int) -> int:
    """Which of every five minor lines is the major one: the class whose pixels respond most.

    ``fine`` is the minor-line phase on the sample lattice; each pixel within a fifth of a
    period of a minor line is binned by the line's index modulo 5, and the median response
    per bin (robust to trace and text crossing the lines) picks the major lines.
    """
    h, w = channel.shape
    r = cv2.resize(fine.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    # The lattice samples sit at (i * step + (step - 1) / 2); resize spreads them from the
    # sample centres at (i + 0.5) * step - 0.5, the same points.
    coord = np.arange(w if axis == 1 else h, dtype=np.float32)
    base = coord[None, :] if axis == 1 else coord[:, None]
    u = base / minor_px + r
    idx = np.round(u)
    near = np.abs(u - idx) < 0.2
    cls = np.mod(idx[near], 5).astype(int)
    vals = channel[near]
    med = [float(np.median(vals[cls == j])) if np.any(cls == j) else 0.0 for j in range(5)]
    return int(np.argmax(med))


def phase_field(channel: np.ndarray, period_px: tuple[float, float], inside: np.ndarray,
                period_mm: float = MAJOR_MM, minor_lines: bool = False,
                step: int = UNWRAP_STEP) -> PhaseField:
    """Unwrapped, outlier-free, smooth grid phase (in periods) for both axes.

    ``period_px`` is the fundamental on each axis, ``period_mm`` what it is on paper (5 mm,
    or 1 mm for a grid showing a single level of lines); the demodulation window always
    spans about 5 mm.  With minor lines on the page, their five-times denser, usually
    stronger comb places the lines, and :func:`_major_class` says which are major.
    """
    h, w = channel.shape
    gh, gw = h // step, w // step
    ins = cv2.resize(inside[: gh * step, : gw * step], (gw, gh),
                     interpolation=cv2.INTER_AREA) > 0.99
    if not ins.any():
        raise NoGridError("grid too faint to follow")
    out, masks, misfit_mm = [], [], []
    for axis, per in ((1, period_px[0]), (0, period_px[1])):
        ph1, a1 = demodulate(channel, per, axis, step, window_px=per * MAJOR_MM / period_mm)
        field_, valid, misfit = _follow(ph1, a1, ins, period_mm)
        misfit *= period_mm
        if minor_lines:
            ph5, a5 = demodulate(channel, per / 5, axis, step, window_px=per)
            try:
                fine, valid5, misfit5 = _follow(ph5, a5, ins, MINOR_MM)
            except NoGridError:
                fine = None
            if fine is not None and misfit5 * MINOR_MM < misfit:
                j = _major_class(channel, fine, per / 5, axis, step)
                field_ = (fine - j) / 5
                valid, misfit = valid5, misfit5 * MINOR_MM
        out.append(field_)
        masks.append(valid)
        misfit_mm.append(misfit)
    valid = masks[0] & masks[1]
    if valid.sum() < 16:
        raise NoGridError("grid too faint to follow")
    return PhaseField(out[0], out[1], valid, step, float(np.hypot(misfit_mm[0], misfit_mm[1])))


def _sample(field_: np.ndarray, x: np.ndarray, y: np.ndarray, step: int) -> np.ndarray:
    """Bilinear sample of a coarse-lattice field at detection-frame px."""
    gx = (x - (step - 1) / 2) / step
    gy = (y - (step - 1) / 2) / step
    res: np.ndarray = ndimage.map_coordinates(field_, [gy.ravel(), gx.ravel()], order=1,
                                              mode="nearest").reshape(x.shape)
    return res


def ideal_to_frame(field_: PhaseField, period_px: tuple[float, float], X: np.ndarray,
                   Y: np.ndarray, iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``x + P rx(x, y) = X`` and ``y + P ry(x, y) = Y`` (regular grid -> frame px)."""
    x, y = X.astype(np.float64), Y.astype(np.float64)
    for _ in range(iterations):
        x = X - period_px[0] * _sample(field_.rx, x, y, field_.step)
        y = Y - period_px[1] * _sample(field_.ry, x, y, field_.step)
    return x, y


# ---------------------------------------------------------------------------------------
# The whole stage


def _suppress_trace(channel: np.ndarray, frame_rgb: np.ndarray,
                    period_px: float | None = None) -> None:
    """Zero the grid channel on the trace, so a baseline cannot pose as a grid line.

    Dark grid lines (black or grey grids, binarised faxes) look like ink too.  With the
    grid period known, an ink pixel with ink one period away both along x and along y
    sits on the lattice (a line continues one way and has a neighbour the other way) and
    is kept; a trace's baseline has no twin 5 mm above or below, a QRS spike none 5 mm
    aside.  Without the period, nothing is zeroed when "ink" covers much of the page
    (the grid itself is dark).
    """
    ink = geometry.ink_mask(frame_rgb)
    if period_px is not None:
        p = round(period_px)
        near = cv2.dilate(ink.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        along_x = _shifted(near, p, 1) | _shifted(near, -p, 1)
        along_y = _shifted(near, p, 0) | _shifted(near, -p, 0)
        channel[ink & ~(along_x & along_y)] = 0.0
    elif ink.mean() < MAX_TRACE_COVER:
        channel[ink] = 0.0


def _shifted(mask: np.ndarray, by: int, axis: int) -> np.ndarray:
    """``mask`` moved by ``by`` px along ``axis``, False where it moved in from outside."""
    out = np.zeros_like(mask)
    src = [slice(None), slice(None)]
    dst = [slice(None), slice(None)]
    if by >= 0:
        src[axis], dst[axis] = slice(0, mask.shape[axis] - by), slice(by, None)
    else:
        src[axis], dst[axis] = slice(-by, None), slice(0, mask.shape[axis] + by)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _inside_mask(shape_hw: tuple[int, int], work_to_frame: np.ndarray,
                 work_shape: tuple[int, int]
                 ) -> np.ndarray:
    """Detection-frame pixels that come from inside the work image (float 0..1)."""
    h, w = work_shape
    ones = np.ones((h, w), np.uint8)
    m = cv2.warpPerspective(ones, work_to_frame, (shape_hw[1], shape_hw[0]),
                            flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    m = cv2.erode(m, np.ones((9, 9), np.uint8))
    return m.astype(np.float32)


def _edge_points(lattice: geometry.TileLattice, work_hw: tuple[int, int]) -> np.ndarray:
    """Picture-edge points the grid reaches: for each tile that showed the grid too near
    an edge for another tile to fit beyond it, its centre moved onto that edge.

    Tiles are laid only where a whole one fits, so on a small picture cropped to the grid
    (a web image of a print) up to a tile step at the edges (~20 mm at 3 px/mm, often a
    whole trace row) is grid that no tile saw.
    """
    c = lattice.centers[lattice.valid]
    reach = geometry.TILE / 2 + geometry.TILE_STEP
    out = [np.empty((0, 2))]
    for axis, size in ((0, work_hw[1]), (1, work_hw[0])):
        for near, edge in ((c[:, axis] < reach, 0.0), (c[:, axis] > size - reach, size - 1.0)):
            moved = c[near].copy()
            moved[:, axis] = edge
            out.append(moved)
    return np.concatenate(out)


def _frame_box(h_work_to_frame: np.ndarray, lattice: geometry.TileLattice, pad: float,
               edges: np.ndarray) -> tuple[float, float, float, float]:
    """Bounding box, in a frame, of the tiles that showed the grid (plus ``pad``) and of
    the picture-edge points it reaches."""
    c = geometry.apply_homography(h_work_to_frame, lattice.centers[lattice.valid])
    lo = np.percentile(c, 0.5, axis=0) - pad
    hi = np.percentile(c, 99.5, axis=0) + pad
    if len(edges):
        e = geometry.apply_homography(h_work_to_frame, edges)
        lo = np.minimum(lo, np.percentile(e, 0.5, axis=0))
        hi = np.maximum(hi, np.percentile(e, 99.5, axis=0))
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _framed(h_frame: np.ndarray, lattice: geometry.TileLattice, work_hw: tuple[int, int]
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """Work px -> px of an image holding the grid's tiles, and that image's size (w, h)."""
    x0, y0, x1, y1 = _frame_box(h_frame, lattice, geometry.TILE / 2,
                                _edge_points(lattice, work_hw))
    # Keep the frame no larger than the work image's area allows (extreme perspective).
    area_scale = min(1.0, np.sqrt(4.0 * work_hw[0] * work_hw[1]
                                  / max((x1 - x0) * (y1 - y0), 1.0)))
    h1 = _translate_scale(area_scale, area_scale, x0, y0) @ h_frame
    return h1, (int(np.ceil((x1 - x0) * area_scale)), int(np.ceil((y1 - y0) * area_scale)))


def _refine_perspective(rgb: np.ndarray, lattice: geometry.TileLattice, h_frame: np.ndarray,
                        h1: np.ndarray, size1: tuple[int, int]) -> np.ndarray:
    """A second look at the line families in the nearly straightened frame.

    Tile directions are most precise near the axes and without perspective spreading the
    spectral peaks, so the residual homography found there sharpens the first estimate.
    """
    frame = cv2.warpPerspective(rgb, h1, size1, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    channel = geometry.grid_channels(frame)[lattice.channel]
    again = geometry.tile_lattice(geometry.tile_spectra(channel), lattice.channel)
    if again.valid.sum() < max(8, 0.5 * lattice.valid.sum()):
        return h_frame
    try:
        residual = geometry.rectifying_homography(again, frame.shape[:2])
    except NoGridError:
        return h_frame
    refined: np.ndarray = residual @ h1
    # Keep the original's scale: unit area at the grid's centroid, as before.
    c = np.average(lattice.centers[lattice.valid], axis=0, weights=lattice.strength[lattice.valid])
    s = np.sqrt(abs(np.linalg.det(geometry._jacobian(refined, c))))
    return np.diag([1 / s, 1 / s, 1.0]) @ refined


def _translate_scale(sx: float, sy: float, x0: float, y0: float) -> np.ndarray:
    return np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy], [0, 0, 1.0]])


def rectify(image_rgb: np.ndarray, *, target_px_per_mm: float = DEFAULT_PX_PER_MM,
            orient: bool = True, debug: bool = True) -> RectifiedPage:
    """Straighten the page so the grid is axis-aligned at a uniform px/mm.

    Raises :class:`~pipeline.errors.NoGridError` when the picture shows no ECG grid.
    ``orient=False`` skips the quarter-turn decision (the grid-aligned frame closest to the
    picture's own orientation is kept); ``debug`` adds small pictures to ``steps``.
    """
    if image_rgb.ndim == 2:
        image_rgb = cv2.cvtColor(image_rgb, cv2.COLOR_GRAY2RGB)
    image_rgb = np.ascontiguousarray(image_rgb[..., :3])
    seconds: dict[str, float] = {}
    steps: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()

    # 1. Perspective from the line families, in a downscaled copy.
    work = geometry.to_work_image(image_rgb)
    lattice = geometry.best_lattice(work.rgb)
    h_frame = geometry.rectifying_homography(lattice, work.rgb.shape[:2])
    h1, size1 = _framed(h_frame, lattice, work.rgb.shape[:2])
    h_frame = _refine_perspective(work.rgb, lattice, h_frame, h1, size1)
    h1, size1 = _framed(h_frame, lattice, work.rgb.shape[:2])
    frame1 = cv2.warpPerspective(work.rgb, h1, size1, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    gray1 = geometry.grid_channels(frame1)[lattice.channel]
    _suppress_trace(gray1, frame1)
    inside1 = _inside_mask((size1[1], size1[0]), h1, work.rgb.shape[:2])
    seconds["perspective"] = time.perf_counter() - t0

    # 2. Pitch on both axes.
    t1 = time.perf_counter()
    pitch = measure_pitch(gray1, inside1, float(max(size1)))
    det_scale = (DETECT_PX_PER_MM * pitch.major_mm / pitch.major_px[0],
                 DETECT_PX_PER_MM * pitch.major_mm / pitch.major_px[1])
    h2 = np.diag([det_scale[0], det_scale[1], 1.0]) @ h1
    size2 = (int(np.ceil(size1[0] * det_scale[0])), int(np.ceil(size1[1] * det_scale[1])))
    if size2[0] * size2[1] > 12_000_000:
        raise NoGridError("implausible grid scale")
    frame_rgb = cv2.warpPerspective(work.rgb, h2, size2, flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
    channel2 = geometry.grid_channels(frame_rgb)[lattice.channel]
    _suppress_trace(channel2, frame_rgb, DETECT_PX_PER_MM * pitch.major_mm)
    inside2 = _inside_mask((size2[1], size2[0]), h2, work.rgb.shape[:2])
    period = DETECT_PX_PER_MM * pitch.major_mm
    seconds["pitch"] = time.perf_counter() - t1

    # 3. Dense phase field -> regular grid.
    t2 = time.perf_counter()
    field_ = phase_field(channel2, (period, period), inside2, period_mm=pitch.major_mm,
                         minor_lines=pitch.minor_lines and pitch.major_mm == MAJOR_MM)
    seconds["dewarp"] = time.perf_counter() - t2

    # 4. Output extent in paper mm (regular-grid coordinates), and the orientation.
    t3 = time.perf_counter()
    mm_lo, mm_hi = _page_extent_mm(field_, period, inside2)

    def mm_to_source(mm: np.ndarray) -> np.ndarray:
        X = mm[..., 0] * DETECT_PX_PER_MM
        Y = mm[..., 1] * DETECT_PX_PER_MM
        x, y = ideal_to_frame(field_, (period, period), X, Y)
        w_pts = geometry.apply_homography(np.linalg.inv(h2), np.stack([x.ravel(), y.ravel()], 1))
        src = (w_pts + 0.5) / work.scale - 0.5
        return src.reshape(*mm.shape[:-1], 2)

    out_ppm = float(target_px_per_mm)
    src_ppm = _median_scale(mm_to_source, mm_lo, mm_hi)
    out_ppm = min(out_ppm, max(src_ppm, 2.0))  # never enlarge a low-resolution picture
    # Orientation, judged on a small upright rendering of the page.
    small_ppm = geometry.ORIENT_PX_PER_MM
    turns = 0
    if orient:
        small = _render(image_rgb, mm_to_source, mm_lo, mm_hi, small_ppm, 0)
        turns = geometry.quarter_turns(illumination.normalize(small, small_ppm), small_ppm)
        if debug:
            steps["orientation_input"] = illumination.normalize(small, small_ppm)
    seconds["orientation"] = time.perf_counter() - t3

    # 5. One resampling of the full-resolution picture, then light and colour.
    t4 = time.perf_counter()
    out, to_source, origin = _render_full(image_rgb, mm_to_source, mm_lo, mm_hi, out_ppm, turns,
                                          pitch.major_mm)
    seconds["resample"] = time.perf_counter() - t4
    t5 = time.perf_counter()
    out = illumination.normalize(out, out_ppm)
    seconds["illumination"] = time.perf_counter() - t5

    confidence = grid_confidence(field_, pitch)
    if debug:
        steps["grid_frame"] = _thumb(frame_rgb)
        steps["grid_phase"] = _thumb(_phase_picture(field_))
    return RectifiedPage(
        image=out,
        px_per_mm=out_ppm,
        grid_confidence=confidence,
        grid_origin_px=origin,
        to_source=to_source,
        steps=steps,
        seconds=seconds,
        source_px_per_mm=src_ppm,
        quarter_turns=turns,
        major_mm=MAJOR_MM,
        minor_lines=pitch.minor_lines,
    )


def _page_extent_mm(field_: PhaseField, period: float, inside: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Paper-mm box to render: where the grid showed plus a margin, within the picture."""

    def extent(mask: np.ndarray, lo_pct: float) -> tuple[np.ndarray, np.ndarray]:
        gy, gx = np.nonzero(mask)
        x = gx * field_.step + (field_.step - 1) / 2 + period * field_.rx[gy, gx]
        y = gy * field_.step + (field_.step - 1) / 2 + period * field_.ry[gy, gx]
        pts = np.stack([x, y], axis=1) / DETECT_PX_PER_MM
        return np.percentile(pts, lo_pct, axis=0), np.percentile(pts, 100 - lo_pct, axis=0)

    lo, hi = extent(field_.valid, 0.5)
    step = field_.step
    ins = inside[(step - 1) // 2 :: step, (step - 1) // 2 :: step][: field_.valid.shape[0],
                                                                  : field_.valid.shape[1]]
    pic_lo, pic_hi = extent(ins > 0.5, 0.0)
    return np.maximum(lo - PAGE_MARGIN_MM, pic_lo), np.minimum(hi + PAGE_MARGIN_MM, pic_hi)


def _median_scale(mm_to_source: Callable[[np.ndarray], np.ndarray], mm_lo: np.ndarray,
                  mm_hi: np.ndarray) -> float:
    """Median source px per mm over the page, from +-10 mm crosses on a 5 x 5 lattice."""
    half = float(min(10.0, np.min(mm_hi - mm_lo) / 8))
    gx, gy = np.meshgrid(*(np.linspace(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), 5)
                           for lo, hi in zip(mm_lo, mm_hi, strict=True)))
    c = np.stack([gx.ravel(), gy.ravel()], axis=1)
    d = np.array([[-half, 0.0], [half, 0.0], [0.0, -half], [0.0, half]])
    p = mm_to_source((c[:, None, :] + d[None]).reshape(-1, 2)).reshape(len(c), 4, 2)
    jx = (p[:, 1] - p[:, 0]) / (2 * half)
    jy = (p[:, 3] - p[:, 2]) / (2 * half)
    det = np.abs(jx[:, 0] * jy[:, 1] - jx[:, 1] * jy[:, 0])
    return float(np.median(np.sqrt(det)))


def grid_confidence(field_: PhaseField, pitch: GridPitch) -> float:
    """0..1: how well a smooth regular grid explains the measured grid lines."""
    fit = float(np.exp(-((field_.residual_mm / 0.35) ** 2)))
    cover = float(np.clip(field_.valid.mean() / 0.5, 0.0, 1.0))
    sharp = float(np.clip(np.log10(pitch.prominence) / 2.5, 0.0, 1.0))
    return round(fit * (0.5 + 0.5 * cover) * (0.6 + 0.4 * sharp), 3)


def _mesh(w: int, h: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions whose values ``cv2.resize`` (INTER_LINEAR) spreads exactly."""
    wc, hc = -(-w // step) + 1, -(-h // step) + 1
    xs = (np.arange(wc) + 0.5) * w / wc - 0.5
    ys = (np.arange(hc) + 0.5) * h / hc - 0.5
    return np.meshgrid(xs, ys)


def _render(image_rgb: np.ndarray, mm_to_source: Callable[[np.ndarray], np.ndarray],
            mm_lo: np.ndarray, mm_hi: np.ndarray, ppm: float, turns: int) -> np.ndarray:
    out, _, _ = _render_full(image_rgb, mm_to_source, mm_lo, mm_hi, ppm, turns, MAJOR_MM)
    return out


def _render_full(image_rgb: np.ndarray, mm_to_source: Callable[[np.ndarray], np.ndarray],
                 mm_lo: np.ndarray, mm_hi: np.ndarray, ppm: float, turns: int, major_mm: float
                 ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray],
                            tuple[float, float]]:
    """Resample the page at ``ppm`` px/mm, turned by ``turns`` quarter turns (clockwise).

    Returns the image, the rectified-px -> source-px map and a major grid crossing (px).
    """
    span = mm_hi - mm_lo
    w_up, h_up = round(span[0] * ppm), round(span[1] * ppm)
    k = turns % 4
    w, h = (w_up, h_up) if k % 2 == 0 else (h_up, w_up)
    mx, my = _mesh(w, h, MAP_STEP)
    ux, uy = _unturn(mx, my, w_up, h_up, k)
    mm = np.stack([ux / ppm + mm_lo[0], uy / ppm + mm_lo[1]], axis=-1)
    src = mm_to_source(mm)
    sx = src[..., 0].astype(np.float32)
    sy = src[..., 1].astype(np.float32)
    map_x = cv2.resize(sx, (w, h), interpolation=cv2.INTER_LINEAR)
    map_y = cv2.resize(sy, (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.remap(image_rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=(255, 255, 255))

    wc, hc = sx.shape[1], sx.shape[0]

    def to_source(pts: np.ndarray) -> np.ndarray:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        # cv2.resize INTER_LINEAR: coarse index = (x + 0.5) * wc / w - 0.5
        ci = (p[:, 0] + 0.5) * wc / w - 0.5
        cj = (p[:, 1] + 0.5) * hc / h - 0.5
        xs = ndimage.map_coordinates(sx.astype(np.float64), [cj, ci], order=1, mode="nearest")
        ys = ndimage.map_coordinates(sy.astype(np.float64), [cj, ci], order=1, mode="nearest")
        return np.stack([xs, ys], axis=1)

    # A major crossing: paper mm multiples of major_mm, nearest the top-left.
    first = np.ceil(mm_lo / major_mm) * major_mm
    ox, oy = (first - mm_lo) * ppm
    cx, cy = _turn_point(ox, oy, w_up, h_up, k)
    # After a turn the crossing nearest the top-left is another one; reduce modulo pitch.
    pitch_px = major_mm * ppm
    origin = (float(cx % pitch_px), float(cy % pitch_px))
    return out, to_source, origin


def _unturn(x: np.ndarray, y: np.ndarray, w_up: int, h_up: int, k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Output px of a page turned ``k`` quarter turns clockwise -> px of the upright page."""
    if k == 0:
        return x, y
    if k == 1:  # clockwise: upright (u, v) -> (h_up - 1 - v, u)
        return y, h_up - 1 - x
    if k == 2:
        return w_up - 1 - x, h_up - 1 - y
    return w_up - 1 - y, x


def _turn_point(u: float, v: float, w_up: int, h_up: int, k: int) -> tuple[float, float]:
    """Upright px -> px of the page turned ``k`` quarter turns clockwise."""
    if k == 0:
        return u, v
    if k == 1:
        return h_up - 1 - v, u
    if k == 2:
        return w_up - 1 - u, h_up - 1 - v
    return v, w_up - 1 - u


def _thumb(img: np.ndarray, long_side: int = 800) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(1.0, long_side / max(h, w))
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA)


def _phase_picture(field_: PhaseField) -> np.ndarray:
    """Phase of both axes as hue-like colour (debug)."""
    r = ((field_.rx - np.nanmin(field_.rx)) * 60) % 255
    g = ((field_.ry - np.nanmin(field_.ry)) * 60) % 255
    b = field_.valid * 255.0
    return np.dstack([r, g, b]).astype(np.uint8)
