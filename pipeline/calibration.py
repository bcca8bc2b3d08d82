"""Stage 5: row traces (px) -> 12 leads in mV at ``fs``, with per-lead confidence.

* **Time**: column ``x`` of a row is time ``(x - x_start) / (speed * px_per_mm)``; the
  lead in column ``c`` of a ``k``-column row owns samples ``[c, c+1) * n / k`` (the
  print convention, :func:`pipeline.leads.segment_span`). Values between pixel columns
  are linearly interpolated (a spike's strokes read at one column are first spread
  across it, :func:`spread_ties`); gaps longer than ``MAX_GAP_S`` stay NaN.
* **Voltage**: ``(zero_y - y) / (gain * px_per_mm)``, with ``zero_y`` the base of the
  row's calibration pulse (the printer's 0 mV), or the row's isoelectric line.
* **Repeated leads** (II on a 3x4+1 page, V1/II/V5 on 3x4+3) are averaged where both
  printings were read and agree, which halves the noise power there.
* **Limb-lead consistency**: the six limb leads are two degrees of freedom (Einthoven:
  III = II - I; Goldberger: aVR, aVL, aVF from I and II). Wherever three or more limb
  leads were read at the same instant they are projected onto that plane by robust
  (Huber-weighted) least squares, so independent reading errors partly cancel and a
  single gross error is outvoted by the others instead of spread onto them.
* **Band limit**: a printed trace carries no detail finer than its pen (0.2-0.5 mm), so
  what a reading holds above ``PRINT_CYCLES_PER_MM`` cycles per paper millimetre (42.5 Hz
  at 25 mm/s) is pixel-step jitter; each read stretch is low-passed there (zero phase).
* **Trust**: a lead whose path ran mostly over blank paper is NaN, never a plausible
  invention; short gaps are interpolated, long ones left NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.signal

from pipeline.layout import PageLayout
from pipeline.leads import LEAD_INDEX, LEADS
from pipeline.masks import runs
from pipeline.traces import RowTrace

MAX_GAP_S = 0.04
"""Gaps in a trace up to this long are interpolated, and a lead's stretch is continued
this far past its first and last readings; longer ones stay NaN."""
NEIGHBOUR_GUARD_PX = 1.0
"""Columns next to a lead boundary left to the neighbour when no separator is printed
(the path restarts at the boundary, so only a merged pen cap can mislead there)."""
START_GUARD_PX = 2.0
"""Columns at the start of a row left out of its first lead: the calibration pulse's
falling edge ends there, and read as trace it makes a spike at 0 s."""
SEPARATOR_GUARD_PENS = 0.5
"""Pen widths left out on each side of a lead boundary where separator ticks are printed:
the tick is one pen wide and centred on the boundary (a wider guard loses the QRS that
falls on it)."""
MIN_COVERAGE = 0.7
"""A lead is NaN when less than this share of its span was read from ink."""
MIN_CONFIDENCE = 0.35
SPREAD_PX = 2.0
"""Width (px) over which points read at one column (a spike's strokes) are spread in x."""
HUBER_MV = 0.08
"""Residual (mV) beyond which a limb lead's reading is down-weighted."""
AGREE_MV = 0.12
"""Two printings of a lead are averaged only if they differ by less than this (RMS)."""
LIMB_BASIS: dict[str, tuple[float, float]] = {
    "I": (1.0, 0.0), "II": (0.0, 1.0), "III": (-1.0, 1.0),
    "aVR": (-0.5, -0.5), "aVL": (1.0, -0.5), "aVF": (-0.5, 1.0),
}
"""Each limb lead as a combination of leads I and II."""
PRINT_CYCLES_PER_MM = 1.7
"""Finest detail a printed trace holds, cycles per mm of paper (42.5 Hz at 25 mm/s)."""
LOWPASS_ORDER = 3
"""Butterworth order of that low-pass (run forward and back: sixth-order roll-off).
Measured on the bench sets against 2.0 cycles/mm at order 2: +0.05 dB on synthetic
scans, +0.02 on synthetic photos, +0.03 on the real photos."""


@dataclass
class LeadSignals:
    """Calibrated leads and how much each can be trusted."""

    signals: np.ndarray  # (n, 12) mV, NaN where not printed or not trusted
    confidence: dict[str, float]
    warnings: list[str] = field(default_factory=list)


def _fill_gaps(y: np.ndarray, max_gap: int) -> np.ndarray:
    """Linearly fill NaN runs of at most ``max_gap`` samples between finite values."""
    y = y.copy()
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return y
    idx = np.arange(y.shape[0])
    filled = np.interp(idx, idx[ok], y[ok])
    for a, b in runs(~ok):
        if a > 0 and b < y.shape[0] and b - a <= max_gap:
            y[a:b] = filled[a:b]
    return y


def spread_ties(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The trace's points with strictly increasing ``x``, so they can be interpolated.

    On a narrow QRS spike the up- and down-strokes are read at one and the same column, so
    many points in time order share an ``x``; interpolating over them would jump past the
    tip. Each run of equal ``x`` is spread over ``SPREAD_PX`` about its column (never past
    halfway to the neighbouring readings) in proportion to the pen's vertical travel (a
    steep stroke is drawn at a near-constant pace), so a sample can land near the tip.
    """
    x = np.maximum.accumulate(np.asarray(xs, dtype=np.float64))
    y = np.asarray(ys, dtype=np.float64)
    if len(x) < 2:
        return x, y
    out = x.copy()
    starts = np.flatnonzero(np.diff(x, prepend=x[0] - 1.0) > 0)
    ends = np.append(starts[1:], len(x))
    for a, b in zip(starts, ends, strict=True):
        if b - a < 2:
            continue
        nxt = x[b] if b < len(x) else x[a] + 1.0
        travel = np.abs(np.diff(y[a:min(b + 1, len(y))]))
        if b == len(x):
            travel = np.append(travel, 0.0)
        cum = np.concatenate(([0.0], np.cumsum(travel)))[: b - a]
        total = float(travel.sum())
        frac = cum / total if total > 0 else np.arange(b - a) / (b - a)
        prev = x[a - 1] if a > 0 else x[a] - 1.0
        lo = max(x[a] - SPREAD_PX / 2, (prev + x[a]) / 2)
        hi = min(x[a] + SPREAD_PX / 2, (x[a] + nxt) / 2)
        out[a:b] = lo + (hi - lo) * frac
    keep = np.concatenate(([True], np.diff(out) > 0))
    return out[keep], y[keep]


def _extrapolated(q: np.ndarray, xs: np.ndarray, ys: np.ndarray, guard: float,
                  limit: float) -> np.ndarray:
    """``ys`` at ``q`` by linear interpolation, continued past both ends along the slope
    of the last ``2 * guard`` px (at most ``limit`` px away from the end reading), so a
    lead that starts or ends on a QRS slope keeps its slope instead of a flat step."""
    out = np.interp(q, xs, ys)
    span = max(2.0 * guard, 2.0)
    for end, sign, beyond in ((xs[0], 1.0, q < xs[0]), (xs[-1], -1.0, q > xs[-1])):
        if not beyond.any() or xs[-1] - xs[0] < 2.0 * span:
            continue
        y_end = float(np.interp(end, xs, ys))
        slope = (float(np.interp(end + sign * span, xs, ys)) - y_end) / (sign * span)
        out[beyond] = y_end + np.clip(slope * (q[beyond] - end), -limit, limit)
    return out


def _sample_row(trace: RowTrace, layout: PageLayout, n: int, fs: float, k: int) -> tuple[
    np.ndarray, np.ndarray
]:
    """The row's y (px) and confidence at every output sample time (NaN off the trace).

    Each of the row's ``k`` leads is read from its own stretch only: the columns within
    a pixel of a lead boundary may hold the neighbour's pen cap, and within half a pen
    width the separator tick when the page prints one, and the row's first columns the
    pulse's falling edge, so a lead's first and last samples continue the line of its
    nearest readings inside its stretch, for up to ``MAX_GAP_S``.
    """
    t = np.arange(n) / fs
    xq = layout.x_start + t * layout.px_per_s
    yq = np.full(n, np.nan)
    guard = (SEPARATOR_GUARD_PENS * trace.thickness if layout.separators
             else NEIGHBOUR_GUARD_PX)
    max_gap_px = MAX_GAP_S * layout.px_per_s
    reach = max(guard + 1, max_gap_px)
    for c in range(k):
        i0, i1 = round(c * n / k), round((c + 1) * n / k)
        xa = layout.x_start + i0 / fs * layout.px_per_s
        xb = layout.x_start + i1 / fs * layout.px_per_s
        lo = xa + (guard if c > 0 else START_GUARD_PX)
        hi = xb - (guard if c < k - 1 else -guard)
        sel = (trace.x >= lo) & (trace.x <= hi)
        if sel.sum() < 2:
            continue
        xs, ys = spread_ties(trace.x[sel], trace.y[sel])
        q = xq[i0:i1]
        inside = (q >= xs[0] - reach) & (q <= xs[-1] + reach)
        yq[i0:i1] = np.where(inside, _extrapolated(q, xs, ys, guard, 2.0 * trace.thickness), np.nan)
    col = np.clip(np.round(xq - trace.x0).astype(np.int64), 0, trace.col_ok.shape[0] - 1)
    # samples in a long run of columns without ink are not read, whatever interp says
    blank = ~trace.col_ok
    if blank.any():
        long_gap = np.zeros(blank.shape[0], bool)
        for a, b in runs(blank):
            if b - a > max_gap_px:
                long_gap[a:b] = True
        yq[long_gap[col]] = np.nan
    return yq, trace.col_conf[col]


def _limb_projection(sig: np.ndarray) -> np.ndarray:
    """Robust least-squares projection of the limb leads onto the (I, II) plane."""
    names = list(LIMB_BASIS)
    cols = [LEAD_INDEX[k] for k in names]
    m = sig[:, cols]  # (n, 6)
    avail = np.isfinite(m)
    rows = avail.sum(axis=1) >= 3
    if not rows.any():
        return sig
    basis = np.array([LIMB_BASIS[k] for k in names])  # (6, 2)
    out = sig.copy()
    # each pattern of available leads is one block (3x4 columns, whole 6x2/12x1 pages)
    patterns, inverse = np.unique(avail[rows], axis=0, return_inverse=True)
    row_idx = np.flatnonzero(rows)
    for p_i, pattern in enumerate(patterns):
        sel = row_idx[inverse.ravel() == p_i]
        a = basis[pattern]  # (k, 2)
        x = m[np.ix_(sel, np.flatnonzero(pattern))]  # (s, k)
        # offsets are each lead's own; fit the zero-mean parts
        off = np.median(x, axis=0)
        xc = x - off
        w = np.ones_like(xc)
        fit = xc
        for _ in range(3):
            # weighted LS per sample: solve (A^T W A) v = A^T W x
            ata = np.einsum("sk,ki,kj->sij", w, a, a)
            atx = np.einsum("sk,ki,sk->si", w, a, xc)
            det = ata[:, 0, 0] * ata[:, 1, 1] - ata[:, 0, 1] * ata[:, 1, 0]
            ok = np.abs(det) > 1e-9
            inv = np.zeros_like(ata)
            inv[ok, 0, 0] = ata[ok, 1, 1] / det[ok]
            inv[ok, 1, 1] = ata[ok, 0, 0] / det[ok]
            inv[ok, 0, 1] = -ata[ok, 0, 1] / det[ok]
            inv[ok, 1, 0] = -ata[ok, 1, 0] / det[ok]
            v = np.einsum("sij,sj->si", inv, atx)
            fit = v @ a.T
            r = np.abs(xc - fit)
            w = np.where(r <= HUBER_MV, 1.0, HUBER_MV / np.maximum(r, 1e-9))
        # every lead takes the fit, a grossly misread one too: with the others it
        # outvotes the reading (keeping readings with a residual over 0.24 mV cost
        # 0.1-0.3 dB on the bench sets)
        res = fit + off
        cols_avail = [cols[j] for j in np.flatnonzero(pattern)]
        out[np.ix_(sel, cols_avail)] = res
    return out


def band_limit(sig: np.ndarray, fs: float, paper_speed_mm_s: float) -> np.ndarray:
    """Each lead's finite stretches low-passed (zero phase) at what the print can hold.

    Measured on the bench sets, this removes more reading jitter than signal: +0.3 to
    +0.4 dB on synthetic scans, synthetic photos and the real photos alike.
    """
    cutoff = PRINT_CYCLES_PER_MM * paper_speed_mm_s
    if cutoff >= 0.45 * fs:
        return sig  # the output rate is already below what the print holds
    sos = scipy.signal.butter(LOWPASS_ORDER, cutoff, fs=fs, output="sos")
    pad = 3 * (2 * sos.shape[0] + 1)
    out = sig.copy()
    for j in range(sig.shape[1]):
        for a, b in runs(np.isfinite(sig[:, j])):
            if b - a > pad:
                out[a:b, j] = scipy.signal.sosfiltfilt(sos, sig[a:b, j], padlen=pad)
    return out


def to_signals(layout: PageLayout, traces: list[RowTrace], fs: float,
               consistency: bool = True) -> LeadSignals:
    """Assemble the 12 leads from the row traces."""
    n = round(layout.seconds * fs)
    warnings: list[str] = []
    readings: dict[str, list[tuple[np.ndarray, float]]] = {k: [] for k in LEADS}
    gap = round(MAX_GAP_S * fs)
    for trace, row in zip(traces, layout.rows, strict=True):
        yq, cq = _sample_row(trace, layout, n, fs, len(row.leads))
        mv = (row.zero - yq) / layout.px_per_mv
        k = len(row.leads)
        for c, lead in enumerate(row.leads):
            i0, i1 = round(c * n / k), round((c + 1) * n / k)
            seg = np.full(n, np.nan)
            seg[i0:i1] = _fill_gaps(mv[i0:i1], gap)
            got = np.isfinite(seg[i0:i1])
            coverage = float(got.mean()) if i1 > i0 else 0.0
            conf = float(np.mean(cq[i0:i1])) if i1 > i0 else 0.0
            score = coverage * conf
            if coverage < MIN_COVERAGE or conf < MIN_CONFIDENCE:
                warnings.append(f"lead {lead} (row {row.index + 1}) not readable")
                continue
            readings[lead].append((seg, score))
    sig = np.full((n, 12), np.nan)
    confidence: dict[str, float] = {}
    for lead, reads in readings.items():
        j = LEAD_INDEX[lead]
        if not reads:
            confidence[lead] = 0.0
            continue
        reads.sort(key=lambda r: -np.isfinite(r[0]).sum())
        base, score = reads[0]
        out = base.copy()
        for other, s2 in reads[1:]:
            both = np.isfinite(out) & np.isfinite(other)
            if both.sum() < fs * 0.2:
                out = np.where(np.isfinite(out), out, other)
                continue
            diff = out[both] - other[both]
            diff = diff - np.median(diff)
            if float(np.sqrt(np.mean(diff**2))) < AGREE_MV:
                shift = float(np.median(out[both] - other[both]))
                out[both] = 0.5 * (out[both] + other[both] + shift)
            elif s2 > score:
                out[both] = other[both]
            out = np.where(np.isfinite(out), out, other)
        sig[:, j] = out
        confidence[lead] = round(min(1.0, max(score, *(s for _, s in reads))), 3)
    if consistency:
        sig = _limb_projection(sig)
    sig = band_limit(sig, fs, layout.paper_speed_mm_s)
    return LeadSignals(sig, confidence, warnings)
