"""Training pages for the waveform net, made on the fly from :mod:`pipeline.synthetic`.

Each sample imitates what the net sees at inference: the page as :func:`pipeline.grid.rectify`
returns it (the grid area plus a few mm, axis-aligned at up to 8 px/mm, light flattened
by :func:`pipeline.illumination.normalize`), resized into the working frame of
:class:`~pipeline.models.engine.Frame`. Instead of running the geometry engine (slow, and
its own errors would blur the targets), the page is rectified through the synthetic
page's exact paper->image map, with a small random rotation, scale error and smooth
displacement standing in for what rectification leaves behind.

The target is the printed trace and calibration-pulse centre lines, drawn as a Gaussian
of the distance to the line (``sigma_px``): exact, sub-pixel, and free of labels, text,
separators, handwriting and grid, which the net must learn to ignore.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import illumination
from pipeline.leads import LEAD_INDEX
from pipeline.models.engine import PAD_VALUE, Frame
from pipeline.synthetic import TRAIN_STYLE_MIX, TRAIN_WIDTHS_PX, SyntheticPage, generate_page
from pipeline.synthetic.spec import PULSE_SECONDS

RECT_PX_PER_MM = 8.0
"""What ``pipeline.grid.rectify`` resamples to (it never enlarges a smaller picture)."""
RECT_PAD_MM = 3.0
"""``rectify`` keeps this much beyond the grid it saw."""
TRAIN_SEED_BASE = 10_000_000
"""Training pages start here; the bench sets use 1e6 and 2e6, validation uses 3e6."""
VAL_SEED_BASE = 3_000_000
TURNED_SHARE = 0.08
"""Share of training views turned by a random quarter turn."""
MESH_STEP = 16
"""Rectified px between exactly mapped samples of the remap tables."""


@dataclass(frozen=True)
class DataConfig:
    """Everything that decides what a training sample looks like."""

    canvas: tuple[int, int] = (832, 2368)
    """(H, W) of a sample; a whole A4 or letter grid (plus margins) fits the default frame."""
    frame: Frame = field(default_factory=Frame)
    sigma_px: float = 1.0
    styles: tuple[tuple[str, float], ...] = TRAIN_STYLE_MIX
    width_px: tuple[int, int] = TRAIN_WIDTHS_PX
    """Range of the source picture's width (photos) or page width (scans)."""
    rect_px_per_mm: float = RECT_PX_PER_MM
    views_per_page: int = 2
    """Differently cropped, jittered and augmented views of each generated page."""
    augment: bool = True


@dataclass(frozen=True)
class SegmentTruth:
    """One printing of one lead in a sample: where it is and which samples it shows."""

    lead: str
    i0: int
    i1: int
    x0: float
    x1: float
    """Working-frame x of the first and last printed sample."""
    baseline: float
    """Working-frame y of 0 mV."""


@dataclass
class Sample:
    """One training or validation view."""

    image: np.ndarray
    """(H, W, 3) uint8 in the working frame, padded white to the canvas."""
    target: np.ndarray
    """(H, W) float32 in [0, 1]."""
    segments: list[SegmentTruth]
    signals: np.ndarray
    """(n, 12) mV reference, NaN where not printed."""
    fs: int
    px_per_mv: float
    """Working-frame y px per mV."""
    seed: int
    style: str


# --------------------------------------------------------------------------------------
# Geometry: the page's ground truth in paper mm.


@dataclass
class _PaperTruth:
    lines: list[tuple[str, np.ndarray, np.ndarray]]  # lead, sample indices, (k, 2) mm
    baselines: list[float]  # per line, mm
    pulses: list[np.ndarray]  # (6, 2) mm polylines
    grid_mm: tuple[float, float, float, float]


def _image_to_mm(page: SyntheticPage, px: np.ndarray) -> np.ndarray:
    p2i = page.paper_to_image
    return np.asarray(p2i.warp.inverse(px)) / p2i.px_per_mm


def paper_truth(page: SyntheticPage) -> _PaperTruth:
    """Trace and pulse centre lines of ``page`` in paper mm."""
    lines = []
    baselines = []
    for lead, pts in page.trace_paths.items():
        t = page.trace_times[lead]
        idx = np.round(t * page.fs).astype(np.int64)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        mm = _image_to_mm(page, pts)
        j = LEAD_INDEX[lead]
        for sl in np.split(np.arange(len(idx)), breaks):
            if len(sl) < 2:
                continue
            seg_mm = mm[sl]
            v = page.signals[idx[sl], j]
            base = float(np.nanmedian(seg_mm[:, 1] + v * page.gain_mm_mv))
            lines.append((lead, idx[sl], seg_mm))
            baselines.append(base)
    gx0, gy0, gx1, gy1 = (float(v) for v in page.meta["grid_mm"])
    pulses = [np.asarray(p, dtype=np.float64) for p in page.meta.get("pulse_paths_mm", [])]
    if not pulses:
        pulses = _pulse_paths(page, gx0, sorted(set(np.round(baselines, 3))))
    return _PaperTruth(lines, baselines, pulses, (gx0, gy0, gx1, gy1))


def _pulse_paths(page: SyntheticPage, gx0: float, row_baselines: list[float]
                 ) -> list[np.ndarray]:
    """The calibration pulses as ``pipeline.synthetic.render`` prints them, in mm."""
    speed = page.paper_speed_mm_s
    pulse_w = PULSE_SECONDS * speed
    zone = 5.0 * math.ceil((pulse_w + 5.0) / 5.0)
    px0 = gx0 + (zone - pulse_w) / 2
    out = []
    for b in row_baselines:
        top = b - page.gain_mm_mv
        out.append(np.array([[gx0 + 0.5, b], [px0, b], [px0, top], [px0 + pulse_w, top],
                             [px0 + pulse_w, b], [gx0 + zone, b]]))
    return out


# --------------------------------------------------------------------------------------
# Rectification with residual error.


@dataclass
class _RectMap:
    """mm -> rectified px: ``c + R (M (mm - lo) - c) + d(mm)``."""

    lo: np.ndarray
    scale: np.ndarray  # px/mm per axis
    angle: float
    centre: np.ndarray
    waves: list[tuple[float, float, float, float, float]]  # kx, ky (rad/mm), phase, ax, ay px

    def _disp(self, mm: np.ndarray) -> np.ndarray:
        d = np.zeros_like(mm)
        for kx, ky, ph, ax, ay in self.waves:
            s = np.sin(kx * mm[:, 0] + ky * mm[:, 1] + ph)
            d[:, 0] += ax * s
            d[:, 1] += ay * s
        return d

    def _rot(self, v: np.ndarray, sign: float) -> np.ndarray:
        c, s = math.cos(self.angle), sign * math.sin(self.angle)
        return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1]], axis=1)

    def forward(self, mm: np.ndarray) -> np.ndarray:
        u = (mm - self.lo) * self.scale - self.centre
        return self.centre + self._rot(u, 1.0) + self._disp(mm)

    def inverse(self, px: np.ndarray, iterations: int = 4) -> np.ndarray:
        mm = self.lo + px / self.scale
        for _ in range(iterations):
            v = self.centre + self._rot(px - self._disp(mm) - self.centre, -1.0)
            mm = self.lo + v / self.scale
        return mm


def _rect_map(rng: np.random.Generator | None, lo: np.ndarray, size_px: tuple[int, int],
              ppm: float) -> _RectMap:
    centre = np.array(size_px, dtype=np.float64) / 2
    if rng is None:
        return _RectMap(lo, np.array([ppm, ppm]), 0.0, centre, [])
    scale = ppm * (1.0 + rng.normal(0, 0.006, 2))
    angle = math.radians(float(np.clip(rng.normal(0, 0.25), -0.8, 0.8)))
    waves = []
    for _ in range(int(rng.integers(0, 3))):
        lam = rng.uniform(40, 160)
        a = rng.uniform(0, np.pi)
        amp = rng.uniform(0, 0.35) * ppm
        d = rng.uniform(0, np.pi)
        waves.append((2 * np.pi / lam * math.cos(a), 2 * np.pi / lam * math.sin(a),
                      rng.uniform(0, 2 * np.pi), amp * math.cos(d), amp * math.sin(d)))
    return _RectMap(lo, scale, angle, centre, waves)


def _turn(px: np.ndarray, turns: int, size: tuple[int, int]) -> np.ndarray:
    """Pixel positions after ``np.rot90(image, turns)`` of an image of ``size`` (W, H)."""
    w, h = size
    x, y = px[:, 0], px[:, 1]
    if turns == 1:
        return np.stack([y, w - 1 - x], axis=1)
    if turns == 2:
        return np.stack([w - 1 - x, h - 1 - y], axis=1)
    if turns == 3:
        return np.stack([h - 1 - y, x], axis=1)
    return px


def _rectify(page: SyntheticPage, rmap: _RectMap, size_px: tuple[int, int]) -> np.ndarray:
    w, h = size_px
    wc, hc = -(-w // MESH_STEP) + 1, -(-h // MESH_STEP) + 1
    xs = (np.arange(wc) + 0.5) * w / wc - 0.5
    ys = (np.arange(hc) + 0.5) * h / hc - 0.5
    gx, gy = np.meshgrid(xs, ys)
    mm = rmap.inverse(np.stack([gx.ravel(), gy.ravel()], axis=1))
    src = np.asarray(page.paper_to_image(mm))
    mx = cv2.resize(src[:, 0].reshape(hc, wc).astype(np.float32), (w, h),
                    interpolation=cv2.INTER_LINEAR)
    my = cv2.resize(src[:, 1].reshape(hc, wc).astype(np.float32), (w, h),
                    interpolation=cv2.INTER_LINEAR)
    return cv2.remap(page.image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# --------------------------------------------------------------------------------------
# Targets.


def densify(line: np.ndarray, step: float = 0.4) -> np.ndarray:
    """Points along a polyline no more than ``step`` apart (its vertices included)."""
    line = np.asarray(line, dtype=np.float64)
    if len(line) < 2:
        return line
    seg = np.diff(line, axis=0)
    n = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step).astype(np.int64))
    first = np.repeat(np.cumsum(n) - n, n)
    frac = (np.arange(int(n.sum())) - first) / np.repeat(n, n)
    start = np.repeat(line[:-1], n, axis=0)
    return np.concatenate([start + np.repeat(seg, n, axis=0) * frac[:, None], line[-1:]])


def render_target(lines: list[np.ndarray], shape: tuple[int, int], sigma_px: float
                  ) -> np.ndarray:
    """``exp(-d^2 / 2 sigma^2)`` with ``d`` the distance (px) to the nearest line."""
    h, w = shape
    out = np.zeros((h, w), np.float32)
    lines = [ln for ln in lines if len(ln) >= 2]
    if not lines:
        return out
    reach = math.ceil(3.0 * sigma_px)
    mask = np.zeros((h, w), np.uint8)
    for ln in lines:
        fixed = np.round(np.clip(ln, -1e5, 1e5) * 16).astype(np.int32)
        cv2.polylines(mask, [fixed], False, 1, 2 * reach + 3, cv2.LINE_8, 4)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return out
    tree = cKDTree(np.concatenate([densify(ln) for ln in lines]))
    dist, _ = tree.query(np.stack([xs, ys], axis=1).astype(np.float64),
                         distance_upper_bound=reach + 1.0)
    out[ys, xs] = np.where(np.isfinite(dist), np.exp(-0.5 * (dist / sigma_px) ** 2), 0.0)
    return out


# --------------------------------------------------------------------------------------
# Photometric augmentation (geometry never moves here).


def augment_photo(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour, light, blur, noise, resolution loss and JPEG, each at random."""
    out: np.ndarray = img.astype(np.float32)
    h, w = out.shape[:2]
    if rng.random() < 0.2:
        out = out[..., rng.permutation(3)]
    if rng.random() < 0.1:
        out[:] = out.mean(axis=2, keepdims=True)
    if rng.random() < 0.6:  # contrast, brightness, gamma, colour cast
        out = (out - 128.0) * rng.uniform(0.6, 1.3) + 128.0 + rng.uniform(-30, 25)
        out = out * rng.uniform(0.85, 1.1, 3).astype(np.float32)
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** rng.uniform(0.7, 1.5)
    if rng.random() < 0.35:  # uneven light or a soft shadow
        small = rng.uniform(0.55, 1.1, (3, 4)).astype(np.float32)
        out *= cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    out = np.clip(out, 0, 255)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.15:  # resolution loss
        f = rng.uniform(1.3, 2.2)
        small_img = cv2.resize(out, (max(8, int(w / f)), max(8, int(h / f))),
                               interpolation=cv2.INTER_AREA)
        out = cv2.resize(small_img, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.35:
        out = out + rng.normal(0, rng.uniform(2, 10), out.shape).astype(np.float32)
    res: np.ndarray = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.35:
        ok, buf = cv2.imencode(".jpg", res, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])
        dec = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else None
        if dec is not None:
            res = dec
    return res


# --------------------------------------------------------------------------------------
# Samples.


def _view(page: SyntheticPage, truth: _PaperTruth, cfg: DataConfig,
          rng: np.random.Generator | None) -> Sample:
    """One view of ``page``; ``rng=None`` gives the exact, unaugmented validation view."""
    gx0, gy0, gx1, gy1 = truth.grid_mm
    margins = (np.full(4, RECT_PAD_MM) if rng is None
               else rng.uniform(0.5, 6.0, 4) + (rng.random(4) < 0.1) * rng.uniform(0, 12, 4))
    lo = np.array([gx0 - margins[0], gy0 - margins[1]])
    hi = np.array([gx1 + margins[2], gy1 + margins[3]])
    ppm = min(cfg.rect_px_per_mm, max(float(page.px_per_mm), 2.0))
    size_r = (round((hi[0] - lo[0]) * ppm), round((hi[1] - lo[1]) * ppm))
    rmap = _rect_map(rng, lo, size_r, ppm)
    rect = _rectify(page, rmap, size_r)
    if rng is None or rng.random() < 0.85:
        rect = illumination.normalize(rect, ppm)
    # Now and then the page arrives turned (rectify's orientation can be wrong; the
    # digitizer then tries the other turns on the map), so the map must show traces at
    # any quarter turn.
    turns = int(rng.integers(1, 4)) if rng is not None and rng.random() < TURNED_SHARE else 0
    rect = np.ascontiguousarray(np.rot90(rect, turns))
    rh, rw = rect.shape[:2]
    ww, wh = cfg.frame.size_for((rh, rw), ppm)
    work = cv2.resize(rect, (ww, wh), interpolation=cv2.INTER_AREA)
    sx, sy = ww / rw, wh / rh
    if rng is not None and cfg.augment:
        work = augment_photo(work, rng)

    ch, cw = cfg.canvas
    ox = 0 if rng is None else int(rng.integers(min(0, cw - ww), max(0, cw - ww) + 1))
    oy = 0 if rng is None else int(rng.integers(min(0, ch - wh), max(0, ch - wh) + 1))
    image = np.full((ch, cw, 3), PAD_VALUE, np.uint8)
    src = work[max(0, -oy):max(0, -oy) + ch, max(0, -ox):max(0, -ox) + cw]
    image[max(0, oy):max(0, oy) + src.shape[0], max(0, ox):max(0, ox) + src.shape[1]] = src

    def to_canvas(mm: np.ndarray) -> np.ndarray:
        r = _turn(rmap.forward(mm), turns, size_r)
        return np.stack([(r[:, 0] + 0.5) * sx - 0.5 + ox, (r[:, 1] + 0.5) * sy - 0.5 + oy], 1)

    lines = [to_canvas(mm) for _, _, mm in truth.lines]
    pulses = [to_canvas(densify(p, 0.5)) for p in truth.pulses]
    target = render_target(lines + pulses, (ch, cw), cfg.sigma_px)
    segments = []
    for (lead, idx, mm), base_mm, pts in zip(truth.lines, truth.baselines, lines, strict=True):
        if turns:
            break  # a turned view has no rows to score
        base = to_canvas(np.array([[mm[0, 0], base_mm]]))[0, 1]
        segments.append(SegmentTruth(lead, int(idx[0]), int(idx[-1]) + 1, float(pts[0, 0]),
                                     float(pts[-1, 0]), float(base)))
    return Sample(image, target, segments, page.signals, page.fs,
                  page.gain_mm_mv * ppm * sy, int(page.meta.get("seed", -1)), page.style)


def _style(rng: np.random.Generator, cfg: DataConfig) -> str:
    names = [s for s, _ in cfg.styles]
    p = np.array([w for _, w in cfg.styles], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def make_samples(seed: int, cfg: DataConfig, views: int | None = None) -> list[Sample]:
    """Generate page ``seed`` and ``views`` augmented views of it (training)."""
    rng = np.random.default_rng([seed, 7])
    style = _style(rng, cfg)
    page = generate_page(seed, style, width_px=int(rng.integers(*cfg.width_px)))
    truth = paper_truth(page)
    return [_view(page, truth, cfg, rng) for _ in range(views or cfg.views_per_page)]


def validation_sample(seed: int, cfg: DataConfig, style: str = "photo") -> Sample:
    """The exact, unaugmented view of page ``VAL_SEED_BASE + seed``."""
    page = generate_page(VAL_SEED_BASE + seed, style, width_px=cfg.width_px[1])
    return _view(page, paper_truth(page), cfg, None)


class WaveformPages(IterableDataset[dict[str, torch.Tensor]]):
    """An endless stream of ``{"image": uint8 (3,H,W), "target": uint8 (1,H,W)}``.

    Worker ``k`` of ``n`` generates pages ``TRAIN_SEED_BASE + start + k, + n, ...``, so the
    stream is reproducible and a resumed run (``start`` = pages already used) goes on
    with fresh pages.
    """

    def __init__(self, cfg: DataConfig, start: int = 0, seed_base: int = TRAIN_SEED_BASE
                 ) -> None:
        super().__init__()
        self.cfg = cfg
        self.start = start
        self.seed_base = seed_base

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + k
        while True:
            try:
                samples = make_samples(self.seed_base + i, self.cfg)
            except Exception:  # a page the generator cannot draw: skip it, never stall
                samples = []
            i += n
            for s in samples:
                yield {
                    "image": torch.from_numpy(np.ascontiguousarray(s.image.transpose(2, 0, 1))),
                    "target": torch.from_numpy(
                        np.round(s.target * 255).astype(np.uint8)[None]),
                }
