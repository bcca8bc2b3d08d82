"""Warps move pixels and ground-truth points through one and the same mapping."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.synthetic import generate_page
from pipeline.synthetic.warp import Homography, Lens, PaperWarp, Warp

SRC_W, SRC_H = 400, 300
OUT_W, OUT_H = 480, 360


def _photo_like_warp() -> Warp:
    dst = np.array([[40, 30], [440, 50], [420, 330], [60, 310]], np.float32)
    src = np.array([[0, 0], [SRC_W, 0], [SRC_W, SRC_H], [0, SRC_H]], np.float32)
    m = cv2.getPerspectiveTransform(src, dst).astype(np.float64)
    paper = PaperWarp((SRC_W, SRC_H), curl=(6.0, 3.0),
                      folds=[(0.3, 20.0, 0.01, 8.0, 0.0)],
                      waves=[(0.05, 0.02, 1.0, 0.4, -0.3)])
    return Warp((OUT_W, OUT_H), [Lens((OUT_W / 2, OUT_H / 2), 300.0, 0.05), Homography(m), paper])


def test_forward_inverts_inverse() -> None:
    warp = _photo_like_warp()
    rng = np.random.default_rng(0)
    src = rng.uniform([20, 20], [SRC_W - 20, SRC_H - 20], (500, 2))
    out = warp.forward(src)
    np.testing.assert_allclose(warp.inverse(out), src, atol=1e-3)
    # Not the identity or a plain homography: lens and paper moved the points.
    plain = warp.components[1].forward(src)  # type: ignore[union-attr]
    assert np.abs(out - plain).max() > 1.0


def test_dense_maps_agree_with_the_closed_form() -> None:
    warp = _photo_like_warp()
    mx, my = warp.maps()
    assert mx.shape == (OUT_H, OUT_W)
    yy, xx = np.mgrid[0:OUT_H, 0:OUT_W]
    exact = warp.inverse(np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float))
    err = np.hypot(mx.ravel() - exact[:, 0], my.ravel() - exact[:, 1])
    assert err.max() < 0.05


@pytest.mark.parametrize("point", [(100.3, 80.7), (250.0, 150.5), (330.6, 240.2)])
def test_remapped_dot_lands_where_forward_says(point: tuple[float, float]) -> None:
    warp = _photo_like_warp()
    src = np.zeros((SRC_H, SRC_W), np.float32)
    yy, xx = np.mgrid[0:SRC_H, 0:SRC_W]
    src += np.exp(-((xx - point[0]) ** 2 + (yy - point[1]) ** 2) / (2 * 2.0**2))
    mx, my = warp.maps()
    out = cv2.remap(src, mx, my, cv2.INTER_LINEAR)
    oy, ox = np.mgrid[0:OUT_H, 0:OUT_W]
    expected = warp.forward(np.array([point]))[0]
    near = np.hypot(ox - expected[0], oy - expected[1]) < 10
    wgt = out * near
    centroid = np.array([(wgt * ox).sum(), (wgt * oy).sum()]) / wgt.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.25)


def test_photo_page_geometry_goes_through_its_warp() -> None:
    page = generate_page(12, "photo", width_px=700)
    warp = page.paper_to_image.warp
    mm = np.array([[50.0, 60.0], [200.0, 150.0]])
    px = page.paper_to_image(mm)
    np.testing.assert_allclose(warp.inverse(px), mm * page.paper_to_image.px_per_mm, atol=1e-3)
    assert any(isinstance(c, Lens) for c in warp.components)
    assert 1.0 < page.px_per_mm < 4.0
