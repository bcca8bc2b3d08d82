"""Layout stage on synthetic pages: rows, leads, paper speed, gain and the time axis.

Clean pages are flat and axis-aligned, so the stage runs on them directly with the
page's own px/mm (the grid stage has its own tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.layout import PageLayout, detect_layout
from pipeline.leads import LAYOUTS, Layout
from pipeline.synthetic import PageSpec, SyntheticPage, generate_page
from pipeline.traces import ink_probability, trace_thickness


def _read_layout(page: SyntheticPage) -> PageLayout:
    prob = ink_probability(page.image, page.px_per_mm)
    return detect_layout(prob, page.px_per_mm, trace_thickness(prob, page.px_per_mm))


@pytest.mark.parametrize(
    ("layout", "grid"),
    [
        (Layout.STANDARD, "red"),
        (Layout.THREE_BY_FOUR, "green"),
        (Layout.THREE_BY_FOUR_3R, "pink"),
        (Layout.SIX_BY_TWO, "grey"),
        (Layout.TWELVE_BY_ONE, "orange"),
    ],
)
def test_every_layout_is_recognised(layout: Layout, grid: str) -> None:
    gain = 5.0 if layout == Layout.TWELVE_BY_ONE else 10.0
    page = generate_page(3, "clean", spec=PageSpec(layout=layout, dpi=150.0, grid_color=grid,
                                                   gain_mm_mv=gain))
    got = _read_layout(page)
    assert got.layout == layout
    assert [r.leads for r in got.rows] == list(LAYOUTS[layout].rows)
    # rows are found where the page printed them: each cell spans 0.6 of a row pitch
    # above its baseline and 0.4 below
    truth = sorted({s["box"][1] + 0.6 * (s["box"][3] - s["box"][1])
                    for s in page.meta["segments"]})
    truth = [y for i, y in enumerate(truth) if i == 0 or y - truth[i - 1] > 1.0]
    found = [r.baseline for r in got.rows]
    assert np.allclose(found, truth, atol=3.0 * page.px_per_mm)


@pytest.mark.parametrize(
    ("speed", "gain", "layout"),
    [
        (25.0, 5.0, Layout.STANDARD),
        (25.0, 20.0, Layout.STANDARD),
        (50.0, 10.0, Layout.STANDARD),
        (50.0, 5.0, Layout.SIX_BY_TWO),
        (50.0, 20.0, Layout.THREE_BY_FOUR),
    ],
)
def test_paper_speed_and_gain_come_from_the_pulse(speed: float, gain: float,
                                                  layout: Layout) -> None:
    page = generate_page(11, "clean", spec=PageSpec(layout=layout, dpi=160.0,
                                                    paper_speed_mm_s=speed, gain_mm_mv=gain,
                                                    footer=False))
    got = _read_layout(page)
    assert got.paper_speed_mm_s == speed
    assert got.gain_mm_mv == gain
    assert got.pulses, "the calibration pulses were not found"
    heights = [p.height_mm for p in got.pulses]
    assert np.median(heights) == pytest.approx(gain, rel=0.08)
    # the printed span: 250 mm, i.e. 10 s at 25 mm/s and 5 s at 50 mm/s
    assert got.seconds == pytest.approx(page.seconds, rel=0.01)


def test_time_axis_starts_where_the_trace_starts() -> None:
    page = generate_page(5, "clean", spec=PageSpec(layout=Layout.STANDARD, dpi=200.0))
    got = _read_layout(page)
    first_x = min(float(path[0, 0]) for path in page.trace_paths.values())
    assert abs(got.x_start - first_x) < 0.5 * page.px_per_mm


def test_a_paper_edge_one_row_pitch_above_is_not_a_row() -> None:
    """The shadow of the sheet's edge, evenly spaced with the rows, has no pulse and runs
    past the rows' ends: a 3x4 page stays 3x4."""
    page = generate_page(4, "clean", spec=PageSpec(layout=Layout.THREE_BY_FOUR, dpi=150.0,
                                                   grid_color="red", gain_mm_mv=10.0))
    rows = _read_layout(page).rows
    pitch = rows[1].baseline - rows[0].baseline
    edge = round(rows[0].baseline - pitch)
    assert edge > 2
    image = page.image.copy()
    image[edge - 2:edge + 3, :] = 60  # a dark, slightly ragged band across the sheet
    image[edge - 4:edge - 2, ::7] = 60
    image[edge + 3:edge + 6, ::5] = 60
    prob = ink_probability(image, page.px_per_mm)
    got = detect_layout(prob, page.px_per_mm, trace_thickness(prob, page.px_per_mm))
    assert got.layout == Layout.THREE_BY_FOUR
    assert np.allclose([r.baseline for r in got.rows], [r.baseline for r in rows], atol=2.0)


def test_a_few_pixels_of_ink_past_one_rows_end_do_not_move_the_time_axis() -> None:
    """A grid-line remnant or a pen cap that lengthens one row by under a millimetre is
    that row's reading, not the page's end: the shared end is the rows' median."""
    page = generate_page(6, "clean", spec=PageSpec(layout=Layout.THREE_BY_FOUR, dpi=200.0,
                                                   grid_color="red", gain_mm_mv=10.0))
    before = _read_layout(page)
    ppm = page.px_per_mm
    row = before.rows[1]
    x = round(before.x_end)
    image = page.image.copy()
    y = round(row.baseline)
    image[y - 1:y + 2, x + 1:x + 1 + int(0.6 * ppm)] = 30  # 0.6 mm of ink past the end
    prob = ink_probability(image, ppm)
    after = detect_layout(prob, ppm, trace_thickness(prob, ppm))
    assert abs(after.x_start - before.x_start) < 1.0


def test_one_spoilt_rhythm_copy_does_not_make_a_3x4_3_page_6x2() -> None:
    """At 20 mm/mV a rhythm strip may be misread where a neighbour's QRS crosses it; the
    two other copies still show the page repeats its leads."""
    from pipeline.layout import _six_row_layout

    rng = np.random.default_rng(3)
    w = 400
    rows = [np.cumsum(rng.normal(0, 1, w)) for _ in range(3)]
    q = w // 4
    v1, ii, v5 = (np.full(w, np.nan) for _ in range(3))
    v1[2 * q:3 * q] = rows[0][2 * q:3 * q]  # V1 at the third quarter of row 0
    ii[:q] = rng.normal(0, 1, q)  # II's copy: spoilt
    v5[3 * q:] = rows[1][3 * q:]  # V5 at the last quarter of row 1
    got = _six_row_layout([*rows, v1, ii, v5], 0.0, float(w))
    assert got == Layout.THREE_BY_FOUR_3R
    independent = [np.cumsum(rng.normal(0, 1, w)) for _ in range(6)]
    assert _six_row_layout(independent, 0.0, float(w)) == Layout.SIX_BY_TWO


def test_a_line_under_the_pulse_top_does_not_halve_the_pulse() -> None:
    """On a binarized page the black grid survives ink separation; a grid line from the
    baseline to the top of a 10 mm (50 mm/s) pulse is not the pulse's falling stroke."""
    page = generate_page(11, "clean", spec=PageSpec(layout=Layout.STANDARD, dpi=160.0,
                                                    paper_speed_mm_s=50.0, footer=False))
    ppm = page.px_per_mm
    before = _read_layout(page)
    assert before.paper_speed_mm_s == 50.0
    image = page.image.copy()
    for p in before.pulses:
        x = round(0.5 * (p.x0 + p.x1))
        image[round(p.y_top):round(p.y_base) + 1, x - 1:x + 1] = 0
    prob = ink_probability(image, ppm)
    after = detect_layout(prob, ppm, trace_thickness(prob, ppm))
    assert after.paper_speed_mm_s == 50.0
    assert np.median([p.width_mm for p in after.pulses]) == pytest.approx(10.0, rel=0.05)


def test_grid_dots_past_the_trace_do_not_lengthen_the_rows() -> None:
    """A black dotted grid's dots stay in the ink map; a row of them running on past the
    trace's end is not more trace, so the time axis still ends where the trace does."""
    page = generate_page(5, "clean", spec=PageSpec(layout=Layout.STANDARD, dpi=200.0))
    before = _read_layout(page)
    ppm = page.px_per_mm
    image = page.image.copy()
    x_end = round(before.x_end)
    for row in before.rows:
        y = round(row.baseline)
        for x in np.arange(x_end + 0.8 * ppm, x_end + 8 * ppm, ppm).round().astype(int):
            image[y - 1:y + 2, x - 1:x + 2] = 20  # dots 0.4 mm wide, 1 mm apart
    prob = ink_probability(image, ppm)
    after = detect_layout(prob, ppm, trace_thickness(prob, ppm))
    assert abs(after.x_end - before.x_end) < 1.0


def test_faint_remnants_between_evenly_spaced_rows_are_not_rows() -> None:
    """Six strong, evenly spaced rows with a faint candidate (grid lines left as ink on a
    photo) between each pair: twelve candidates, but a six-row page, not 12x1."""
    from pipeline.layout import _pick_rows, _RowCandidate

    ppm = 8.0
    strong = [_RowCandidate(250.0 + 280.0 * k, 12, 1600, 0.93) for k in range(6)]
    faint = [_RowCandidate(130.0 + 280.0 * k, 12, 1600, 0.42) for k in range(6)]
    cands = sorted(strong + faint, key=lambda c: c.y)
    picked = _pick_rows(cands, np.ones(1800), ppm)
    assert [c.y for c in picked] == [c.y for c in strong]
