"""Synthetic pages: determinism, NaN pattern, and ground truth that follows the pixels."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from pipeline.leads import GAINS_MM_MV, LAYOUTS, LEAD_INDEX, LEADS, PAPER_SPEEDS_MM_S, Layout
from pipeline.synthetic import PageSpec, SyntheticPage, generate_page, random_spec, synthetic_set
from pipeline.synthetic.spec import PULSE_SECONDS, TRACE_WIDTH_MM

WIDTH = 800  # small pages keep the tests fast


def _spec(**changes: object) -> PageSpec:
    return dataclasses.replace(random_spec(np.random.default_rng(0), "clean"), **changes)


def test_same_seed_same_page_other_seed_other_page() -> None:
    a = generate_page(7, "scan", width_px=WIDTH)
    b = generate_page(7, "scan", width_px=WIDTH)
    c = generate_page(8, "scan", width_px=WIDTH)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.signals, b.signals)
    assert a.meta == b.meta
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown style"):
        generate_page(0, "fax")


def _expected_printed(layout: Layout, n: int) -> np.ndarray:
    mask = np.zeros((n, 12), bool)
    for row in LAYOUTS[layout].rows:
        for c, lead in enumerate(row):
            mask[round(c * n / len(row)):round((c + 1) * n / len(row)), LEAD_INDEX[lead]] = True
    return mask


@pytest.mark.parametrize("layout", list(Layout))
def test_nan_pattern_follows_the_layout(layout: Layout) -> None:
    page = generate_page(1, "clean", spec=_spec(layout=layout), width_px=400)
    assert page.signals.shape == (5000, 12)
    np.testing.assert_array_equal(np.isfinite(page.signals), _expected_printed(layout, 5000))


def test_standard_layout_prints_lead_i_first_quarter_and_ii_in_full() -> None:
    page = generate_page(2, "clean", spec=_spec(layout=Layout.STANDARD), width_px=400)
    fin = np.isfinite(page.signals)
    assert fin[:1250, LEAD_INDEX["I"]].all() and not fin[1250:, LEAD_INDEX["I"]].any()
    assert fin[:, LEAD_INDEX["II"]].all()
    assert fin[1250:2500, LEAD_INDEX["aVR"]].all() and not fin[:1250, LEAD_INDEX["aVR"]].any()
    assert fin[3750:, LEAD_INDEX["V6"]].all()
    # II is printed twice: 2.5 s in the grid, then 10 s in the rhythm strip.
    assert len(page.trace_paths["II"]) == 1250 + 5000
    i = LEAD_INDEX
    s = page.signals[:1250]
    np.testing.assert_allclose(s[:, i["III"]], s[:, i["II"]] - s[:, i["I"]], atol=1e-9)


def test_fifty_mm_per_second_covers_five_seconds() -> None:
    page = generate_page(3, "clean", spec=_spec(layout=Layout.SIX_BY_TWO,
                                                paper_speed_mm_s=50.0, gain_mm_mv=5.0),
                         width_px=600)
    assert page.signals.shape == (2500, 12)
    assert page.seconds == pytest.approx(5.0)
    assert np.isfinite(page.signals[:1250, LEAD_INDEX["aVF"]]).all()
    assert np.isfinite(page.signals[1250:, LEAD_INDEX["V6"]]).all()


def _darkness(page: SyntheticPage, dy: float = 0.0) -> tuple[float, float]:
    """(median contrast, fraction darker) of the image at the trace points vs the paper."""
    gray = page.image.astype(float).mean(axis=2)
    h, w = gray.shape
    pts = np.concatenate(list(page.trace_paths.values()))
    x = np.round(pts[:, 0]).astype(int)
    y = np.round(pts[:, 1] + dy).astype(int)
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    assert ok.mean() > 0.8
    on = gray[y[ok], x[ok]]
    boxes = np.array(list(page.lead_boxes.values()))
    x0, y0 = np.clip(boxes[:, :2].min(axis=0).astype(int), 0, None)
    x1, y1 = boxes[:, 2:].max(axis=0).astype(int)
    paper = float(np.median(gray[y0:y1, x0:x1]))
    return paper - float(np.median(on)), float((on < paper - 10).mean())


@pytest.mark.parametrize("style", ["clean", "scan", "photo"])
def test_trace_paths_land_on_trace_ink(style: str) -> None:
    for seed in range(3):
        page = generate_page(seed, style, width_px=WIDTH)
        contrast, darker = _darkness(page)
        assert contrast > 35, (seed, contrast)
        assert darker > 0.9, (seed, darker)
        # The check can fail: the same paths 5 px lower are mostly on paper.
        off_contrast, _ = _darkness(page, dy=5.0)
        assert off_contrast < contrast / 2


@pytest.mark.parametrize("style", ["clean", "scan", "photo"])
def test_lead_mask_marks_the_traces(style: str) -> None:
    page = generate_page(4, style, width_px=WIDTH)
    h, w = page.lead_mask.shape
    assert page.lead_mask.shape == page.image.shape[:2] == page.grid_mask.shape
    hits = []
    for lead, pts in page.trace_paths.items():
        x = np.round(pts[:, 0]).astype(int)
        y = np.round(pts[:, 1]).astype(int)
        ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        hits.append(page.lead_mask[y[ok], x[ok]] == LEAD_INDEX[lead] + 1)
    assert np.concatenate(hits).mean() > 0.85
    assert set(np.unique(page.lead_mask)) <= set(range(13))


def test_paper_to_image_matches_px_per_mm_on_clean_pages() -> None:
    page = generate_page(5, "clean", spec=_spec(dpi=300.0))
    ppm = 300.0 / 25.4
    assert page.px_per_mm == pytest.approx(ppm, rel=1e-6)
    pts = page.paper_to_image(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [123.4, 56.7]]))
    np.testing.assert_allclose(pts, np.array([[0, 0], [10, 0], [0, 10], [123.4, 56.7]]) * ppm,
                               atol=1e-9)
    gx0, gy0, gx1, gy1 = page.meta["grid_mm"]
    np.testing.assert_allclose(page.grid_origin_px, (gx0 * ppm, gy0 * ppm))
    # Every 5 mm crossing of the grid is grid ink in the grid mask and darker than paper.
    xs, ys = np.arange(gx0, gx1, 5.0), np.arange(gy0, gy1, 5.0)
    cross = page.paper_to_image(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    ci = np.round(cross).astype(int)
    assert page.grid_mask[ci[:, 1], ci[:, 0]].mean() > 0.97
    mid = page.paper_to_image(np.stack(np.meshgrid(xs + 0.5, ys + 0.5), -1).reshape(-1, 2))
    mi = np.round(mid).astype(int)
    assert page.grid_mask[mi[:, 1], mi[:, 0]].mean() < 0.1


@pytest.mark.parametrize("layout,speed,gain", list(itertools.product(
    list(Layout), PAPER_SPEEDS_MM_S, GAINS_MM_MV)))
def test_every_layout_speed_and_gain_renders(layout: Layout, speed: float, gain: float) -> None:
    spec = _spec(layout=layout, paper_speed_mm_s=speed, gain_mm_mv=gain)
    page = generate_page(6, "clean", spec=spec, width_px=500)
    n_rows = len(LAYOUTS[layout].rows)
    assert page.layout == layout
    assert page.signals.shape == (round(TRACE_WIDTH_MM / speed * 500), 12)
    assert len(page.pulse_boxes) == n_rows
    assert set(page.lead_boxes) == set(LEADS) == set(page.trace_paths) == set(page.label_points)
    ppm = page.px_per_mm
    for x0, y0, x1, y1 in page.pulse_boxes:  # a 1 mV pulse, 0.2 s wide
        assert y1 - y0 == pytest.approx(gain * ppm, abs=1e-6)
        assert x1 - x0 == pytest.approx(PULSE_SECONDS * speed * ppm, abs=1e-6)
    # Trace x positions follow the paper speed.
    t, pts = page.trace_times["V1"], page.trace_paths["V1"]
    np.testing.assert_allclose(np.diff(pts[:, 0]), np.diff(t) * speed * ppm, atol=1e-6)


def test_trace_height_follows_gain_on_clean_pages() -> None:
    page = generate_page(9, "clean", spec=_spec(gain_mm_mv=20.0), width_px=700)
    j = LEAD_INDEX["V2"]
    t, y = page.trace_times["V2"], page.trace_paths["V2"][:, 1]
    v = page.signals[np.round(t * page.fs).astype(int), j]
    slope = np.polyfit(v, y, 1)[0]
    assert slope == pytest.approx(-20.0 * page.px_per_mm, rel=1e-6)


def test_fixed_sets_are_reproducible_and_realistically_sized() -> None:
    scan = next(synthetic_set("synthetic-scan", n=1))
    again = next(synthetic_set("synthetic-scan", n=1))
    np.testing.assert_array_equal(scan.image, again.image)
    assert scan.style == "scan"
    assert 1500 <= scan.image.shape[1] <= 3600
    assert len(list(synthetic_set("synthetic-photo", n=0))) == 0
    with pytest.raises(ValueError, match="unknown synthetic set"):
        next(synthetic_set("synthetic-fax"))


def test_random_spec_favours_the_common_page() -> None:
    rng = np.random.default_rng(0)
    specs = [random_spec(rng, "scan") for _ in range(400)]
    common = sum(s.layout == Layout.STANDARD for s in specs) / len(specs)
    assert 0.4 < common < 0.7
    assert {s.layout for s in specs} == set(Layout)
    assert {s.grid_color for s in specs} >= {"red", "pink", "orange", "green", "grey", "bw"}
    assert sum(s.paper_speed_mm_s == 25.0 for s in specs) > 0.7 * len(specs)
    assert sum(s.gain_mm_mv == 10.0 for s in specs) > 0.6 * len(specs)


@pytest.mark.parametrize("style", ["clean", "scan"])
def test_calibration_pulses_are_printed_where_the_meta_says(style: str) -> None:
    page = generate_page(10, style, width_px=WIDTH)
    gray = page.image.astype(float).mean(axis=2)
    paper = float(np.median(gray))
    for path in page.meta["pulse_paths_mm"]:
        path = np.asarray(path)
        # Sample the vertical edges and the top of the pulse densely.
        pts = np.concatenate([np.linspace(path[k], path[k + 1], 20) for k in (1, 2, 3)])
        px = np.round(page.paper_to_image(pts)).astype(int)
        assert (gray[px[:, 1], px[:, 0]] < paper - 30).mean() > 0.9
