"""Page normalisation: find the grid's line families in a photo or scan and undo perspective.

A printed ECG grid is two families of parallel lines.  In a photo each family converges on a
vanishing point; sending both vanishing points back to infinity and the two line directions
onto the image axes removes perspective, rotation and skew in one homography, using only the
grid (no paper edges, which crops and scans do not show).  Each family's local direction is
read from the power spectrum of overlapping tiles of a grid-enhanced channel, where the grid
is a few sharp peaks and the trace, text and shading are not.

The quarter-turn that a grid cannot tell (0/90/180/270 degrees) is decided afterwards on the
axis-aligned page by :func:`quarter_turns`, from the layout of the ink: traces run along
rows, and calibration pulses and R waves point up.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.fft
from scipy import ndimage

from pipeline.errors import NoGridError
from pipeline.masks import small_blobs

WORK_LONG_SIDE = 1600
"""Long side (px) of the copy that detection runs on; larger pictures are shrunk to it."""
TILE = 128
"""Side (px) of the square tiles whose spectra give the local grid direction."""
TILE_STEP = 64
WEDGE_DEG = 12.0
"""Half-width of the angular window searched around each line family's direction."""
MIN_TILE_FRACTION = 0.04
"""At least this fraction of tiles must show both line families, else there is no grid."""
MAJOR_LINE_MM = 5.0
ORIENT_PX_PER_MM = 4.0
"""Scale of the small rendering the quarter turns are decided on: a 0.3 mm pen stays more
than a pixel wide, so a pulse's leg reads as ink wherever it falls between pixels."""
ORIENT_INK_DARKNESS = 0.6
"""Ink for the orientation cues: darker than this share of the paper around it."""
ORIENT_MARGIN_MM = 2.0
FLIP_MARGIN = 0.1
"""How much better an upside-down pulse must match than an upright one to turn a page."""
MIN_PULSE_MATCH = 0.7
PULSE_AXIS_MARGIN = 0.05
BAND_AXIS_MARGIN = 0.25
PULSE_BAND = 0.25
"""Share of the page width, at either side, searched for calibration pulses."""
PULSE_BLUR_MM = 0.75
"""Blur (mm) that lets a pulse a little off the template's size still match."""
MIN_FAMILY_ENERGY = 0.12
MIN_CHROMA_AGREEMENT = 0.1
"""Least correlation of the chroma channel with the grey-level one for it to be used."""
"""A tile shows a line family when this fraction of its spectral energy lies in its wedge."""


@dataclass(frozen=True)
class WorkImage:
    """The downscaled copy detection runs on; ``scale`` = work px per source px."""

    rgb: np.ndarray
    scale: float


@dataclass(frozen=True)
class TileLattice:
    """Per-tile grid directions found in a grid channel.

    ``normals[:, j]`` is the angle (rad) of the spectral peak of line family ``j`` in each
    tile, i.e. the normal to those lines; ``valid`` marks tiles that show both families.
    """

    centers: np.ndarray  # (n, 2) x, y work px
    normals: np.ndarray  # (n, 2) rad
    strength: np.ndarray  # (n,) share of spectral energy on the two families
    valid: np.ndarray  # (n,) bool
    grid_shape: tuple[int, int]  # tiles per column, per row
    channel: str


def to_work_image(rgb: np.ndarray, long_side: int = WORK_LONG_SIDE) -> WorkImage:
    """Shrink (never enlarge) so the long side is at most ``long_side``."""
    h, w = rgb.shape[:2]
    s = min(1.0, long_side / max(h, w))
    if s < 1.0:
        rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        s = rgb.shape[1] / w
    return WorkImage(rgb=rgb, scale=s)


def grid_channels(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Thin-line channels in which the grid stands out (float32, >= 0).

    ``gray``: black-hat of the lightness, any thin dark line (grey/B&W grids, dots).
    ``chroma``: top-hat of the saturation, thin coloured lines; the black trace has no
    chroma, so this channel shows red, pink, green... grids without the trace.
    Both ignore shading, folds and backgrounds broader than a few pixels.
    """
    r, g, b = cv2.split(rgb)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (7, 7))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    sat = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)).astype(np.float32)
    return {
        "gray": cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel),
        "chroma": cv2.morphologyEx(sat, cv2.MORPH_TOPHAT, kernel),
    }


def ink_mask(rgb: np.ndarray, darkness: float = 0.5) -> np.ndarray:
    """Trace-like pixels: much darker than the paper around them, and not grid-coloured.

    Darkness is judged on the brightest channel, so that a coloured grid line, bright in
    its own colour, is not ink.  Grids are printed red, pink, orange or green; traces black
    or blue: a dark pixel whose colour leans to red or green is grid, not ink.
    """
    r, g, b = cv2.split(rgb)
    value = cv2.max(cv2.max(r, g), b)
    low = cv2.min(cv2.min(r, g), b)
    paper = cv2.dilate(value, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 9)))
    v = value.astype(np.float32)
    dark = v < darkness * paper.astype(np.float32)
    tinted = (v - low.astype(np.float32) > 0.15 * v) & (b < cv2.max(r, g))
    ink = (dark & ~tinted).astype(np.uint8)
    return cv2.dilate(ink, np.ones((3, 3), np.uint8)).astype(bool)


def _tile_stack(channel: np.ndarray, tile: int, step: int) -> tuple[np.ndarray, np.ndarray,
                                                                      tuple[int, int]]:
    """Overlapping tiles (n, tile, tile) and their centres (n, 2)."""
    h, w = channel.shape
    if h < tile or w < tile:
        pad_h, pad_w = max(0, tile - h), max(0, tile - w)
        channel = np.pad(channel, ((0, pad_h), (0, pad_w)))
        h, w = channel.shape
    ys = np.arange(0, h - tile + 1, step)
    xs = np.arange(0, w - tile + 1, step)
    view = np.lib.stride_tricks.sliding_window_view(channel, (tile, tile))[::step, ::step]
    stack = view[: len(ys), : len(xs)].reshape(-1, tile, tile)
    cx, cy = np.meshgrid(xs + (tile - 1) / 2, ys + (tile - 1) / 2)
    return stack, np.stack([cx.ravel(), cy.ravel()], axis=1), (len(ys), len(xs))


def tile_spectra(channel: np.ndarray, tile: int = TILE, step: int = TILE_STEP
                 ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Hann-windowed power spectra of overlapping tiles, each normalised to unit energy.

    Returns ``(power (n, tile, tile//2+1), centres (n, 2), (rows, cols))``; the DC region is
    zeroed, axis 1 is ``fftfreq`` (y) and axis 2 ``rfftfreq`` (x).
    """
    stack, centers, shape = _tile_stack(channel, tile, step)
    stack = stack - stack.mean(axis=(1, 2), keepdims=True)
    win = np.outer(np.hanning(tile), np.hanning(tile)).astype(np.float32)
    spec = scipy.fft.rfft2(stack * win)
    power = spec.real**2 + spec.imag**2
    fy = np.fft.fftfreq(tile)[:, None]
    fx = np.fft.rfftfreq(tile)[None, :]
    power[:, np.hypot(fx, fy) < 2.5 / tile] = 0.0
    # Columns fx = 0 and fx = 1/2 hold both f and -f; the others stand for a mirror pair.
    power[:, :, 0] *= 0.5
    power[:, :, -1] *= 0.5
    power /= power.sum(axis=(1, 2), keepdims=True) + 1e-12
    return power, centers, shape


def _freq_polar(tile: int) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(tile)[:, None]
    fx = np.fft.rfftfreq(tile)[None, :]
    radius = np.hypot(fx, fy)
    angle = np.arctan2(fy, fx) * np.ones_like(radius)  # in [-pi/2, pi/2] since fx >= 0
    return radius, angle


def _wrap_half(a: np.ndarray | float) -> np.ndarray:
    """Wrap angles to [-pi/2, pi/2): line normals are directions modulo pi."""
    return (np.asarray(a) + np.pi / 2) % np.pi - np.pi / 2


def dominant_normal(power_sum: np.ndarray, tile: int) -> float:
    """Angle (rad) of the strongest spectral peak of the summed tile spectra."""
    radius, angle = _freq_polar(tile)
    p = np.where(radius >= 2.5 / tile, power_sum, 0.0)
    i = np.unravel_index(int(np.argmax(p)), p.shape)
    return float(angle[i])


def tile_lattice(spectra: tuple[np.ndarray, np.ndarray, tuple[int, int]], name: str = "",
                 refine: bool = True) -> TileLattice:
    """Direction of both line families in every tile of ``channel``.

    Directions are modulo pi, so they are averaged as doubled angles: a bin at angle phi
    votes with ``exp(2i phi)`` weighted by its power, inside a wedge about the current
    estimate (first the global direction, then each tile's own).  Without ``refine`` only
    the first pass runs (enough to compare channels).
    """
    power, centers, shape = spectra
    tile = power.shape[1]
    radius, angle = _freq_polar(tile)
    peak = power.reshape(len(power), -1).max(axis=1)
    # Weigh tiles by how peaky their spectrum is so that grid tiles lead the global pick.
    theta1 = dominant_normal(np.tensordot(peak, power, axes=1), tile)
    wedge = np.radians(WEDGE_DEG)
    normals = np.zeros((len(power), 2))
    energy = np.zeros((len(power), 2))
    for j, theta in enumerate((theta1, theta1 + np.pi / 2)):
        # Only bins near this family's global direction can ever enter its wedge.
        near = (radius >= 2.5 / tile) & (np.abs(_wrap_half(angle - theta)) < 1.6 * wedge)
        p = power[:, near]
        c2 = np.cos(2 * angle[near]).astype(np.float32)
        s2 = np.sin(2 * angle[near]).astype(np.float32)
        t = np.full(len(p), theta)
        for k, half_width in enumerate((wedge, wedge / 2)):
            if k and not refine:
                break
            cos_rel = (c2[None] * np.cos(2 * t).astype(np.float32)[:, None]
                       + s2[None] * np.sin(2 * t).astype(np.float32)[:, None])
            w = np.where(cos_rel > np.float32(np.cos(2 * half_width)), p, np.float32(0))
            if k == 0:
                energy[:, j] = w.sum(axis=1)
            t = 0.5 * np.arctan2(w @ s2, w @ c2)
        normals[:, j] = _wrap_half(t)
    strength = energy.min(axis=1)
    valid = strength > MIN_FAMILY_ENERGY
    return TileLattice(centers, normals, strength, valid, shape, name)


def best_lattice(rgb: np.ndarray) -> TileLattice:
    """The grid channel whose tiles show the two line families most clearly."""
    channels = grid_channels(rgb)
    # The chroma channel shows grid lines only if they are more saturated than the paper;
    # grey lines on tinted paper are saturation dips, and the channel peaks between them.
    g = channels["gray"] - channels["gray"].mean()
    c = channels["chroma"] - channels["chroma"].mean()
    if float((g * c).mean()) < MIN_CHROMA_AGREEMENT * float(g.std() * c.std()):
        del channels["chroma"]
    spectra = {name: tile_spectra(ch) for name, ch in channels.items()}
    scores = {}
    for name, spec in spectra.items():
        lat = tile_lattice(spec, name, refine=False)
        scores[name] = float(np.sum(lat.strength[lat.valid]))
    name = max(scores, key=lambda k: scores[k])
    best = tile_lattice(spectra[name], name)
    if best.valid.mean() < MIN_TILE_FRACTION or best.valid.sum() < 4:
        raise NoGridError("no two crossing families of lines")
    return best


def _vanishing_point(centers: np.ndarray, normals: np.ndarray, weights: np.ndarray
                     ) -> np.ndarray:
    """Homogeneous point closest (weighted, robust) to the lines through the tiles."""
    n = np.stack([np.cos(normals), np.sin(normals)], axis=1)
    lines = np.concatenate([n, -(n * centers).sum(axis=1, keepdims=True)], axis=1)
    w = weights.copy()
    v = np.array([-n[0, 1], n[0, 0], 0.0])
    for _ in range(5):  # iteratively reweighted least squares (Cauchy)
        m = (lines * w[:, None]).T @ lines
        _, vecs = np.linalg.eigh(m)
        v = vecs[:, 0]
        # residual: angle between the tile's line and the direction to v
        if abs(v[2]) > 1e-9:
            d = v[:2] / v[2] - centers
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
        else:
            d = np.broadcast_to(v[:2] / (np.linalg.norm(v[:2]) + 1e-12), centers.shape)
        res = np.abs((d * n).sum(axis=1))  # sin of the angle
        scale = max(float(np.median(res)) * 2.0, np.radians(0.3))
        w = weights / (1.0 + (res / scale) ** 2)
    return v


def rectifying_homography(lattice: TileLattice, shape: tuple[int, int]) -> np.ndarray:
    """3x3 map from work px to a frame where both line families are axis-aligned.

    The scale is about that of the work image at the grid's centroid; no translation yet.
    """
    h, w = shape
    norm = np.array([[2.0 / max(h, w), 0, -w / max(h, w)], [0, 2.0 / max(h, w), -h / max(h, w)],
                     [0, 0, 1.0]])
    c = lattice.centers[lattice.valid]
    c_n = c * norm[0, 0] + norm[:2, 2]
    wts = lattice.strength[lattice.valid]
    vps = [_vanishing_point(c_n, lattice.normals[lattice.valid, j], wts) for j in (0, 1)]
    horizon = np.cross(vps[0], vps[1])
    if abs(horizon[2]) < 1e-9 or np.linalg.norm(horizon[:2]) / abs(horizon[2]) > 0.8:
        # Horizon implausibly close (through the picture): keep the affine part only.
        horizon = np.array([0.0, 0.0, 1.0])
    horizon = horizon / horizon[2]
    hp = np.array([[1.0, 0, 0], [0, 1.0, 0], horizon])
    dirs = []
    for vp in vps:
        d = (hp @ vp)[:2]
        dirs.append(d / (np.linalg.norm(d) + 1e-12))
    # Family whose lines run closest to the x axis becomes horizontal.
    a, b = (dirs[0], dirs[1]) if abs(dirs[0][0]) >= abs(dirs[1][0]) else (dirs[1], dirs[0])
    a = a if a[0] >= 0 else -a
    b = b if b[1] >= 0 else -b
    basis = np.column_stack([a, b])
    if abs(np.linalg.det(basis)) < 0.2:
        raise NoGridError("line families are not crossing")
    aff = np.eye(3)
    aff[:2, :2] = np.linalg.inv(basis)
    m = np.linalg.inv(norm) @ aff @ hp @ norm
    # Unit area at the grid's centroid.
    centroid = np.average(c, axis=0, weights=wts)
    jac = _jacobian(m, centroid)
    s = 1.0 / np.sqrt(abs(np.linalg.det(jac)))
    return np.diag([s, s, 1.0]) @ m


def _jacobian(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    x, y = p
    den = m[2, 0] * x + m[2, 1] * y + m[2, 2]
    u = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / den
    v = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / den
    return np.array([[(m[0, 0] - u * m[2, 0]) / den, (m[0, 1] - u * m[2, 1]) / den],
                     [(m[1, 0] - v * m[2, 0]) / den, (m[1, 1] - v * m[2, 1]) / den]])


def apply_homography(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (k, 2) points through the 3x3 homography ``m``."""
    p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    q = p @ m[:2, :2].T + m[:2, 2]
    z = p @ m[2, :2] + m[2, 2]
    return q / z[:, None]


def _page_ink(page_rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Ink of an axis-aligned page without grid lines or paper edges (float 0/1).

    Dark (black or grey) grid lines are rows and columns that run across much of the page
    and repeat 5 mm either side; a trace's flat baseline (or a pulse's legs) does not.  A
    paper edge against the table is an unbroken line near the border along half the page
    or more; a stack of calibration pulses has gaps between the rows.
    """
    ink = ink_mask(page_rgb, darkness=ORIENT_INK_DARKNESS).astype(np.float32)
    m = round(ORIENT_MARGIN_MM * px_per_mm)
    ink[:m] = 0.0
    ink[-m:] = 0.0
    ink[:, :m] = 0.0
    ink[:, -m:] = 0.0
    shift = round(MAJOR_LINE_MM * px_per_mm)
    # Dots of a dotted grid (and specks) are small isolated blobs.
    ink[small_blobs(ink > 0, 1.2 * px_per_mm)] = 0.0
    for axis in (1, 0):
        cover = ink.mean(axis=axis) > 0.25
        drop = cover & np.roll(cover, shift) & np.roll(cover, -shift)
        n = len(cover)
        for i in [*range(round(0.08 * n)), *range(n - round(0.08 * n), n)]:
            line = ink[i] if axis == 1 else ink[:, i]
            if _longest_run(line) > 0.5 * len(line):
                drop[i] = True
        if axis == 1:
            ink[drop, :] = 0.0
        else:
            ink[:, drop] = 0.0
    return ink


def _longest_run(line: np.ndarray) -> int:
    """Length of the longest run of non-zero values."""
    on = np.concatenate([[0], (line > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(on))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def _banding(profile: np.ndarray, px_per_mm: float) -> float:
    """How strongly ink along one axis comes in separated bands (trace rows): 0..~1."""
    p = ndimage.uniform_filter1d(profile, max(3, round(MAJOR_LINE_MM * px_per_mm)))
    if p.max() <= 0:
        return 0.0
    core = np.nonzero(p > 0.2 * p.max())[0]
    p = p[core[0] : core[-1] + 1]
    return float(np.std(p) / (np.mean(p) + 1e-9))


def _pulse_templates(px_per_mm: float) -> list[np.ndarray]:
    """Upright 1 mV calibration pulses, 5/10/20 mm tall, 5/10 mm wide, with and without feet.

    The outline (foot, leg, top, leg, foot) is +1 and everything around it slightly
    negative, so a solid blob, text or a lone spike does not match; turned upside down
    the feet and the top swap ends, which is what tells the two apart.
    """
    out = []
    m = round(2 * px_per_mm)
    stroke = max(2, round(0.75 * px_per_mm))
    for h_mm in (5.0, 10.0, 20.0):
        for w_mm in (5.0, 10.0):
            for feet in (True, False):
                h, w = round(h_mm * px_per_mm), round(w_mm * px_per_mm)
                t = np.full((h + 2 * m, w + 2 * m), -0.15, np.float32)
                top, base, left, right = m, m + h, m, m + w
                pts = [(left, base), (left, top), (right, top), (right, base)]
                if feet:
                    pts = [(0, base), *pts, (w + 2 * m - 1, base)]
                cv2.polylines(t, [np.array(pts, np.int32)], False, 1.0, stroke)
                out.append(t)
    return out


def pulse_evidence(ink: np.ndarray, px_per_mm: float) -> tuple[float, float]:
    """Best match of an upright and of an upside-down calibration pulse (-1..1 each).

    Pulses stand at the start (or end) of the rows, so only the outer bands are searched.
    """
    pad = round(6 * px_per_mm)  # a pulse cut by the picture's edge still half-matches
    f = cv2.copyMakeBorder(ink.astype(np.float32), 0, 0, pad, pad, cv2.BORDER_CONSTANT, value=0)
    # Blurred by ~1 mm, a pulse a little narrower or shorter than the template still fits.
    f = cv2.GaussianBlur(f, (0, 0), PULSE_BLUR_MM * px_per_mm)
    w = f.shape[1]
    band = round(PULSE_BAND * w)
    up = down = 0.0
    for t in _pulse_templates(px_per_mm):
        th, tw = t.shape
        if th >= f.shape[0] or tw >= w:
            continue
        flipped = np.ascontiguousarray(t[::-1])
        for part in (f[:, : min(w, band + tw)], f[:, max(0, w - band - tw) :]):
            if part.shape[1] <= tw:
                continue
            # Where the window holds (almost) no ink the normalised score is meaningless.
            share = cv2.boxFilter(part, -1, (tw, th), anchor=(0, 0), normalize=True,
                                  borderType=cv2.BORDER_CONSTANT)
            inked = share[: part.shape[0] - th + 1, : part.shape[1] - tw + 1] > 0.02
            if not inked.any():
                continue
            up = max(up, float(cv2.matchTemplate(part, t, cv2.TM_CCOEFF_NORMED)[inked].max()))
            down = max(down, float(
                cv2.matchTemplate(part, flipped, cv2.TM_CCOEFF_NORMED)[inked].max()))
    return up, down


def quarter_turns(page_rgb: np.ndarray, px_per_mm: float) -> int:
    """Clockwise quarter turns that bring the traces of a grid-aligned page upright.

    Traces run along rows, so ink comes in horizontal bands: if the bands run vertically
    the page lies on its side.  Upside down is decided by the 1 mV calibration pulse, which
    always rises from the baseline; pages are rarely upside down, so it takes a clearly
    better match of the inverted pulse to turn the page over.
    """
    ink = _page_ink(page_rgb, px_per_mm)
    if ink.sum() < 50:
        return 0
    # Pulses are upright rectangles, never lying; rows of traces band the ink along y.
    # The page is turned on its side only when one cue says so clearly and the other
    # does not object: rotated pictures are rare, and a wrong turn ruins the page.
    by_bands = float(np.log((_banding(ink.sum(axis=0), px_per_mm) + 1e-3)
                            / (_banding(ink.sum(axis=1), px_per_mm) + 1e-3)))
    level = pulse_evidence(ink, px_per_mm)
    side = (0.0, 0.0)
    if by_bands > -BAND_AXIS_MARGIN:  # otherwise the bands alone rule the side out
        side = pulse_evidence(np.ascontiguousarray(np.rot90(ink, k=-1)), px_per_mm)
    by_pulses = max(side) - max(level)
    sideways = (by_pulses > PULSE_AXIS_MARGIN and by_bands > -BAND_AXIS_MARGIN) or (
        by_bands > BAND_AXIS_MARGIN and by_pulses > -PULSE_AXIS_MARGIN)
    up, down = side if sideways else level
    turns = 1 if sideways else 0
    if down > max(up + FLIP_MARGIN, MIN_PULSE_MATCH):
        turns += 2
    return turns % 4
