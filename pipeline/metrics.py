"""Rhythm and interval measurements from the digitized 12 leads.

A printed page rarely holds one lead for its whole span (a 3x4 page shows each lead for
2.5 s), so beats are found on all leads at once: each lead's slope energy is scaled to
its own QRS size and the available leads are averaged at every instant. That gives one
QRS detector signal across the column boundaries of any layout.

Intervals come from median beats, measured globally across leads the way ECG carts do
(earliest onset to latest offset of the spatial activity). neurokit2's single-lead
delineators were tried on the synthetic records with known timing and measured the QRS
at 180-240 ms for 100 ms complexes, so they are not used; its R-peak detector adds
nothing over the multi-lead detector here and costs a 3 s import.

Every figure is ``None`` when it cannot be measured: fewer than two beats, a figure
outside physiological bounds, or too few leads.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, find_peaks, sosfiltfilt

from pipeline.leads import LEAD_INDEX
from pipeline.masks import runs
from pipeline.result import Metrics

MIN_RR_S = 0.25
"""Beats closer than this (240 bpm) are one beat."""
QRS_BOUNDS_MS = (40.0, 260.0)
PR_BOUNDS_MS = (60.0, 450.0)
QT_BOUNDS_MS = (200.0, 700.0)
HR_BOUNDS_BPM = (20.0, 250.0)
P_MIN_MV = 0.03
"""A P wave smaller than this is not seen (AF, junctional rhythm)."""
P_MIN_CORR = 0.6
"""Median correlation of single beats with the template P wave for a P wave to count."""
T_MIN_MV = 0.08
LIMB_ANGLES_DEG: dict[str, float] = {
    "I": 0.0, "II": 60.0, "III": 120.0, "aVR": -150.0, "aVL": -30.0, "aVF": 90.0,
}
"""Hexaxial reference angles of the frontal-plane leads."""
_BEAT_PRE_S = 0.45
_BEAT_POST_S = 0.65


def _bandpass(x: np.ndarray, fs: float, lo: float, hi: float) -> np.ndarray:
    """Zero-phase band-pass of one NaN-free run; short runs are only detrended."""
    if x.shape[0] < int(0.3 * fs):
        return x - np.median(x)
    hi = min(hi, 0.45 * fs)
    sos = butter(2, [lo, hi], btype="band", fs=fs, output="sos")
    padlen = min(x.shape[0] - 1, int(0.25 * fs))
    return np.asarray(sosfiltfilt(sos, x, padlen=padlen))


def qrs_activity(signals: np.ndarray, fs: float) -> np.ndarray:
    """Multi-lead QRS activity (n,), NaN where no lead is printed.

    Each lead's squared slope (5-30 Hz band) is divided by its own 98th percentile, so
    a 2.5 s segment of a small lead counts as much as a rhythm strip of a large one.
    """
    n = signals.shape[0]
    acc = np.zeros(n)
    cnt = np.zeros(n)
    for j in range(signals.shape[1]):
        x = signals[:, j]
        energy = np.full(n, np.nan)
        for a, b in runs(np.isfinite(x)):
            if b - a < int(0.4 * fs):
                continue
            f = _bandpass(x[a:b], fs, 5.0, 30.0)
            e = np.gradient(f) ** 2
            edge = int(0.05 * fs)  # the ends of a run carry filter transients
            e[:edge] = 0.0
            e[-edge:] = 0.0
            energy[a:b] = e
        ok = np.isfinite(energy)
        if ok.sum() < int(0.4 * fs):
            continue
        scale = float(np.percentile(energy[ok], 98))
        if scale <= 0:
            continue
        acc[ok] += np.minimum(energy[ok] / scale, 3.0)
        cnt[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        act = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    return act


def detect_beats(signals: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of QRS complexes (centre of QRS activity), over all leads."""
    act = qrs_activity(signals, fs)
    ok = np.isfinite(act)
    if ok.sum() < fs:
        return np.zeros(0, dtype=int)
    smooth = uniform_filter1d(np.where(ok, act, 0.0), size=max(3, int(0.08 * fs)))
    top = float(np.percentile(smooth[ok], 99.5))
    if top <= 0:
        return np.zeros(0, dtype=int)
    peaks, _ = find_peaks(smooth, height=0.3 * top, distance=int(MIN_RR_S * fs),
                          prominence=0.2 * top)
    return peaks.astype(int)


def _rr_seconds(beats: np.ndarray, fs: float, valid: np.ndarray) -> np.ndarray:
    """RR intervals between consecutive beats with printed signal all the way between."""
    out = []
    for a, b in itertools.pairwise(beats):
        if valid[a:b + 1].all():
            out.append((b - a) / fs)
    return np.asarray(out)


def _median_beats(signals: np.ndarray, fs: float, beats: np.ndarray
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(L, 12) median beat per lead around each QRS centre (NaN where a lead has none),
    and each lead's stack of single beats (beats, L)."""
    pre, post = int(_BEAT_PRE_S * fs), int(_BEAT_POST_S * fs)
    length = pre + post
    out = np.full((length, signals.shape[1]), np.nan)
    stacks: list[np.ndarray] = []
    for j in range(signals.shape[1]):
        stack = []
        for b in beats:
            a0, a1 = b - pre, b + post
            if a0 < 0 or a1 > signals.shape[0]:
                # keep partial beats that still hold the QRS and the PR segment
                seg = np.full(length, np.nan)
                lo, hi = max(a0, 0), min(a1, signals.shape[0])
                seg[lo - a0:hi - a0] = signals[lo:hi, j]
            else:
                seg = signals[a0:a1, j].copy()
            core = seg[pre - int(0.12 * fs):pre + int(0.12 * fs)]
            if np.isfinite(core).all():
                stack.append(seg)
        stacks.append(np.vstack(stack) if stack else np.zeros((0, length)))
        if stack:
            with warnings.catch_warnings():  # the ends of partial beats are all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                out[:, j] = np.nanmedian(stacks[-1], axis=0)
    return out, stacks


def _qrs_bounds(templates: np.ndarray, fs: float) -> tuple[int, int] | None:
    """Global QRS onset and offset (template indices) from the spatial slope."""
    pre = int(_BEAT_PRE_S * fs)
    slopes = []
    for j in range(templates.shape[1]):
        x = templates[:, j]
        w = slice(pre - int(0.2 * fs), pre + int(0.2 * fs))
        seg = x[w]
        if not np.isfinite(seg).all():
            continue
        d = np.abs(np.gradient(uniform_filter1d(seg, max(1, int(0.008 * fs)))))
        peak = float(d.max())
        if peak > 0:
            slopes.append(d / peak)
    if len(slopes) < 2:
        return None
    s = np.mean(slopes, axis=0)
    s = uniform_filter1d(s, max(1, int(0.01 * fs)))
    centre = int(0.2 * fs)
    thr = 0.12 * float(s[centre - int(0.06 * fs):centre + int(0.06 * fs)].max())
    i = int(np.argmax(s[centre - int(0.06 * fs):centre + int(0.06 * fs)])) + centre - int(0.06 * fs)
    a = i
    while a > 0 and s[a] > thr:
        a -= 1
    b = i
    while b < s.shape[0] - 1 and s[b] > thr:
        b += 1
    off = pre - centre
    return a + off, b + off


def _p_consistent(stacks: list[np.ndarray], templates: np.ndarray, lo: int, hi: int) -> bool:
    """Whether single beats repeat the template's P wave (they do not in AF, where the
    median of fibrillatory waves leaves a small bump of its own)."""
    corr = []
    for j, stack in enumerate(stacks):
        t = templates[lo:hi, j]
        if stack.shape[0] < 2 or not np.isfinite(t).all():
            continue
        t = t - t.mean()
        for beat in stack:
            b = beat[lo:hi]
            if not np.isfinite(b).all():
                continue
            b = b - b.mean()
            den = float(np.sqrt((t * t).sum() * (b * b).sum()))
            if den > 0:
                corr.append(float((t * b).sum()) / den)
    return len(corr) >= 3 and float(np.median(corr)) >= P_MIN_CORR


def _p_onset(templates: np.ndarray, fs: float, qrs_on: int, rr_s: float,
             stacks: list[np.ndarray]) -> int | None:
    """P-wave onset: the nearest activity bump before the QRS onset, over all leads.

    Deflections are taken from the level at the QRS onset (the end of the PR segment),
    so the previous beat's T wave, further back, is not mistaken for the P wave.
    """
    lo = max(0, qrs_on - int(min(0.42, 0.7 * rr_s) * fs))
    hi = qrs_on - int(0.06 * fs)  # a P apex lies at least this far before the QRS
    if hi - lo < int(0.06 * fs):
        return None
    mags = []
    for j in range(templates.shape[1]):
        seg = templates[lo:qrs_on + 1, j]
        if not np.isfinite(seg).all():
            continue
        seg = uniform_filter1d(seg, max(1, int(0.016 * fs)))
        mags.append(np.abs(seg - seg[-1]))
    if len(mags) < 2:
        return None
    m = uniform_filter1d(np.mean(mags, axis=0)[: hi - lo], max(1, int(0.02 * fs)))
    halfwin = int(0.04 * fs)
    k = None
    for i in range(m.shape[0] - 1, 0, -1):
        w = m[max(0, i - halfwin):i + halfwin + 1]
        if m[i] >= P_MIN_MV and m[i] >= w.max():
            k = i
            break
    if k is None:  # no visible P wave (AF, junctional rhythm)
        return None
    a = k
    while a > 0 and m[a] > 0.25 * m[k] and m[a - 1] <= m[a] + 1e-9:
        a -= 1
    if a == 0:
        return None
    end = min(hi, k + (k - a))
    if not _p_consistent(stacks, templates, lo + a, lo + end + 1):
        return None
    return lo + a


def _t_end(templates: np.ndarray, fs: float, qrs_on: int, qrs_off: int, rr_s: float) -> int | None:
    """T-wave end: tangent method per lead, median over the leads with a clear T wave."""
    lo = qrs_off + int(0.06 * fs)
    hi = min(templates.shape[0] - 1, qrs_off + int(min(0.6, 0.8 * rr_s) * fs))
    if hi - lo < int(0.1 * fs):
        return None
    ends = []
    for j in range(templates.shape[1]):
        x = templates[:, j]
        if not np.isfinite(x[lo:hi]).all() or not np.isfinite(x[qrs_off]):
            continue
        seg = uniform_filter1d(x[lo:hi], max(1, int(0.02 * fs)))
        pr = x[max(0, qrs_on - int(0.03 * fs)):qrs_on + 1]
        if not np.isfinite(pr).all():
            continue
        seg = seg - float(np.median(pr))  # the PR segment is the isoelectric reference
        k = int(np.argmax(np.abs(seg)))
        amp = float(seg[k])
        if abs(amp) < T_MIN_MV or k >= seg.shape[0] - 2:
            continue
        d = np.gradient(seg)
        tail = d[k:] * np.sign(amp)
        m = int(np.argmin(tail)) + k  # steepest return after the apex
        slope = float(d[m])
        if slope == 0 or np.sign(slope) == np.sign(amp):
            continue
        cross = m - seg[m] / slope  # where the tangent meets the baseline
        if k < cross < seg.shape[0] + int(0.05 * fs):
            ends.append(lo + cross)
    if len(ends) < 2:
        return None
    return round(float(np.median(ends)))


def _axis(templates: np.ndarray, fs: float, bounds: tuple[int, int]) -> float | None:
    """Frontal QRS axis: least-squares fit of the net QRS areas of the limb leads."""
    a, b = bounds
    rows, vals = [], []
    for lead, ang in LIMB_ANGLES_DEG.items():
        x = templates[:, LEAD_INDEX[lead]]
        if not np.isfinite(x[a:b + 1]).all():
            continue
        pre = x[max(0, a - int(0.04 * fs)):a + 1]
        base = float(np.nanmedian(pre)) if np.isfinite(pre).any() else float(x[a])
        area = float(np.sum(x[a:b + 1] - base)) / fs
        rad = math.radians(ang)
        rows.append((math.cos(rad), math.sin(rad)))
        vals.append(area)
    if len(rows) < 2:
        return None
    m = np.asarray(rows)
    if np.linalg.matrix_rank(m) < 2:
        return None
    vec, *_ = np.linalg.lstsq(m, np.asarray(vals), rcond=None)
    if float(np.hypot(*vec)) < 1e-6:
        return None
    return round(math.degrees(math.atan2(vec[1], vec[0])), 0)


def _bounded(value: float | None, bounds: tuple[float, float]) -> float | None:
    if value is None or not math.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        return None
    return round(value, 0)


def measure(signals: np.ndarray, fs: float) -> Metrics:
    """HR, RR, PR, QRS, QT, QTc (Bazett, Fridericia) and frontal axis of a (n,12) record."""
    sig = np.asarray(signals, dtype=float)
    if sig.ndim != 2 or sig.shape[1] != 12 or sig.shape[0] < 2 * fs:
        return Metrics()
    beats = detect_beats(sig, fs)
    if beats.size < 2:
        return Metrics()
    valid = np.isfinite(sig).any(axis=1)
    rr = _rr_seconds(beats, fs, valid)
    if rr.size == 0:
        return Metrics()
    med = float(np.median(rr))
    # mean rate, as carts report it, without intervals that straddle a missed beat
    rr_s = float(np.mean(rr[(rr > 0.5 * med) & (rr < 1.6 * med)]))
    hr = _bounded(60.0 / rr_s, HR_BOUNDS_BPM)
    if hr is None:
        return Metrics()
    templates, stacks = _median_beats(sig, fs, beats)
    bounds = _qrs_bounds(templates, fs)
    qrs_ms = pr_ms = qt_ms = axis = None
    if bounds is not None:
        qrs_ms = _bounded((bounds[1] - bounds[0]) / fs * 1000, QRS_BOUNDS_MS)
        p_on = _p_onset(templates, fs, bounds[0], rr_s, stacks)
        if p_on is not None:
            pr_ms = _bounded((bounds[0] - p_on) / fs * 1000, PR_BOUNDS_MS)
        t_end = _t_end(templates, fs, bounds[0], bounds[1], rr_s)
        if t_end is not None:
            qt_ms = _bounded((t_end - bounds[0]) / fs * 1000, QT_BOUNDS_MS)
        if qrs_ms is not None:
            axis = _axis(templates, fs, bounds)
    qtc_b = qtc_f = None
    if qt_ms is not None:
        qtc_b = round(qt_ms / math.sqrt(rr_s), 0)
        qtc_f = round(qt_ms / rr_s ** (1.0 / 3.0), 0)
    return Metrics(
        hr_bpm=hr,
        rr_ms=round(rr_s * 1000, 0),
        pr_ms=pr_ms,
        qrs_ms=qrs_ms,
        qt_ms=qt_ms,
        qtc_bazett_ms=qtc_b,
        qtc_fridericia_ms=qtc_f,
        axis_deg=axis,
    )
