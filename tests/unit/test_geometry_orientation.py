"""Quarter turns and skew: a page photographed or scanned at any angle comes out upright."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from pipeline.grid import rectify
from pipeline.synthetic import SyntheticPage, generate_page, random_spec


def upright_page(seed: int, style: str = "scan") -> SyntheticPage:
    spec = dataclasses.replace(random_spec(np.random.default_rng(seed), style), dpi=150.0,
                               signal_source="model")
    page = generate_page(seed, style, spec=spec)
    assert abs(page.meta["degradations"].get("rotation_deg", 0.0)) < 45
    return page


# Seed 29: a red-grid scan. A binarized (fax) scan turned on its side is not recognised
# by the classic orientation cues (README, known limits).
@pytest.mark.parametrize(("seed", "style"), [(29, "scan"), (24, "clean"), (28, "clean")])
@pytest.mark.parametrize("turns", [1, 2, 3])
def test_quarter_turns_are_undone(seed: int, style: str, turns: int) -> None:
    page = upright_page(seed, style)
    # np.rot90 turns counter-clockwise; the page must be turned back clockwise as often.
    turned = np.ascontiguousarray(np.rot90(page.image, turns))
    rect = rectify(turned, debug=False)
    assert rect.quarter_turns == turns
    h, w = rect.image.shape[:2]
    assert w > h  # these layouts are printed landscape


def test_upright_page_is_left_alone() -> None:
    rect = rectify(upright_page(21).image, debug=False)
    assert rect.quarter_turns == 0


def test_small_skew_is_removed() -> None:
    page = upright_page(26)
    h, w = page.image.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), 7.0, 1.0)
    skewed = cv2.warpAffine(page.image, rot, (w, h), borderValue=(255, 255, 255))
    rect = rectify(skewed, debug=False)
    assert rect.quarter_turns == 0
    # A horizontal step on the rectified page is a horizontal step on the paper.
    q = np.array([[w * 0.3, h * 0.4], [w * 0.6, h * 0.4]]) * rect.px_per_mm / page.px_per_mm
    src = rect.to_source(q)
    back = cv2.invertAffineTransform(rot)
    on_image = src @ back[:, :2].T + back[:, 2]
    mm = page.paper_to_image.warp.inverse(on_image)
    d = mm[1] - mm[0]
    assert abs(np.degrees(np.arctan2(d[1], d[0]))) < 0.2
