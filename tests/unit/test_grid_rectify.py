"""The rectified page against the synthetic pages' exact paper-mm -> pixel ground truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import geometry
from pipeline.grid import DEFAULT_PX_PER_MM, MAJOR_MM, RectifiedPage, rectify
from pipeline.leads import Layout
from pipeline.synthetic import SyntheticPage, generate_page, random_spec

# Thresholds well below what the stage measures (median ~0.1 mm, p95 ~0.3 mm on these pages).
MEDIAN_ERROR_MM = 0.5
P95_ERROR_MM = 1.5


def paper_mm_of(page: SyntheticPage, rect: RectifiedPage, q: np.ndarray) -> np.ndarray:
    """Where rectified pixels ``q`` lie on the printed paper, by the page's true warp."""
    src = rect.to_source(q)
    return page.paper_to_image.warp.inverse(src) / page.paper_to_image.px_per_mm


def grid_points(page: SyntheticPage, rect: RectifiedPage, n: int = 21
                ) -> tuple[np.ndarray, np.ndarray]:
    """A lattice of rectified pixels and their true paper mm, kept where the grid is printed."""
    h, w = rect.image.shape[:2]
    ys, xs = np.mgrid[0.05 * h : 0.95 * h : n * 1j, 0.05 * w : 0.95 * w : n * 1j]
    q = np.stack([xs.ravel(), ys.ravel()], axis=1)
    mm = paper_mm_of(page, rect, q)
    gx0, gy0, gx1, gy1 = page.meta["grid_mm"]
    keep = (mm[:, 0] > gx0) & (mm[:, 0] < gx1) & (mm[:, 1] > gy0) & (mm[:, 1] < gy1)
    return q[keep], mm[keep]


def straightness_error_mm(page: SyntheticPage, rect: RectifiedPage) -> np.ndarray:
    """Distance (mm) of each point from where a straight, true-scale page would put it."""
    q, mm = grid_points(page, rect)
    assert len(q) > 100
    pred = q / rect.px_per_mm  # upright page: rectified px / px_per_mm is paper mm + offset
    offset = np.median(mm - pred, axis=0)
    return np.linalg.norm(mm - pred - offset, axis=1)


@pytest.mark.parametrize("seed", [2, 5, 11])
def test_photo_is_straightened_to_true_scale(seed: int) -> None:
    page = generate_page(seed, "photo", width_px=2400)
    rect = rectify(page.image, debug=False)
    assert rect.quarter_turns == 0
    err = straightness_error_mm(page, rect)
    assert np.median(err) < MEDIAN_ERROR_MM
    assert np.percentile(err, 95) < P95_ERROR_MM
    assert 0.3 < rect.grid_confidence <= 1.0


def test_scan_fields_and_major_grid_origin() -> None:
    spec = dataclasses.replace(random_spec(np.random.default_rng(8), "scan"), dpi=250.0,
                               grid_color="red", grid_style="lines", signal_source="model")
    page = generate_page(8, "scan", spec=spec)
    rect = rectify(page.image)
    assert rect.image.dtype == np.uint8 and rect.image.ndim == 3 and rect.image.shape[2] == 3
    assert rect.px_per_mm == DEFAULT_PX_PER_MM
    assert rect.minor_lines
    assert set(rect.seconds) >= {"perspective", "pitch", "dewarp", "resample"}
    assert rect.steps and all(v.dtype == np.uint8 for v in rect.steps.values())
    # grid_origin_px is a crossing of 5 mm lines: on the paper it sits on the printed grid's
    # 5 mm lattice, whose lines start at the grid's top-left corner.
    gx0, gy0 = page.meta["grid_mm"][:2]
    ox, oy = paper_mm_of(page, rect, np.array([rect.grid_origin_px]))[0]
    for pos, start in ((ox, gx0), (oy, gy0)):
        off = (pos - start) % MAJOR_MM
        assert min(off, MAJOR_MM - off) < 0.3


def test_low_resolution_scan_is_not_enlarged() -> None:
    spec = dataclasses.replace(random_spec(np.random.default_rng(4), "clean"), dpi=110.0,
                               grid_color="pink", signal_source="model")
    page = generate_page(4, "clean", spec=spec)
    rect = rectify(page.image, target_px_per_mm=10.0, orient=False)
    assert rect.px_per_mm == pytest.approx(page.px_per_mm, rel=0.02)
    assert rect.image.shape[1] <= page.image.shape[1] * 1.05


def test_to_source_follows_the_pixels() -> None:
    """A dark dot drawn in the source lands where to_source says it came from."""
    spec = dataclasses.replace(random_spec(np.random.default_rng(3), "scan"), dpi=200.0,
                               signal_source="model")
    page = generate_page(3, "scan", spec=spec)
    rect = rectify(page.image, orient=False)
    h, w = rect.image.shape[:2]
    q = np.array([[w * 0.31, h * 0.42]])
    sx, sy = rect.to_source(q)[0]
    marked = page.image.copy()
    marked[round(sy) - 3 : round(sy) + 4, round(sx) - 3 : round(sx) + 4] = (0, 255, 0)
    again = rectify(marked, orient=False)
    green = (again.image[..., 1] > 150) & (again.image[..., 0] < 100) & (again.image[..., 2] < 100)
    ys, xs = np.nonzero(green)
    assert len(xs) > 0
    assert abs(xs.mean() - q[0, 0]) < 2.0 and abs(ys.mean() - q[0, 1]) < 2.0


def test_grid_cropped_picture_keeps_its_edge_rows() -> None:
    """A small picture cropped to the grid (a web image of a 3x4 print) is rendered to its
    edges: the detection tiles are laid only where a whole one fits, and the strip beyond
    the last of them (up to a tile step, 20 mm at 3.1 px/mm) holds the bottom row."""
    spec = dataclasses.replace(random_spec(np.random.default_rng(6), "clean"), dpi=80.0,
                               layout=Layout.THREE_BY_FOUR, grid_color="pink",
                               grid_style="lines", signal_source="model", header=False,
                               footer=False)
    page = generate_page(6, "clean", spec=spec)
    ppm = page.px_per_mm
    gx0, gy0, gx1, gy1 = (round(v * ppm) for v in page.meta["grid_mm"])
    tile, step = geometry.TILE, geometry.TILE_STEP
    short = step - 10  # the last whole tile ends this far above the picture's bottom
    height = tile + step * ((gy1 - gy0 - tile - short) // step) + short
    crop = np.ascontiguousarray(page.image[gy0 : gy0 + height, gx0:gx1])
    rect = rectify(crop, orient=False, debug=False)
    assert rect.image.shape[0] / rect.px_per_mm > crop.shape[0] / ppm - 6.0
    assert rect.image.shape[1] / rect.px_per_mm > crop.shape[1] / ppm - 6.0


def _phase_lattice(field: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wrapped phase, amplitude and inside mask of a grid whose true phase is ``field``."""
    wrapped = (field + 0.5) % 1.0 - 0.5
    return wrapped.astype(np.float32), np.ones_like(wrapped, np.float32), np.ones(field.shape, bool)


def test_a_flat_grids_measurement_noise_is_not_taken_for_a_warp() -> None:
    """Traces and text beside the lines shift the measured phase by a tenth of a mm in
    patches; on a flat scan that is noise, and following it would warp the time axis."""
    from scipy.ndimage import gaussian_filter

    from pipeline.grid import _follow

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:80, 0:110].astype(np.float64)
    trend = 0.004 * xx - 0.002 * yy + 0.1
    patches = gaussian_filter(rng.normal(size=trend.shape), 2.0)
    patches *= 0.02 / patches.std()  # 0.1 mm RMS at a 5 mm period
    field, _, _ = _follow(*_phase_lattice(trend + patches), MAJOR_MM)
    assert float(np.sqrt(np.mean((field - trend) ** 2))) < 0.01


def test_a_curled_sheet_is_followed() -> None:
    """Half a millimetre of waviness across the sheet is paper, not noise: the field
    keeps it."""
    from pipeline.grid import _follow

    yy, xx = np.mgrid[0:80, 0:110].astype(np.float64)
    trend = 0.004 * xx - 0.002 * yy + 0.1
    wave = 0.1 * np.sin(2 * np.pi * xx / 30.0) * np.cos(2 * np.pi * yy / 40.0)
    field, _, _ = _follow(*_phase_lattice(trend + wave), MAJOR_MM)
    assert float(np.sqrt(np.mean((field - trend - wave) ** 2))) < 0.015
