"""Perspective from the grid's line families, and light/colour flattening, on drawn grids."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline import geometry, illumination

PX_PER_MM = 6.0


def drawn_grid(w: int = 1500, h: int = 1100, colour: tuple[int, int, int] = (210, 70, 80)
               ) -> np.ndarray:
    """A plain ECG grid: 1 mm minor and 5 mm major lines on white paper."""
    img = np.full((h, w, 3), 252, np.uint8)
    light = tuple(int(0.45 * c + 0.55 * 252) for c in colour)
    for k in range(int(max(w, h) / PX_PER_MM) + 1):
        c, t = (colour, 2) if k % 5 == 0 else (light, 1)
        p = round(20 + k * PX_PER_MM)
        cv2.line(img, (p, 0), (p, h), c, t)
        cv2.line(img, (0, p), (w, p), c, t)
    return img


@pytest.mark.parametrize("tilt", [0.0, 9.0, -25.0])
def test_homography_makes_both_families_axis_parallel(tilt: float) -> None:
    grid = drawn_grid()
    h, w = grid.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    dst = np.array([[120, 60], [w - 40, 150], [w - 160, h - 30], [60, h - 120]], np.float32)
    persp = cv2.getPerspectiveTransform(src, dst)
    rot = np.vstack([cv2.getRotationMatrix2D((w / 2, h / 2), tilt, 0.8), [0, 0, 1]])
    photo = cv2.warpPerspective(grid, rot @ persp, (w, h), borderValue=(60, 50, 40))

    lattice = geometry.best_lattice(photo)
    m = geometry.rectifying_homography(lattice, photo.shape[:2])
    # Crossings of the drawn grid, through the camera and back through the rectification:
    # each row of crossings must share one y, each column one x.
    ks = np.arange(5, 250, 15) * PX_PER_MM + 20
    gx, gy = np.meshgrid(ks[ks < w - 100], ks[ks < h - 100])
    drawn = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(float)
    seen = geometry.apply_homography(rot @ persp, drawn)
    flat = geometry.apply_homography(m, seen).reshape(*gx.shape, 2)
    spread_y = (flat[..., 1] - flat[..., 1].mean(axis=1, keepdims=True)).std()
    spread_x = (flat[..., 0] - flat[..., 0].mean(axis=0, keepdims=True)).std()
    pitch = np.abs(np.diff(flat[..., 0], axis=1)).mean() / 15  # px per mm, rectified
    # The homography alone (the dense warp refines it) leaves the lines within ~0.5 mm;
    # the camera put them tens of mm off.
    assert spread_x < 0.5 * pitch and spread_y < 0.5 * pitch


def test_no_lattice_in_a_blank_page() -> None:
    with pytest.raises(Exception, match="no ECG grid found"):
        geometry.best_lattice(np.full((900, 1200, 3), 240, np.uint8))


def test_shading_and_colour_cast_are_flattened() -> None:
    grid = drawn_grid()
    h, w = grid.shape[:2]
    xx = np.mgrid[0:h, 0:w][1]
    light = 0.55 + 0.45 * (xx / w)  # a strong left-to-right falloff
    cast = np.array([1.0, 0.9, 0.75])  # warm lamp
    shaded = np.clip(grid * light[..., None] * cast, 0, 255).astype(np.uint8)
    cv2.line(shaded, (100, 500), (1400, 520), (20, 20, 20), 3)  # a trace
    flat = illumination.normalize(shaded, PX_PER_MM)
    paper = flat[(grid == 252).all(axis=2)]
    assert np.abs(np.median(paper, axis=0) - 255).max() < 8  # white and neutral
    assert np.percentile(paper.mean(axis=1), 5) > 225  # everywhere, not on average
    assert flat[500:522, 700].min() < 80  # the trace stays dark
    major = flat[300, round(20 + 50 * PX_PER_MM) - 1 : round(20 + 50 * PX_PER_MM) + 2]
    assert (major[:, 0].astype(int) - major[:, 1]).max() > 60  # the red grid stays red
