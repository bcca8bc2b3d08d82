"""Stage 3: where the rows, columns, pulses and labels are; layout, paper speed and gain.

Works on the rectified page (grid axis-aligned, uniform ``px_per_mm``) through the
trace-probability map of :mod:`pipeline.traces`, so the classic and the learned engine
share it.

* **Rows** are the heights where ink runs across most of the page: the ink is smeared
  vertically by a few mm so a wiggling trace becomes a band, and a row must hold a
  continuous run of at least ``MIN_ROW_MM`` (header and footer text does not). The
  baseline is the commonest ink height in the row (the isoelectric line).
* **Layout** follows from the row count (3: 3x4, 4: 3x4+1, 6: 6x2 or 3x4+3, 12: 12x1).
  Six rows are told apart by content: on a 3x4+3 page the rhythm strips repeat V1, II
  and V5 from the 3x4 block at the same times, on a 6x2 page nothing repeats.
* **Calibration pulses** are found by shape (two equal vertical strokes rising from the
  baseline, joined by a flat top): height in mm = gain (a 1 mV pulse), width = 0.2 s, so
  5 mm means 25 mm/s and 10 mm means 50 mm/s. A printed footer is never needed.
* **Time axis**: every row prints the same span, ``TRACE_WIDTH_MM`` (10 s at 25 mm/s)
  ending where the ink ends; a shorter print starts just after its pulse.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.ndimage import gaussian_filter1d, maximum_filter1d
from scipy.signal import find_peaks

from pipeline.errors import DigitizationError
from pipeline.leads import GAINS_MM_MV, LAYOUTS, PAPER_SPEEDS_MM_S, Layout, segment_span
from pipeline.masks import runs, small_blobs
from pipeline.traces import INK_LEVEL, RUN_LEVEL, RowSpec, RowTrace

TRACE_WIDTH_MM = 250.0
"""Printed width of a full-length row: 10 s at 25 mm/s, 5 s at 50 mm/s."""
PULSE_SECONDS = 0.2
"""Width of the standard 1 mV calibration pulse."""
MIN_ROW_MM = 100.0
"""A trace row holds a continuous run of ink at least this long."""
ROW_SMEAR_MM = 3.0
"""Vertical smear that turns a wiggling trace into a band for row finding."""
MIN_ROW_GAP_MM = 10.5
"""Rows are further apart than this (12 strips on a page: ~14 mm); grid lines are 5 mm."""
WEAK_ROW_SHARE = 0.55
"""A row candidate covering less of the page than this share of the stronger rows' median
is a grid remnant, a line of text or a fold between the rows, not a row."""
SPECK_MM = 0.6
"""Blobs of ink smaller than this each way are specks or grid dots, not trace."""
ROW_REACH_MM = 6.0
LATTICE_TOL = 0.12
"""A candidate row within this share of the pitch of a lattice point sits on it."""
"""A row's continuity is judged on the ink within this distance of its peak."""
MIN_COMPLEX_MM = 1.2
MIN_COMPLEXES = 3
"""A trace row shows at least this many excursions taller than ``MIN_COMPLEX_MM``."""
ROW_COUNTS: dict[int, tuple[Layout, ...]] = {
    3: (Layout.THREE_BY_FOUR,),
    4: (Layout.STANDARD,),
    6: (Layout.SIX_BY_TWO, Layout.THREE_BY_FOUR_3R),
    12: (Layout.TWELVE_BY_ONE,),
}
DUPLICATE_CORR = 0.75
"""Correlation above which two printings are the same signal (3x4+3 rhythm strips)."""
MIN_PULSE_MM = 3.8
"""Shorter "pulses" are letters (a serif II); the smallest standard pulse is 5 mm."""
PULSE_END_MM = 1.0
"""A pulse's top stops at its falling stroke: ink that carries on this far at the top's
height makes that stroke a grid line under the top."""
DEFAULT_SPEED_MM_S = 25.0
DEFAULT_GAIN_MM_MV = 10.0
PHANTOM_OVERRUN_MM = 5.0
"""An end row without the pulse the other rows print, whose ink starts or ends this much
beyond theirs, is a paper edge or a ruled line, not a trace row."""
SHARED_TOL_MM = 1.0
"""Row ends this close to the shared end are one end, read a little differently."""
SEPARATOR_MIN_MM = 2.5
"""A lead separator tick is a vertical stroke at least this long across the baseline."""
SEPARATOR_SHARE = 0.6
"""Share of lead boundaries that must show a tick for the page to print them."""


@dataclass(frozen=True)
class Pulse:
    """A calibration pulse found on row ``row`` (rectified px)."""

    row: int
    x0: float
    x1: float
    y_top: float
    y_base: float
    px_per_mm: float

    @property
    def height_mm(self) -> float:
        return (self.y_base - self.y_top) / self.px_per_mm

    @property
    def width_mm(self) -> float:
        return (self.x1 - self.x0) / self.px_per_mm


@dataclass(frozen=True)
class RowGeometry:
    """One printed row: its baseline (0 mV level, px), band searched, and leads."""

    index: int
    baseline: float
    band: tuple[int, int]
    pitch: float
    leads: tuple[str, ...]
    zero: float
    """Height (px) of 0 mV: the pulse's base when the row has a pulse, else the baseline."""


@dataclass
class PageLayout:
    """Everything later stages need to turn row traces into leads."""

    layout: Layout
    rows: list[RowGeometry]
    x_start: float
    """Column (px) of time 0."""
    x_end: float
    """Column (px) where the printed span ends."""
    px_per_mm: float
    paper_speed_mm_s: float
    gain_mm_mv: float
    pulses: list[Pulse] = field(default_factory=list)
    label_points: dict[str, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    confidence: float = 1.0
    separators: bool = False
    """The printer marks lead boundaries with a vertical tick across the baseline."""

    @property
    def px_per_s(self) -> float:
        return self.paper_speed_mm_s * self.px_per_mm

    @property
    def px_per_mv(self) -> float:
        return self.gain_mm_mv * self.px_per_mm

    @property
    def seconds(self) -> float:
        return (self.x_end - self.x_start) / self.px_per_s

    def row_specs(self) -> list[RowSpec]:
        """The rows as the path search wants them."""
        # a little beyond both ends: the ends are estimates, and a lead's last samples
        # must not fall off its row
        x0 = int(self.x_start - 1.0 * self.px_per_mm)
        x1 = int(np.ceil(self.x_end + 2.0 * self.px_per_mm)) + 1
        specs = []
        for r in self.rows:
            k = len(r.leads)
            cuts = tuple(round(self.x_start + c * (self.x_end - self.x_start) / k)
                         for c in range(k))
            specs.append(RowSpec(r.baseline, r.band, (x0, x1), r.pitch, cuts))
        return specs

    def boundaries(self, row: int) -> list[float]:
        """Columns (px) where a lead of ``row`` ends and the next begins."""
        k = len(self.rows[row].leads)
        return [self.x_start + c * (self.x_end - self.x_start) / k for c in range(1, k)]

    def segment_box(self, row: int, column: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) px of a lead's cell on the rectified page."""
        r = self.rows[row]
        k = len(r.leads)
        t0, t1 = segment_span(k, column, self.seconds)
        return (self.x_start + t0 * self.px_per_s, r.baseline - 0.55 * r.pitch,
                self.x_start + t1 * self.px_per_s, r.baseline + 0.45 * r.pitch)


def _longest_run(mask: np.ndarray | np.bool_, close: int) -> tuple[int, int]:
    """Longest run of ``mask`` after closing gaps shorter than ``close``."""
    m = maximum_filter1d(np.asarray(mask, dtype=np.uint8), size=max(1, close)) > 0
    best = (0, 0)
    for a, b in runs(m):
        if b - a > best[1] - best[0]:
            best = (a, b)
    # undo the dilation at the ends
    a, b = best
    half = max(1, close) // 2
    return (min(a + half, b), max(b - half, a))


@dataclass(frozen=True)
class _RowCandidate:
    y: float
    x0: int
    x1: int
    strength: float


def find_rows(prob: np.ndarray, px_per_mm: float) -> tuple[list[_RowCandidate], np.ndarray]:
    """Candidate trace rows, top to bottom, and the row-coverage profile they came from."""
    ink = prob > INK_LEVEL
    smear = maximum_filter1d(ink.astype(np.uint8), size=max(3, int(ROW_SMEAR_MM * px_per_mm)),
                             axis=0)
    cov = smear.mean(axis=1)
    cov_s = gaussian_filter1d(cov.astype(np.float64), sigma=max(1.0, px_per_mm))
    if cov_s.max() <= 0:
        return [], cov_s
    peaks, _ = find_peaks(cov_s, distance=max(2, int(MIN_ROW_GAP_MM * px_per_mm)),
                          prominence=0.08 * cov_s.max(), height=0.3 * cov_s.max())
    out = []
    close = max(2, int(3.0 * px_per_mm))
    reach = int(ROW_REACH_MM * px_per_mm)
    for y in peaks:
        near = ink[max(0, y - reach):y + reach + 1].any(axis=0)
        a, b = _longest_run(near, close)
        if (b - a) / px_per_mm >= MIN_ROW_MM and _has_complexes(ink, y, a, b, px_per_mm):
            out.append(_RowCandidate(float(y), a, b, float(cov_s[y])))
    return out, cov_s


def _has_complexes(ink: np.ndarray, y: int, x0: int, x1: int, ppm: float) -> bool:
    """Whether a row of ink has QRS-like vertical excursions (a paper edge, a ruled line
    or a fold does not)."""
    half = int(4 * ppm)
    band = ink[max(0, y - half):y + half + 1, x0:x1]
    if band.size == 0:
        return False
    any_ink = band.any(axis=0)
    first = np.argmax(band, axis=0)
    last = band.shape[0] - 1 - np.argmax(band[::-1], axis=0)
    tall = any_ink & (last - first >= MIN_COMPLEX_MM * ppm)
    return len(runs(tall)) >= MIN_COMPLEXES


def _without_specks(ink: np.ndarray, ppm: float) -> np.ndarray:
    """``ink`` without blobs smaller than :data:`SPECK_MM` each way: the dots of a black
    dotted grid, left as ink, would carry a row's extent on past the trace's end."""
    out: np.ndarray = ink & ~small_blobs(ink, np.ceil(SPECK_MM * ppm) - 1)  # whole px < SPECK_MM
    return out


def _baseline(prob: np.ndarray, y: float, half: float, x0: int, x1: int, ppm: float) -> float:
    """Commonest ink height (px) within ``half`` of ``y``: the isoelectric line."""
    top = max(0, int(y - half))
    bot = min(prob.shape[0], int(y + half) + 1)
    band = prob[top:bot, x0:x1]
    hist = (band > INK_LEVEL).sum(axis=1).astype(np.float64)
    if hist.sum() == 0:
        return y
    hist = gaussian_filter1d(hist, sigma=max(0.5, 0.15 * ppm))
    k = int(np.argmax(hist))
    # sub-pixel: centroid of the peak's neighbourhood
    lo, hi = max(0, k - 2), min(hist.shape[0], k + 3)
    w = hist[lo:hi]
    return top + float((w * np.arange(lo, hi)).sum() / w.sum())


def _evenly_spaced(cands: list[_RowCandidate]) -> bool:
    """Whether the candidates are a layout's row count, evenly spaced (a rhythm strip may
    be printed a little closer)."""
    if len(cands) not in ROW_COUNTS:
        return False
    gaps = np.diff([c.y for c in cands])
    return bool(gaps.max() < 1.6 * gaps.min())


def _pick_rows(cands: list[_RowCandidate], cov: np.ndarray, ppm: float
               ) -> list[_RowCandidate]:
    """The rows of a layout among the candidates.

    Rows of every layout are evenly spaced, so for each row count a layout has and each
    pair of candidates as first and last row, a lattice is laid down; a lattice point is
    a row when a candidate lies near it, or when the coverage there is as strong as a
    weak candidate's (two rows merged into one peak). The lattice explaining the most
    candidates and leaving the fewest unexplained wins: a missing or merged row is
    filled in, a spurious one (a line of text, a paper edge) is dropped.
    """
    if len(cands) < 2:
        raise DigitizationError(
            f"found {len(cands)} trace rows; expected 3, 4, 6 or 12 (no readable ECG layout)")
    top = float(np.median(sorted(c.strength for c in cands)[len(cands) // 2:]))
    clear = [c for c in cands if c.strength >= WEAK_ROW_SHARE * top]
    if len(clear) < len(cands) and _evenly_spaced(clear):
        cands = clear  # faint ones between evenly spaced rows: grid remnants, not rows
    if _evenly_spaced(cands):
        return cands
    strong = float(np.median([c.strength for c in cands]))
    best: tuple[float, list[_RowCandidate]] | None = None
    for first in range(len(cands)):
        for last in range(first + 1, len(cands)):
            y0, y1 = cands[first].y, cands[last].y
            for n in ROW_COUNTS:
                pitch = (y1 - y0) / (n - 1)
                if pitch < MIN_ROW_GAP_MM * ppm:
                    continue
                rows: list[_RowCandidate] = []
                matched = 0
                for k in range(n):
                    y = y0 + k * pitch
                    near = [c for c in cands if abs(c.y - y) < LATTICE_TOL * pitch]
                    if near:
                        rows.append(min(near, key=lambda c: abs(c.y - y)))
                        matched += 1
                    elif cov[round(y)] >= 0.6 * strong:
                        ref = cands[first]
                        rows.append(_RowCandidate(y, ref.x0, ref.x1, float(cov[round(y)])))
                    else:
                        break
                if len(rows) < n:
                    continue
                # candidates weigh by their strength: faint lines of text, folds and
                # grid remnants must not outvote the trace rows
                on = {id(r) for r in rows}
                inside = [c for c in cands
                          if y0 - 0.5 * pitch < c.y < y1 + 0.5 * pitch and id(c) not in on]
                outside = [c for c in cands if id(c) not in on and c not in inside]
                score = (sum(r.strength for r in rows if id(r) in {id(c) for c in cands})
                         - sum(c.strength for c in inside)
                         - 0.5 * sum(c.strength for c in outside) + 0.01 * n)
                if best is None or score > best[0]:
                    best = (score, rows)
    if best is None:
        raise DigitizationError(
            f"found {len(cands)} trace rows; expected 3, 4, 6 or 12 (no readable ECG layout)")
    return best[1]


def _quick_trace(prob: np.ndarray, baseline: float, half: float) -> np.ndarray:
    """Median ink height per column near ``baseline`` (NaN where none): a rough trace."""
    top = max(0, int(baseline - half))
    bot = min(prob.shape[0], int(baseline + half) + 1)
    band = prob[top:bot] > INK_LEVEL
    ys = np.arange(top, bot, dtype=np.float64)[:, None]
    n = band.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (band * ys).sum(axis=0) / n
    return np.where(n > 0, mean, np.nan)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 20:
        return 0.0
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def relabel_six_rows(page: PageLayout, traces: list[RowTrace]) -> PageLayout:
    """Decide 6x2 against 3x4+3 again from the followed traces (more reliable than the
    rough per-column estimate the layout stage had) and relabel the rows."""
    if len(page.rows) != 6:
        return page
    cols = np.arange(int(page.x_start), int(np.ceil(page.x_end)))
    curves = [np.interp(cols, t.x, t.y, left=np.nan, right=np.nan) if t.x.size > 1
              else np.full(cols.shape, np.nan) for t in traces]
    layout = _six_row_layout(curves, 0.0, float(cols.size))
    if layout == page.layout:
        return page
    spec = LAYOUTS[layout]
    rows = [replace(r, leads=spec.rows[i]) for i, r in enumerate(page.rows)]
    return replace(page, layout=layout, rows=rows)


def _six_row_layout(quick: list[np.ndarray], x_start: float, x_end: float) -> Layout:
    """3x4+3 repeats V1, II and V5 of the 3x4 block in its rhythm strips; 6x2 does not.
    Two of the three copies must agree: where rows touch, one may be misread."""
    w = x_end - x_start

    def span(q: int) -> slice:
        return slice(int(x_start + q * w / 4), int(x_start + (q + 1) * w / 4))

    pairs = [(1, 4, 0), (0, 3, 2), (1, 5, 3)]  # (3x4 row, rhythm row, quarter)
    corr = [_corr(quick[a][span(q)], quick[b][span(q)]) for a, b, q in pairs]
    return Layout.THREE_BY_FOUR_3R if float(np.median(corr)) > DUPLICATE_CORR else Layout.SIX_BY_TWO


def _strokes(up: np.ndarray, bottom: np.ndarray, min_len: float
             ) -> list[tuple[float, float, float]]:
    """Clusters of columns whose ink rises at least ``min_len`` px from near the
    baseline: (x centre, height, bottom y) each."""
    out = []
    for a, b in runs(up >= min_len):
        h = up[a:b]
        out.append((a + float((h * np.arange(b - a)).sum() / h.sum()), float(h.max()),
                    float(np.median(bottom[a:b]))))
    return out


def find_pulse(prob: np.ndarray, row: int, baseline: float, xs: tuple[int, int],
               ppm: float, thickness: float) -> Pulse | None:
    """The calibration pulse between columns ``xs`` of a row, found by its shape: two
    strokes of equal height rising from near the baseline, 3-12.5 mm apart, joined by a
    flat top, blank inside."""
    x0, x1 = max(0, xs[0]), min(prob.shape[1], xs[1])
    if x1 - x0 < int(3 * ppm):
        return None
    top = max(0, int(baseline - 26 * ppm))
    bot = min(prob.shape[0], int(baseline + 2.5 * ppm) + 1)
    band = prob[top:bot, x0:x1] > RUN_LEVEL  # thin pulse strokes can be faint
    b_idx = round(baseline) - top
    tol = max(2, int(2.0 * ppm))
    # how far ink rises continuously from near the baseline in each column
    up = np.zeros(x1 - x0)
    bottom = np.zeros(x1 - x0)
    lo = max(0, b_idx - tol)
    hi = min(band.shape[0], b_idx + tol + 1)
    # (the tallest run ending near the baseline: a grid remnant just below a stroke's
    # foot must not hide the stroke)
    above = np.zeros_like(band, dtype=np.int32)  # length of the ink run ending at y
    for y in range(1, band.shape[0]):
        above[y] = np.where(band[y], above[y - 1] + 1, 0)
    for j in range(x1 - x0):
        col = band[:, j]
        hits = lo + np.flatnonzero(col[lo:hi])
        if hits.size == 0:
            continue
        # a run's bottom is an ink pixel with no ink right below it
        ends = hits[(hits + 1 >= band.shape[0]) | ~col[np.minimum(hits + 1, band.shape[0] - 1)]]
        ends = np.append(ends, hits[-1])
        y = int(ends[np.argmax(above[ends, j])])
        bottom[j] = y
        up[j] = above[y, j] - 1
    strokes = _strokes(up, bottom, MIN_PULSE_MM * ppm)
    # every pair, not only neighbours (a grid line that survived ink separation stands
    # between the two strokes of a pulse on a binarized page); strokes are in x order,
    # so the first pair that is a pulse is the leftmost, with its nearest falling stroke
    for (xa, ha, ba), (xb, hb, bb) in itertools.combinations(strokes, 2):
        width_mm = (xb - xa) / ppm
        if not 3.0 <= width_mm <= 12.5 or not 0.8 <= ha / max(hb, 1e-6) <= 1.25:
            continue
        y_top = _pulse_top(prob[top:bot, x0:x1], xa, xb, 0.5 * (ha + hb), 0.5 * (ba + bb),
                           ppm, thickness)
        if y_top is None:
            continue
        foot = top + 0.5 * (ba + bb) - 0.5 * thickness  # centre of the strokes' ends
        y_base = _pulse_base(prob, foot, x0 + xa, x0 + xb, ppm, thickness)
        return Pulse(row, x0 + xa, x0 + xb, top + y_top, y_base, ppm)
    return None


def _pulse_top(window: np.ndarray, xa: float, xb: float, h: float, foot: float, ppm: float,
               thickness: float) -> float | None:
    """Height (px in ``window``) of the flat top joining strokes ``xa`` and ``xb``, or
    None when they are not a pulse: the top must span them, stop at ``xb`` (else ``xb``
    is a grid line under the top) and leave the inside blank."""
    ja, jb = int(xa + thickness + 1), int(xb - thickness - 1)
    if jb - ja < 3:
        return None
    y_guess = foot - h + 0.5 * thickness
    a = max(0, int(y_guess - 0.8 * ppm))
    b = min(window.shape[0], int(y_guess + 0.8 * ppm) + 1)
    mid = int(foot - h / 2)
    plateau = []
    empty = 0
    for j in range(ja, jb):
        seg = window[a:b, j]
        if seg.max() >= RUN_LEVEL:
            plateau.append(a + float((seg * np.arange(seg.shape[0])).sum() / seg.sum()))
        if window[max(0, mid - 1):mid + 2, j].max() < INK_LEVEL:
            empty += 1
    n = jb - ja
    if len(plateau) < 0.6 * n or empty < 0.6 * n:
        return None
    y_top = float(np.median(plateau))
    beyond = window[max(0, int(y_top - 0.5 * ppm)):int(y_top + 0.5 * ppm) + 1,
                    int(xb + thickness + 1):int(xb + thickness + 1 + PULSE_END_MM * ppm)]
    if beyond.size and (beyond.max(axis=0) >= RUN_LEVEL).mean() > 0.5:
        return None
    return y_top


def _pulse_base(prob: np.ndarray, foot: float, xa: float, xb: float, ppm: float,
                thickness: float) -> float:
    """Sub-pixel height of the pulse's 0 mV level: the baseline stroke beside it when
    there is one, else the foot of its two strokes."""
    ys = []
    reach = int(2.5 * ppm)
    gap = int(thickness) + 2
    cols = [*range(int(xa) - gap - reach, int(xa) - gap), *range(int(xb) + gap,
                                                                int(xb) + gap + reach)]
    lo = max(0, int(foot - 1.0 * ppm))
    hi = min(prob.shape[0], int(foot + 1.0 * ppm) + 1)
    for x in cols:
        if not 0 <= x < prob.shape[1]:
            continue
        seg = prob[lo:hi, x]
        if seg.max() >= INK_LEVEL and (seg >= INK_LEVEL).sum() <= 2 * thickness + 2:
            ys.append(lo + float((seg * np.arange(seg.shape[0])).sum() / seg.sum()))
    return float(np.median(ys)) if len(ys) >= 3 else foot


def _shared(values: np.ndarray, ppm: float, last: bool) -> float:
    """The last (or first) row end that another row shares to within 4 mm: a faded
    stretch cuts a row short, a stray mark lengthens one, neither happens to two rows
    alike. Of the ends within ``SHARED_TOL_MM`` of it the median is taken: a pen cap or
    a grid-line remnant lengthens one row by a few pixels, which is a few samples of
    every lead's timing."""
    order = np.sort(values)[::-1] if last else np.sort(values)
    for v in order:
        if (np.abs(values - v) <= 4.0 * ppm).sum() >= min(2, values.size):
            near = values[np.abs(values - v) <= SHARED_TOL_MM * ppm]
            return float(np.median(near))
    return float(np.median(values))


def _agreeing(pulses: list[Pulse]) -> list[Pulse]:
    """The pulses that agree with the majority (a lone shape elsewhere is no pulse).

    One pulse is trusted alone only on a page where no other row shows one.
    """
    if len(pulses) <= 1:
        return pulses
    h = np.array([p.height_mm for p in pulses])
    w = np.array([p.width_mm for p in pulses])
    best: list[Pulse] = []
    for i in range(len(pulses)):
        group = [p for p, hh, ww in zip(pulses, h, w, strict=True)
                 if abs(hh - h[i]) <= 0.12 * h[i] and abs(ww - w[i]) <= 0.2 * w[i]]
        if len(group) > len(best):
            best = group
    return best if len(best) >= 2 else []


def _snap(value: float, choices: tuple[float, ...], tol: float) -> float | None:
    best = min(choices, key=lambda c: abs(np.log(value / c)))
    return best if abs(np.log(value / best)) <= np.log1p(tol) else None


def _row_pitch(rows: list[_RowCandidate]) -> float:
    """Median spacing (px) of the rows found."""
    return float(np.median(np.diff([c.y for c in rows])))


def _without_phantom_ends(picked: list[_RowCandidate], baselines: list[float],
                          pulses: list[Pulse], ppm: float
                          ) -> tuple[list[_RowCandidate], list[float], list[Pulse]]:
    """The rows without a first or last one that is not a trace row.

    Evenly spaced rows are accepted as they are found, so the shadow of the paper's
    edge or a ruled line one row pitch beyond the trace rows can pass as a row. Such a
    row has no calibration pulse where the others have one, and its ink runs on past
    theirs (:data:`PHANTOM_OVERRUN_MM`); it is dropped when the rest is still a layout.
    """
    pulsed = {p.row for p in pulses}
    if len(pulsed) < 2:
        return picked, baselines, pulses
    x0 = float(np.median([picked[r].x0 for r in pulsed]))
    x1 = float(np.median([picked[r].x1 for r in pulsed]))
    over = PHANTOM_OVERRUN_MM * ppm
    drop = {end for end in (0, len(picked) - 1)
            if end not in pulsed and (picked[end].x0 < x0 - over or picked[end].x1 > x1 + over)}
    if not drop or len(picked) - len(drop) not in ROW_COUNTS:
        return picked, baselines, pulses
    keep = [i for i in range(len(picked)) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}
    return ([picked[i] for i in keep], [baselines[i] for i in keep],
            [replace(p, row=new_index[p.row]) for p in pulses])


def detect_layout(prob: np.ndarray, px_per_mm: float, thickness: float) -> PageLayout:
    """Rows, layout, pulses, paper speed, gain and the time axis of a rectified page."""
    ppm = px_per_mm
    cands, cov = find_rows(prob, ppm)
    picked = _pick_rows(cands, cov, ppm)
    pitch = _row_pitch(picked)
    warnings: list[str] = []
    baselines = []
    for c in picked:
        baselines.append(_baseline(prob, c.y, 0.35 * pitch, c.x0, c.x1, ppm))
    close = max(2, int(3.0 * ppm))
    # calibration pulses: at the start of each row
    pulses: list[Pulse] = []
    for i, (c, b) in enumerate(zip(picked, baselines, strict=True)):
        p = find_pulse(prob, i, b, (c.x0 - int(15 * ppm), c.x0 + int(30 * ppm)), ppm, thickness)
        if p is not None:
            pulses.append(p)

    pulses = _agreeing(pulses)
    picked, baselines, pulses = _without_phantom_ends(picked, baselines, pulses, ppm)
    pitch = _row_pitch(picked)
    speed, gain = DEFAULT_SPEED_MM_S, DEFAULT_GAIN_MM_MV
    if pulses:
        h = float(np.median([p.height_mm for p in pulses]))
        w = float(np.median([p.width_mm for p in pulses]))
        g = _snap(h, GAINS_MM_MV, 0.25)
        if g is None:
            gain = round(h, 1)
            warnings.append(f"calibration pulse {h:.1f} mm high is not a standard gain")
        else:
            gain = g
        s = _snap(w / PULSE_SECONDS, PAPER_SPEEDS_MM_S, 0.3)
        if s is None:
            warnings.append(f"calibration pulse {w:.1f} mm wide; paper speed assumed 25 mm/s")
        else:
            speed = s
    else:
        warnings.append("no calibration pulse found; assumed 25 mm/s and 10 mm/mV")

    # each row's extent, judged on the ink near its baseline (a trace strays further at
    # a higher gain)
    extents = []
    for b in baselines:
        reach = min(0.45 * pitch, ROW_REACH_MM * ppm * max(1.0, gain / DEFAULT_GAIN_MM_MV))
        near = _without_specks(prob[max(0, int(b - reach)):int(b + reach) + 1] > INK_LEVEL,
                               ppm)
        extents.append(_longest_run(near.any(axis=0), close))
    starts = np.array([e[0] for e in extents], dtype=np.float64)
    ends = np.array([e[1] for e in extents], dtype=np.float64)

    # time axis: every row ends where the printed span ends (a faded end only shortens
    # a row, ink beyond it lengthens one); with a pulse, the span starts just after it.
    # The last inked pixel's outer edge lies half a pen beyond the last printed point.
    end_pad = 0.5 - 0.5 * thickness
    if pulses:
        after_pulse = float(np.median([p.x1 for p in pulses])) + thickness
        expected = after_pulse + TRACE_WIDTH_MM * ppm
        fits = ends[(ends > expected - 6 * ppm) & (ends < expected + 10 * ppm)]
        if fits.size:
            x_end = _shared(fits, ppm, last=True) + end_pad
        else:  # grid remnants or the paper's edge run on past the trace: trust the pulse
            x_end = expected
            warnings.append("row ends unclear; the span is read from the calibration pulse")
        slack = (-12.0, 12.0)
    else:
        after_pulse = _shared(starts, ppm, last=False)
        x_end = _shared(ends, ppm, last=True) + end_pad
        slack = (-12.0, 50.0)  # the row's ink may start at the grid edge, pulse and all
    extent_mm = (x_end - after_pulse) / ppm
    if TRACE_WIDTH_MM + slack[0] <= extent_mm <= TRACE_WIDTH_MM + slack[1]:
        x_start = x_end - TRACE_WIDTH_MM * ppm
    else:
        x_start = after_pulse
        warnings.append(f"printed span {extent_mm:.0f} mm is not the usual {TRACE_WIDTH_MM:g} mm")
    if x_end - x_start < 20 * ppm:
        raise DigitizationError("trace rows are too short to read")

    n = len(picked)
    options = ROW_COUNTS[n]
    layout = options[0]
    if n == 6:
        quick = [_quick_trace(prob, b, 0.4 * pitch) for b in baselines]
        layout = _six_row_layout(quick, x_start, x_end)
    spec = LAYOUTS[layout]
    by_row = {p.row: p for p in pulses}
    rows = []
    h_img = prob.shape[0]
    for i, b in enumerate(baselines):
        up = b - baselines[i - 1] if i > 0 else pitch
        dn = baselines[i + 1] - b if i + 1 < n else pitch
        band = (max(0, int(b - 0.95 * up)), min(h_img, int(b + 0.95 * dn) + 1))
        zero = by_row[i].y_base if i in by_row else b
        rows.append(RowGeometry(i, b, band, pitch, spec.rows[i], zero))
    conf = min(1.0, 0.5 + 0.5 * len(pulses) / n)
    page = PageLayout(layout, rows, x_start, x_end, ppm, speed, gain, pulses, {}, warnings, conf)
    page.separators = _has_separators(prob, page)
    return page


def _has_separators(prob: np.ndarray, page: PageLayout) -> bool:
    """Whether most lead boundaries carry a separator tick.

    A tick is a vertical run of ink at least ``SEPARATOR_MIN_MM`` long through the
    baseline within a pen width of the boundary. A QRS that happens to cross a boundary
    looks the same, so the page is judged by the majority of its boundaries.
    """
    ppm = page.px_per_mm
    reach = max(2, round(0.5 * ppm))
    need = SEPARATOR_MIN_MM * ppm
    votes = []
    for i, row in enumerate(page.rows):
        for xb in page.boundaries(i):
            x = round(xb)
            top = max(0, int(row.baseline - 6 * ppm))
            window = prob[top:int(row.baseline + 6 * ppm) + 1,
                          max(0, x - reach):x + reach + 1] > INK_LEVEL
            if window.size == 0:
                continue
            column: np.ndarray = np.asarray(window.any(axis=1))
            b = int(row.baseline) - top
            if not 0 <= b < column.size or not column[b]:
                votes.append(False)
                continue
            lo, hi = b, b
            while lo > 0 and column[lo - 1]:
                lo -= 1
            while hi < column.size - 1 and column[hi + 1]:
                hi += 1
            votes.append(hi - lo + 1 >= need)
    return bool(votes) and float(np.mean(votes)) >= SEPARATOR_SHARE
