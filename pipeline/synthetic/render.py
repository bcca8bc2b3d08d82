"""Draw a printed ECG page: paper, grid, calibration pulses, traces, labels, header text.

Everything is placed in paper millimetres first (``PageGeometry``) and rasterised at the
target resolution directly; a paper point ``(x, y)`` mm lands at pixel ``(x, y) * px_per_mm``
(pixel centres at integer coordinates, the OpenCV convention). Traces are anti-aliased
polylines at 1/16 px precision, and are never clipped to their row: a tall QRS crosses into
the neighbour rows as it does on a real print.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pipeline.leads import LAYOUTS, LEAD_INDEX
from pipeline.synthetic.spec import PULSE_SECONDS, TRACE_WIDTH_MM, PageSpec

SHIFT = 4  # cv2 fixed-point bits: 1/16 px
BAND_ROWS = 512  # rows composited at a time
_ONE = 1 << SHIFT

# (paper, minor line, major line) RGB per grid colour.
GRID_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 253, 252), (243, 160, 160), (222, 70, 70)),
    "pink": ((253, 238, 240), (246, 196, 206), (236, 135, 158)),
    "orange": ((255, 249, 240), (250, 200, 158), (238, 140, 80)),
    "green": ((250, 253, 250), (176, 222, 186), (92, 170, 112)),
    "grey": ((252, 252, 252), (208, 208, 208), (150, 150, 150)),
    "bw": ((255, 255, 255), (150, 150, 150), (40, 40, 40)),
}


@dataclass
class Segment:
    """One printed stretch of one lead, in paper mm."""

    lead: str
    row: int
    col: int
    i0: int  # first sample index printed
    i1: int  # one past the last
    x0_mm: float
    x1_mm: float
    baseline_mm: float
    cell_mm: tuple[float, float, float, float]  # x0, y0, x1, y1 of its place on the page
    label_box_mm: tuple[float, float, float, float] | None = None


@dataclass
class PageGeometry:
    """Where everything sits on the paper, in mm."""

    paper_mm: tuple[float, float]
    grid_mm: tuple[float, float, float, float]
    trace_x0_mm: float
    baselines_mm: list[float]
    segments: list[Segment]
    pulse_boxes_mm: list[tuple[float, float, float, float]]
    texts: list[tuple[str, float, float, float]] = field(default_factory=list)  # text, x, y, h

    def pulse_paths_mm(self) -> list[np.ndarray]:
        """Each row's printed pulse as a (6,2) mm polyline: lead-in, up, across, down, on."""
        out = []
        for b, (px0, y_top, px1, _) in zip(self.baselines_mm, self.pulse_boxes_mm, strict=True):
            out.append(np.array([[self.grid_mm[0] + 0.5, b], [px0, b], [px0, y_top],
                                 [px1, y_top], [px1, b], [self.trace_x0_mm, b]]))
        return out


@dataclass
class RenderedPage:
    """A clean page and its ground-truth layers at ``px_per_mm``."""

    image: np.ndarray  # (H,W,3) uint8
    px_per_mm: float
    grid_alpha: np.ndarray  # (H,W) uint8, 255 = full grid ink
    ink_alpha: np.ndarray  # (H,W) uint8, traces + text
    lead_mask: np.ndarray  # (H,W) uint8, 0 = none, i+1 = LEADS[i]
    geometry: PageGeometry
    meta: dict[str, Any]


def printed_mask(spec: PageSpec, n: int) -> np.ndarray:
    """(n,12) bool: which samples of which lead the page prints."""
    mask = np.zeros((n, 12), dtype=bool)
    for row in LAYOUTS[spec.layout].rows:
        k = len(row)
        for c, lead in enumerate(row):
            i0, i1 = round(c * n / k), round((c + 1) * n / k)
            mask[i0:i1, LEAD_INDEX[lead]] = True
    return mask


def _fake_word(rng: np.random.Generator, n: int, upper: bool = True) -> str:
    letters = string.ascii_uppercase if upper else string.ascii_lowercase
    return "".join(letters[int(i)] for i in rng.integers(0, 26, n))


def header_lines(rng: np.random.Generator, spec: PageSpec, hr_bpm: float) -> list[str]:
    """Patient-like header text; every name and number is made up."""
    day = int(rng.integers(1, 28))
    mon = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[
        int(rng.integers(0, 12))]
    year = int(rng.integers(1995, 2026))
    hh, mm_, ss = (int(v) for v in rng.integers(0, [24, 60, 60]))
    pr = int(rng.integers(120, 220))
    qrs = int(rng.integers(70, 130))
    qt = int(rng.integers(320, 460))
    qtc = int(qt / math.sqrt(60.0 / max(hr_bpm, 30.0)))
    left = [
        f"{_fake_word(rng, int(rng.integers(4, 9)))}, {_fake_word(rng, int(rng.integers(3, 7)))}",
        f"ID: {int(rng.integers(10**6, 10**8))}",
        f"{day:02d}-{mon}-{year} {hh:02d}:{mm_:02d}:{ss:02d}",
    ]
    mid = [
        f"Vent. rate {round(hr_bpm)} BPM",
        f"PR interval {pr} ms",
        f"QRS duration {qrs} ms",
        f"QT/QTc {qt}/{qtc} ms",
        f"P-R-T axes {int(rng.integers(-30, 90))} {int(rng.integers(-30, 100))} "
        f"{int(rng.integers(-30, 100))}",
    ]
    right = [
        _fake_word(rng, int(rng.integers(5, 10)), upper=False).capitalize() + " rhythm",
        "Unconfirmed report" if rng.random() < 0.5 else "Referred by: Dr "
        + _fake_word(rng, 6).capitalize(),
    ]
    return [*left, *mid, *right]


def layout_geometry(spec: PageSpec, rng: np.random.Generator, fs: int, n: int,
                    header: list[str]) -> PageGeometry:
    """Place the grid, rows, segments, pulses, labels and text on the paper (mm)."""
    pw, ph = spec.paper_mm
    speed = spec.paper_speed_mm_s
    pulse_w = PULSE_SECONDS * speed
    pulse_zone = 5.0 * math.ceil((pulse_w + 5.0) / 5.0)
    need = TRACE_WIDTH_MM + pulse_zone
    max_w = 5.0 * math.floor((pw - 8.0) / 5.0)
    gw = float(max_w if rng.random() < 0.6 else max(need, max_w - 5.0 * rng.integers(0, 3)))
    gx0 = round((pw - gw) / 2 + rng.uniform(-1.0, 1.0), 2)
    top = rng.uniform(24.0, 36.0) if spec.header else rng.uniform(6.0, 12.0)
    bottom = rng.uniform(9.0, 14.0) if spec.footer else rng.uniform(5.0, 10.0)
    gh = 5.0 * math.floor((ph - top - bottom) / 5.0)
    gy0 = round(top, 2)
    trace_x0 = gx0 + pulse_zone
    rows = LAYOUTS[spec.layout].rows
    pitch = gh / len(rows)
    snap = rng.random() < 0.5
    rel = rng.uniform(0.55, 0.65)
    baselines = []
    for r in range(len(rows)):
        b = gy0 + pitch * (r + rel)
        baselines.append(round(b) if snap else b)
    seconds = n / fs
    segments: list[Segment] = []
    label_h = spec.label_height_mm
    label_above = rng.random() < 0.8
    label_dy = rng.uniform(3.0, min(8.0, 0.3 * pitch + 2.0))
    label_dx = rng.uniform(0.8, 3.0)
    for r, row in enumerate(rows):
        k = len(row)
        for c, lead in enumerate(row):
            i0, i1 = round(c * n / k), round((c + 1) * n / k)
            x0 = trace_x0 + c * seconds / k * speed
            x1 = trace_x0 + (c + 1) * seconds / k * speed
            b = baselines[r]
            ly = b - label_dy if label_above else b + label_dy + label_h
            segments.append(Segment(
                lead, r, c, i0, i1, x0, x1, b,
                (x0, b - 0.6 * pitch, x1, b + 0.4 * pitch),
                (x0 + label_dx, ly - label_h, x0 + label_dx, ly),  # width set when drawn
            ))
    pulses = []
    for b in baselines:
        px0 = gx0 + (pulse_zone - pulse_w) / 2
        pulses.append((px0, b - spec.gain_mm_mv, px0 + pulse_w, b))
    texts: list[tuple[str, float, float, float]] = []
    if spec.header:
        th = rng.uniform(2.2, 3.2)
        cols_x = [gx0 + 1.0, gx0 + gw * rng.uniform(0.3, 0.4), gx0 + gw * rng.uniform(0.62, 0.7)]
        per_col = [3, 5, 2]
        i = 0
        for cx, m in zip(cols_x, per_col, strict=True):
            for j in range(m):
                y = 4.0 + th + j * th * 1.6
                if y < top - 1.0 and i < len(header):
                    texts.append((header[i], cx, y, th))
                i += 1
    if spec.footer:
        th = rng.uniform(2.0, 3.0)
        hz = ("0.05-150 Hz", "0.5-40 Hz", "0.05-100 Hz", "0.15-150 Hz")[int(rng.integers(0, 4))]
        mains = "50" if rng.random() < 0.5 else "60"
        foot = f"{speed:g}mm/s  {spec.gain_mm_mv:g}mm/mV  {hz}  {mains}~"
        texts.append((foot, gx0 + rng.uniform(1.0, 60.0), gy0 + gh + 2.0 + th, th))
    return PageGeometry((pw, ph), (gx0, gy0, gx0 + gw, gy0 + gh), trace_x0, baselines, segments,
                        pulses, texts)


def _line_coverage(pos_px: np.ndarray, origin_px: float, pitch_px: float, width_px: float
                   ) -> np.ndarray:
    """Fraction of each pixel covered by the nearest of a family of parallel lines."""
    rel = (pos_px - origin_px) / pitch_px
    d = (rel - np.round(rel)) * pitch_px
    half = width_px / 2
    cov = np.minimum(d + 0.5, half) - np.maximum(d - 0.5, -half)
    return np.clip(cov, 0.0, 1.0).astype(np.float32)


def grid_layers(width: int, rows: tuple[int, int], ppm: float,
                grid_mm: tuple[float, float, float, float], style: str, minor_w_mm: float,
                major_w_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Minor and major grid alpha of image rows ``rows`` (float32 in [0,1]; 1 and 5 mm)."""
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(*rows, dtype=np.float32)
    gx0, gy0, gx1, gy1 = (v * ppm for v in grid_mm)
    inside_x = ((xs >= gx0 - 0.5) & (xs <= gx1 + 0.5)).astype(np.float32)
    inside_y = ((ys >= gy0 - 0.5) & (ys <= gy1 + 0.5)).astype(np.float32)
    if style == "dotted":
        dot = max(0.22 * ppm, 0.8)
        mx = _line_coverage(xs, gx0, ppm, dot) * inside_x
        my = _line_coverage(ys, gy0, ppm, dot) * inside_y
        big = max(0.45 * ppm, 1.2)
        bx = _line_coverage(xs, gx0, 5 * ppm, big) * inside_x
        by = _line_coverage(ys, gy0, 5 * ppm, big) * inside_y
        minor = my[:, None] * mx[None, :]
        major = np.maximum(by[:, None] * bx[None, :],
                           0.5 * (by[:, None] * inside_x[None, :]) * (mx[None, :] > 0))
        return minor, major.astype(np.float32)
    mx = _line_coverage(xs, gx0, ppm, minor_w_mm * ppm) * inside_x
    my = _line_coverage(ys, gy0, ppm, minor_w_mm * ppm) * inside_y
    bx = _line_coverage(xs, gx0, 5 * ppm, major_w_mm * ppm) * inside_x
    by = _line_coverage(ys, gy0, 5 * ppm, major_w_mm * ppm) * inside_y
    mx = mx * inside_x
    minor = (mx[None, :] * inside_y[:, None]) + (my[:, None] * inside_x[None, :])
    minor -= mx[None, :] * my[:, None]
    major = (bx[None, :] * inside_y[:, None]) + (by[:, None] * inside_x[None, :])
    major -= bx[None, :] * by[:, None]
    return minor, major


def _fixed(pts_px: np.ndarray) -> np.ndarray:
    return np.round(pts_px * _ONE).astype(np.int32)


def _text_scale(font: int, height_px: float, thickness: int) -> float:
    (_, h), _ = cv2.getTextSize("X", font, 1.0, thickness)
    return height_px / max(h, 1)


def draw_text(canvas: np.ndarray, text: str, x_px: float, y_px: float, height_px: float,
              font: int, thickness: int) -> tuple[float, float, float, float]:
    """Draw ``text`` with its baseline-left at (x, y); return its box in px."""
    scale = _text_scale(font, height_px, thickness)
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(canvas, text, (round(x_px), round(y_px)), font, scale, 255, thickness,
                cv2.LINE_AA)
    return x_px, y_px - th, x_px + tw, y_px


def cv_scalar(rgb: np.ndarray) -> tuple[float, float, float, float]:
    """An RGB triple as the 4-tuple OpenCV takes for a per-channel constant.

    OpenCV's type stubs list only arrays for arithmetic operands, hence the ``type: ignore``
    where one is passed.
    """
    r, g, b = (float(v) for v in rgb)
    return r, g, b, 0.0


def composite(ink: np.ndarray, minor: np.ndarray, major: np.ndarray,
              colours: tuple[np.ndarray, ...]) -> np.ndarray:
    """Paper, minor grid, major grid and ink, each over the last (u8 alphas in, u8 RGB out).

    With the layer weights summing to one, the colour is the paper's less a darkening that
    is linear in the minor, major and ink weights: one 3x3 ``cv2.transform`` of u8 weights
    (OpenCV's SIMD path) and a subtraction from the paper colour. No page-sized float
    layers, no BLAS thread pool to fight data-loader workers; rounding costs one grey level.
    """
    keep = cv2.bitwise_not(ink)
    w_major = cv2.multiply(major, keep, scale=1.0 / 255.0)
    keep = cv2.multiply(keep, cv2.bitwise_not(major), scale=1.0 / 255.0)
    w_minor = cv2.multiply(minor, keep, scale=1.0 / 255.0)
    paper = np.asarray(colours[0], np.float32)
    darkening = np.clip(paper[:, None] - np.stack(colours[1:], axis=1), 0.0, 255.0) / 255.0
    dark = cv2.transform(cv2.merge([w_minor, w_major, ink]), darkening.astype(np.float32))
    rgb: np.ndarray = cv2.subtract(cv_scalar(paper), dark)  # type: ignore[call-overload]
    return rgb


def render_page(spec: PageSpec, signals: np.ndarray, fs: int, ppm: float,
                rng: np.random.Generator, header: list[str]) -> RenderedPage:
    """Rasterise the page for ``signals`` (n,12, finite where printed) at ``ppm`` px/mm."""
    n = signals.shape[0]
    geo = layout_geometry(spec, rng, fs, n, header)
    pw, ph = geo.paper_mm
    h, w = round(ph * ppm), round(pw * ppm)
    paper_rgb, minor_rgb, major_rgb = (np.array(c, np.float32) for c in
                                       GRID_PALETTES[spec.grid_color])
    jitter = rng.normal(0, 4, 3).astype(np.float32)
    minor_rgb = np.clip(minor_rgb + jitter, 0, 255)
    major_rgb = np.clip(major_rgb + jitter, 0, 255)
    minor_w = rng.uniform(0.06, 0.14) if spec.grid_color != "bw" else rng.uniform(0.04, 0.09)
    major_w = rng.uniform(0.15, 0.3) if spec.grid_color != "bw" else rng.uniform(0.08, 0.16)
    strength = float(rng.uniform(0.7, 1.0))  # how dark the minor lines print

    ink = np.zeros((h, w), np.uint8)
    lead_mask = np.zeros((h, w), np.uint8)
    tpx = max(1, round(spec.trace_width_mm * ppm))
    font = spec.font | (cv2.FONT_ITALIC if rng.random() < 0.1 else 0)
    label_thick = max(1, round(spec.font_stroke_mm * ppm))
    text_thick = max(1, round(min(spec.font_stroke_mm, 0.2) * ppm))
    sep_thick = tpx if rng.random() < 0.6 else max(tpx, round(0.6 * ppm))
    sep_half = float(rng.uniform(1.5, 4.0))
    for pulse in geo.pulse_paths_mm():
        cv2.polylines(ink, [_fixed(pulse * ppm)], False, 255, tpx, cv2.LINE_AA, SHIFT)
    gain, speed = spec.gain_mm_mv, spec.paper_speed_mm_s
    for seg in geo.segments:
        j = LEAD_INDEX[seg.lead]
        t = np.arange(seg.i0, seg.i1) / fs
        pts = np.stack([geo.trace_x0_mm + t * speed, seg.baseline_mm - signals[seg.i0:seg.i1, j]
                        * gain], axis=1) * ppm
        fx = _fixed(pts)
        cv2.polylines(ink, [fx], False, 255, tpx, cv2.LINE_AA, SHIFT)
        cv2.polylines(lead_mask, [fx], False, j + 1, tpx, cv2.LINE_8, SHIFT)
        if spec.separators and seg.col > 0:
            sep = np.array([[seg.x0_mm, seg.baseline_mm - sep_half],
                            [seg.x0_mm, seg.baseline_mm + sep_half]])
            cv2.polylines(ink, [_fixed(sep * ppm)], False, 255, sep_thick, cv2.LINE_AA, SHIFT)
        assert seg.label_box_mm is not None
        lx, _, _, ly = seg.label_box_mm
        x0, y0, x1, y1 = draw_text(ink, seg.lead, lx * ppm, ly * ppm,
                                   spec.label_height_mm * ppm, font, label_thick)
        seg.label_box_mm = (x0 / ppm, y0 / ppm, x1 / ppm, y1 / ppm)
    for text, x, y, th in geo.texts:
        draw_text(ink, text, x * ppm, y * ppm, th * ppm, spec.font, text_thick)
    ink_rgb = np.array((18, 18, 24), np.float32) + rng.normal(0, 5, 3).astype(np.float32)
    if rng.random() < 0.08:
        ink_rgb = np.array((25, 35, 90), np.float32)  # blue-black ink
    ink_scale = float(rng.uniform(0.85, 1.0))  # how dark the ink prints
    colours = (paper_rgb, minor_rgb, major_rgb, np.clip(ink_rgb, 0, 255))
    # Composite in bands of rows so a 600 dpi page needs no page-sized float layers.
    image = np.empty((h, w, 3), np.uint8)
    grid_alpha = np.empty((h, w), np.uint8)
    for r0 in range(0, h, BAND_ROWS):
        r1 = min(h, r0 + BAND_ROWS)
        minor_f, major_f = grid_layers(w, (r0, r1), ppm, geo.grid_mm, spec.grid_style,
                                       minor_w, major_w)
        minor_a = cv2.convertScaleAbs(minor_f, alpha=255.0 * strength)
        major_a = cv2.convertScaleAbs(major_f, alpha=255.0)
        grid_alpha[r0:r1] = cv2.max(minor_a, major_a)
        image[r0:r1] = composite(cv2.convertScaleAbs(ink[r0:r1], alpha=ink_scale), minor_a,
                                 major_a, colours)
    meta = {
        "grid_color": spec.grid_color,
        "grid_style": spec.grid_style,
        "minor_line_mm": round(float(minor_w), 3),
        "major_line_mm": round(float(major_w), 3),
        "trace_px": tpx,
        "font": int(font),
        "ink_rgb": [round(float(v)) for v in ink_rgb],
    }
    return RenderedPage(image, ppm, grid_alpha, ink, lead_mask, geo, meta)
