"""Make a clean page look scanned or photographed, keeping its ground truth exact.

Geometric changes go through one ``Warp`` (see ``warp.py``) that moves the pixels and the
ground-truth points alike; photometric changes (light, blur, noise, JPEG, ...) never move
anything. Handwriting and paper shading are drawn on the page before the warp, so they
follow the paper.

Pictures stay uint8 from the warp on, and every whole-picture step is one OpenCV call
(remaps of 1 or 3 channels, which have fast paths; light as a u8 product; noise from
``cv2.randn`` seeded from the page's generator): this is what keeps generation at the
rate training needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from pipeline.synthetic.render import RenderedPage, cv_scalar
from pipeline.synthetic.warp import Homography, Lens, PaperWarp, Warp

LIGHT_ONE = 192.0
"""u8 value of a light factor of 1: light maps are u8 ``factor * LIGHT_ONE`` (up to 1.33)."""
SHADE_ONE = 160.0
"""u8 value of a paper shading factor of 1 in the warped shading layer (0.5-1.2 fits)."""


@dataclass
class Degraded:
    """The output image and the ground-truth layers moved with it."""

    image: np.ndarray
    lead_mask: np.ndarray
    grid_alpha: np.ndarray
    warp: Warp
    meta: dict[str, Any] = field(default_factory=dict)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int,
                  lo: float, hi: float) -> np.ndarray:
    """A smooth random field in [lo, hi] (H,W) float32, made small and upsampled."""
    h, w = shape
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, cells)
    small = rng.uniform(lo, hi, (ch, cw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _cursive_words(rng: np.random.Generator, p0: np.ndarray, x_height: float
                   ) -> list[np.ndarray]:
    """Handwriting-like pen strokes: words of looped letters (a trochoid), slanted.

    Each letter is one loop whose height says whether it is small (e, n), tall (l, h) or
    descending (g, y); words are separate strokes.
    """
    strokes = []
    x = 0.0
    slant = rng.uniform(0.1, 0.4)
    for _ in range(int(rng.integers(1, 5))):
        letters = int(rng.integers(2, 9))
        heights = rng.choice([1.0, 1.0, 1.0, 2.3, -1.6], letters) * rng.uniform(0.8, 1.2, letters)
        widths = rng.uniform(0.6, 1.1, letters)
        t = np.linspace(0.0, letters, letters * 14)
        k = np.minimum(t.astype(int), letters - 1)
        theta = 2 * np.pi * (t - k)
        adv = np.concatenate([[0.0], np.cumsum(widths)])[k] + widths[k] * (t - k)
        rise = heights[k] * (1 - np.cos(theta)) / 2
        px = adv - 0.35 * widths[k] * np.sin(theta)
        py = -rise
        px = px - slant * py
        pts = np.stack([x + px, py + rng.normal(0, 0.04, len(t)).cumsum() * 0.3], axis=1)
        strokes.append(p0 + pts * x_height)
        x += float(widths.sum()) + rng.uniform(1.0, 2.0)
    return strokes


def add_handwriting(image: np.ndarray, rng: np.random.Generator, ppm: float) -> int:
    """Pen marks: words, underlines and circles, in blue or black ink. Returns a count."""
    h, w = image.shape[:2]
    colour = ((30, 50, 150), (25, 25, 30), (20, 30, 100))[int(rng.integers(0, 3))]
    thick = max(1, round(rng.uniform(0.25, 0.6) * ppm))
    count = int(rng.integers(1, 4))
    for _ in range(count):
        p0 = np.array([rng.uniform(0.05, 0.7) * w, rng.uniform(0.03, 0.95) * h])
        kind = rng.random()
        if kind < 0.6:
            paths = _cursive_words(rng, p0, rng.uniform(2.0, 4.5) * ppm)
        elif kind < 0.8:  # underline / arrow stroke
            end = p0 + np.array([rng.uniform(20, 80), rng.normal(0, 4)]) * ppm
            paths = [np.linspace(p0, end, 20) + rng.normal(0, 0.3 * ppm, (20, 2))]
        else:  # circle around something
            a = np.linspace(0, 2 * np.pi * rng.uniform(1.0, 1.2), 60)
            r = rng.uniform(5, 15) * ppm
            paths = [p0 + np.stack([np.cos(a) * r * rng.uniform(1, 2), np.sin(a) * r], axis=1)]
        cv2.polylines(image, [np.round(p * 16).astype(np.int32) for p in paths], False, colour,
                      thick, cv2.LINE_AA, 4)
    return count


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:
        return image
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _warp_layer(warp: Warp, maps: tuple[np.ndarray, np.ndarray] | None, layer: np.ndarray,
                interp: int, border: float | tuple[float, ...] = 0) -> np.ndarray:
    w, h = warp.out_size
    if maps is None:
        c = warp.components[0]
        assert isinstance(c, Homography)
        return cv2.warpPerspective(layer, c.matrix, (w, h), flags=interp,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=border)
    return cv2.remap(layer, maps[0], maps[1], interp, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=border)


def _lit(img: np.ndarray, light: np.ndarray | None, cast: np.ndarray) -> np.ndarray:
    """``img`` (u8 RGB) times a smooth light field (H,W float32, or None) times a colour cast."""
    if light is None:
        return cv2.multiply(img, cv_scalar(cast))  # type: ignore[call-overload]
    planes = [cv2.convertScaleAbs(light, alpha=float(c) * LIGHT_ONE) for c in cast]
    return cv2.multiply(img, cv2.merge(planes), scale=1.0 / LIGHT_ONE)


def _photometric(img: np.ndarray, rng: np.random.Generator, meta: dict[str, Any], *,
                 blur: tuple[float, float], noise: tuple[float, float],
                 jpeg: tuple[int, int], p_jpeg: float, p_moire: float) -> np.ndarray:
    """Blur, moire, noise, JPEG on a uint8 RGB image; returns uint8."""
    h, w = img.shape[:2]
    sigma = float(rng.uniform(*blur))
    if sigma > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
        meta["blur_sigma_px"] = round(sigma, 2)
    if rng.random() < p_moire:
        period = rng.uniform(2.5, 6.0)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * np.cos(ang) + yy * np.sin(ang)) * (2 * np.pi / period)
        beat = np.cos(phase + 0.3 * np.sin(yy * 0.01 + xx * 0.013))
        gain = (1.0 + float(rng.uniform(0.02, 0.06)) * beat).astype(np.float32)
        img = _lit(img, gain, np.ones(3))
        meta["moire_period_px"] = round(float(period), 2)
    sd = float(rng.uniform(*noise))
    seed = int(rng.integers(0, 2**31 - 1))
    if sd > 0.3:  # luminance noise, the same in the three channels
        grain = np.empty((h, w), np.int8)
        cv2.setRNGSeed(seed)
        cv2.randn(grain, np.zeros(1), np.full(1, sd))
        img = cv2.add(img, cv2.merge([grain, grain, grain]), dtype=cv2.CV_8U)
        meta["noise_sd"] = round(sd, 2)
    if rng.random() < p_jpeg:
        q = int(rng.integers(jpeg[0], jpeg[1] + 1))
        img = _jpeg(img, q)
        meta["jpeg_quality"] = q
    return img


def degrade_scan(page: RenderedPage, rng: np.random.Generator) -> Degraded:
    """A flatbed scan or fax: small skew and shift, scanner border, blur, noise, JPEG."""
    meta: dict[str, Any] = {}
    img_page = page.image.copy()
    ppm = page.px_per_mm
    if rng.random() < 0.2:
        meta["handwriting"] = add_handwriting(img_page, rng, ppm)
    h, w = img_page.shape[:2]
    angle = float(np.clip(rng.normal(0, 1.2), -4, 4))
    if rng.random() < 0.03:
        angle += 180.0
    scale = float(rng.uniform(0.96, 1.0))
    shift = rng.uniform(-0.015, 0.015, 2) * (w, h)
    m = np.vstack([cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale), [0, 0, 1]])
    m[:2, 2] += shift
    out_w, out_h = w, h
    if rng.random() < 0.15:  # the scan cuts off part of the page
        cut = rng.uniform(0.0, 0.04, 4) * (w, h, w, h) * (rng.random(4) < 0.5)
        m[:2, 2] -= cut[:2]
        out_w, out_h = round(w - cut[0] - cut[2]), round(h - cut[1] - cut[3])
        meta["crop_px"] = [round(float(c)) for c in cut]
    warp = Warp((out_w, out_h), [Homography(m)])
    meta.update(rotation_deg=round(angle, 2), scale=round(scale, 4))
    h, w = out_h, out_w
    bg = (255.0, 255.0, 255.0) if rng.random() < 0.7 else (
        (60.0, 60.0, 60.0) if rng.random() < 0.5 else (10.0, 10.0, 10.0))
    img = _warp_layer(warp, None, img_page, cv2.INTER_LINEAR, bg)
    lead_mask = _warp_layer(warp, None, page.lead_mask, cv2.INTER_NEAREST)
    grid = _warp_layer(warp, None, page.grid_alpha, cv2.INTER_LINEAR)
    cast = np.ones(3)
    if rng.random() < 0.5:  # paper tone and scanner colour response
        cast = rng.uniform(0.93, 1.0, 3)
    light = None
    if rng.random() < 0.3:
        light = _smooth_field(rng, (h, w), 3, 0.9, 1.0)
        meta["uneven_light"] = True
    if light is not None or (cast != 1.0).any():
        img = _lit(img, light, cast)
    if rng.random() < 0.15:  # crease of a folded page, scanned flat
        meta["crease"] = True
        x = rng.uniform(0.2, 0.8) * w
        cv2.line(img, (round(x), 0), (round(x + rng.normal(0, 0.02) * w), h),
                 (150, 150, 150), max(1, round(0.25 * ppm)), cv2.LINE_AA)
    out = _photometric(img, rng, meta, blur=(0.0, 1.0), noise=(0.0, 5.0), jpeg=(55, 95),
                       p_jpeg=0.6, p_moire=0.08)
    if rng.random() < 0.2:
        g = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
        if rng.random() < 0.2:  # fax-like black and white
            g = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY,
                                      31, 12)
            meta["binarized"] = True
        out = cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)
        meta["grayscale"] = True
    return Degraded(out, lead_mask, grid, warp, meta)


def _desk(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A table/desk texture (u8 RGB) around the paper, made at 1/4 size and upsampled."""
    kind = str(rng.choice(["wood", "dark", "grey", "cloth", "white"],
                          p=[0.45, 0.18, 0.17, 0.1, 0.1]))
    sw, sh = max(64, w // 4), max(48, h // 4)
    if kind == "wood":
        base = np.array(rng.uniform(110, 200) * np.array(
            [1.0, rng.uniform(0.58, 0.75), rng.uniform(0.35, 0.55)]), np.float32)
        # Grain: noise stretched along the board, at two scales, plus a few dark streaks.
        fine = cv2.resize(rng.normal(0, 1, (sh, max(4, sw // 40))).astype(np.float32), (sw, sh))
        coarse = cv2.resize(rng.normal(0, 1, (max(4, sh // 6), max(3, sw // 60))).astype(
            np.float32), (sw, sh), interpolation=cv2.INTER_CUBIC)
        grain = 0.05 * fine + 0.08 * coarse
        tex = base[None, None, :] * (1 + grain[..., None])
        if rng.random() < 0.5:
            tex = cv2.rotate(cv2.resize(tex, (sh, sw)), cv2.ROTATE_90_CLOCKWISE)
    elif kind == "cloth":
        base = np.array(rng.uniform([40, 40, 60], [120, 110, 160]), np.float32)
        yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
        weave = np.sin(xx * 2.1) * np.sin(yy * 2.1)
        tex = base[None, None, :] * (1 + 0.06 * weave[..., None])
    else:
        lo, hi = {"dark": (15, 70), "grey": (110, 200), "white": (200, 245)}[kind]
        v = rng.uniform(lo, hi)
        base = np.array(v + rng.normal(0, 6, 3), np.float32)
        mottle = cv2.resize(rng.normal(0, 1, (6, 8)).astype(np.float32), (sw, sh),
                            interpolation=cv2.INTER_CUBIC)
        tex = base[None, None, :] * (1 + 0.05 * mottle[..., None])
    tex = tex * (1 + rng.normal(0, 0.02, (sh, sw, 1)).astype(np.float32))
    small = np.clip(tex + 0.5, 0, 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), kind


def _paper_shading(rng: np.random.Generator, page: RenderedPage, pw: PaperWarp,
                   creases: int) -> np.ndarray:
    """Multiplicative light on the paper (page px) from folds and crumple creases.

    A fold darkens one side and leaves a thin line; a crumpled sheet is many short creases
    whose facets catch the light differently. Computed at 1/6 size and upsampled.
    """
    h, w = page.image.shape[:2]
    sh, sw = max(32, h // 6), max(48, w // 6)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    xs = (xx + 0.5) * w / sw - 0.5 - w / 2
    ys = (yy + 0.5) * h / sh - 0.5 - h / 2
    shade = np.ones((sh, sw), np.float32)
    for ang, off, strength, _soft, _ in pw.folds:
        d = xs * math.cos(ang) + ys * math.sin(ang) - off
        side = 0.5 + 0.5 * np.tanh(d / (0.008 * w))
        shade *= 1.0 - float(rng.uniform(0.03, 0.1)) * side * (1 if strength > 0 else -0.6)
        shade *= 1.0 - float(rng.uniform(-0.08, 0.15)) * np.exp(-((d / (0.003 * w)) ** 2))
    for _ in range(creases):
        ang = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(-0.5, 0.5) * w, rng.uniform(-0.5, 0.5) * h
        nx, ny = math.cos(ang), math.sin(ang)
        d = (xs - cx) * nx + (ys - cy) * ny
        along = (xs - cx) * -ny + (ys - cy) * nx
        env = np.exp(-((along / (rng.uniform(0.1, 0.4) * w)) ** 2))
        step = np.tanh(d / (rng.uniform(0.002, 0.02) * w))
        line = np.exp(-((d / (0.002 * w)) ** 2))
        shade *= 1.0 + env * (float(rng.uniform(-0.05, 0.05)) * step
                              + float(rng.uniform(-0.12, 0.08)) * line)
    return cv2.resize(np.clip(shade, 0.5, 1.2).astype(np.float32), (w, h),
                      interpolation=cv2.INTER_LINEAR)


def degrade_photo(page: RenderedPage, rng: np.random.Generator, out_w: int,
                  out_h: int) -> Degraded:
    """A phone photo: perspective, lens, curl, folds, wrinkles, light, background, JPEG."""
    meta: dict[str, Any] = {}
    img_page = page.image.copy()
    ppm = page.px_per_mm
    h, w = img_page.shape[:2]
    if rng.random() < 0.3:
        meta["handwriting"] = add_handwriting(img_page, rng, ppm)
    # Paper deformation.
    curl = (float(rng.normal(0, 0.012) * h), float(rng.normal(0, 0.006) * w))
    folds = []
    n_folds = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.3, 0.17, 0.08]))
    for _ in range(n_folds):
        horizontal = rng.random() < 0.5
        ang = (np.pi / 2 if horizontal else 0.0) + rng.normal(0, 0.15)
        if rng.random() < 0.25:
            ang = rng.uniform(0, np.pi)  # diagonal corner fold
        off = rng.uniform(-0.3, 0.3) * (h if horizontal else w)
        folds.append((float(ang), float(off), float(rng.normal(0, 0.008)),
                      float(rng.uniform(2, 6) * ppm), 0.0))
    waves = []
    crumpled = rng.random() < 0.3
    for _ in range(int(rng.integers(4, 9)) if crumpled else int(rng.integers(0, 3))):
        lam = rng.uniform(15, 60) * ppm
        a = rng.uniform(0, np.pi)
        amp = rng.uniform(0.05, 0.15 if crumpled else 0.08) * lam / (2 * np.pi)
        d = rng.uniform(0, np.pi)
        waves.append((float(2 * np.pi / lam * np.cos(a)), float(2 * np.pi / lam * np.sin(a)),
                      float(rng.uniform(0, 2 * np.pi)), float(amp * np.cos(d) * 0.2),
                      float(amp * np.sin(d) * 0.2)))
    pw = PaperWarp((float(w), float(h)), curl, folds, waves)
    creases = int(rng.integers(8, 25)) if crumpled else int(rng.integers(0, 3))
    meta.update(curl_px=[round(c, 1) for c in curl], folds=len(folds), wrinkles=len(waves),
                creases=creases)
    shade = _paper_shading(rng, page, pw, creases) if (folds or creases) else None
    # Camera: where the page corners land.
    frac = float(rng.uniform(0.72, 0.97) if rng.random() < 0.9 else rng.uniform(0.97, 1.12))
    big_rot = float(rng.choice([0.0, 90.0, 180.0, 270.0], p=[0.94, 0.02, 0.02, 0.02]))
    angle = float(rng.normal(0, 6.0)) + big_rot
    page_w_out = frac * (out_w if big_rot in (0.0, 180.0) else out_h)
    fit = out_h if big_rot in (0.0, 180.0) else out_w
    s = min(page_w_out / w, 1.05 * fit / h)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) - (w / 2, h / 2)
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    dst = corners * s @ rot.T
    dst += rng.normal(0, 0.035, (4, 2)) * s * max(w, h)  # perspective
    dst += (out_w / 2, out_h / 2) + rng.normal(0, 0.03, 2) * (out_w, out_h)
    m = cv2.getPerspectiveTransform(np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32),
                                    dst.astype(np.float32)).astype(np.float64)
    lens = Lens((out_w / 2, out_h / 2), math.hypot(out_w, out_h) / 2,
                float(rng.uniform(-0.06, 0.06)))
    warp = Warp((out_w, out_h), [lens, Homography(m), pw])
    meta.update(rotation_deg=round(angle, 2), page_fraction=round(frac, 3),
                lens_k1=round(lens.k1, 4))
    maps = warp.maps()
    desk, kind = _desk(rng, out_h, out_w)
    meta["background"] = kind
    # The paper lands on the desk; where the page does not reach, the desk stays.
    img = cv2.remap(img_page, maps[0], maps[1], cv2.INTER_LINEAR, dst=desk,
                    borderMode=cv2.BORDER_TRANSPARENT)
    lead_mask = cv2.remap(page.lead_mask, maps[0], maps[1], cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    shading: np.ndarray | None = None
    if shade is None:
        grid = cv2.remap(page.grid_alpha, maps[0], maps[1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    else:  # grid and shading in one 3-channel remap (the fast path); off the paper: no shade
        shade_u8 = cv2.convertScaleAbs(shade, alpha=SHADE_ONE)
        layers = cv2.remap(cv2.merge([page.grid_alpha, shade_u8, shade_u8]), maps[0], maps[1],
                           cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=(0, SHADE_ONE, SHADE_ONE))
        grid, shading = layers[..., 0].copy(), layers[..., 1]
    # Light at 1/8 resolution: gradient/vignette, shadow, glare; then one resize.
    sh, sw = max(8, out_h // 8), max(8, out_w // 8)
    light: np.ndarray = _smooth_field(rng, (sh, sw), 3, 0.75, 1.05)
    glare = None
    if rng.random() < 0.45:
        meta["shadow"] = True
        poly = (np.array([[rng.uniform(-0.2, 1.2), rng.uniform(-0.2, 1.2)] for _ in range(4)])
                * (sw, sh))
        drawn = np.zeros((sh, sw), np.float32)
        cv2.fillPoly(drawn, [np.round(poly).astype(np.int32)], 1.0)
        smask: np.ndarray = cv2.GaussianBlur(drawn, (0, 0), rng.uniform(1.5, 6.0))
        light = light * (1.0 - float(rng.uniform(0.2, 0.45)) * smask)
    if rng.random() < 0.15:
        meta["glare"] = True
        yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
        cx, cy = rng.uniform(0.2, 0.8) * sw, rng.uniform(0.2, 0.8) * sh
        r = rng.uniform(0.05, 0.2) * sw
        glare = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) * rng.uniform(0.2, 0.5)
    light_full = cv2.resize(light.astype(np.float32), (out_w, out_h),
                            interpolation=cv2.INTER_LINEAR)
    if shading is not None:
        light_full = cv2.multiply(light_full, shading, scale=1.0 / SHADE_ONE, dtype=cv2.CV_32F)
    cast = rng.uniform([0.88, 0.9, 0.86], [1.0, 1.0, 1.02])
    img = _lit(img, light_full, cast)
    if glare is not None:  # washes the picture toward white
        g = cv2.resize(glare.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        img = cv2.blendLinear(img, np.full_like(img, 255), 1.0 - g, g)
    out = _photometric(img, rng, meta, blur=(0.2, 1.4), noise=(1.0, 6.0), jpeg=(60, 95),
                       p_jpeg=0.9, p_moire=0.05)
    return Degraded(out, lead_mask, grid, warp, meta)
