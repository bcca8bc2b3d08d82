"""``digitize`` end to end on synthetic pages, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import geometry
from pipeline.digitizer import digitize
from pipeline.errors import DigitizationError, NoGridError, UnreadableImageError
from pipeline.leads import LEAD_INDEX, LEADS, Layout
from pipeline.scoring import score_image
from pipeline.synthetic import PageSpec, generate_page


@pytest.fixture(scope="module")
def clean_page():
    return generate_page(5, "clean", spec=PageSpec(layout=Layout.STANDARD, dpi=200.0,
                                                   grid_color="red"))


@pytest.fixture(scope="module")
def clean_result(clean_page):
    return digitize(clean_page.image, engine="classic")


def test_a_clean_page_scores_at_least_20_db(clean_page, clean_result) -> None:
    score = score_image(clean_result.signals, clean_page.signals, clean_page.fs)
    assert 10 * np.log10(score.ratio) >= 20.0


def test_the_page_is_described(clean_page, clean_result) -> None:
    d = clean_result
    assert d.layout == str(Layout.STANDARD)
    assert d.paper_speed_mm_s == 25.0
    assert d.gain_mm_mv == 10.0
    assert d.fs == 500.0
    assert d.signals.shape == clean_page.signals.shape
    assert d.engine == "classic"
    assert set(d.confidence) == set(LEADS)
    assert all(0.5 < c <= 1.0 for c in d.confidence.values())
    assert set(d.lead_boxes) == set(LEADS)
    box = d.lead_boxes["V1"]
    assert 0.0 <= box.x1 < box.x2 <= 1.0 and 0.0 <= box.y1 < box.y2 <= 1.0
    for name in ("overlay", "boxes", "plot"):
        img = d.qa_images[name]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert d.metrics.hr_bpm is not None
    assert abs(d.metrics.hr_bpm - clean_page.meta["hr_bpm"]) < 5.0


def test_nan_exactly_where_the_page_prints_nothing(clean_page, clean_result) -> None:
    printed = np.isfinite(clean_page.signals)
    read = np.isfinite(clean_result.signals)
    assert not (read & ~printed).any()
    # every printed lead is read over (nearly) all of its printed span
    for lead in LEADS:
        j = LEAD_INDEX[lead]
        assert read[printed[:, j], j].mean() > 0.97, lead


def test_a_50_mm_s_page_gives_5_seconds() -> None:
    page = generate_page(8, "clean", spec=PageSpec(layout=Layout.SIX_BY_TWO, dpi=150.0,
                                                   paper_speed_mm_s=50.0, gain_mm_mv=5.0))
    d = digitize(page.image, qa=False)
    assert d.paper_speed_mm_s == 50.0
    assert d.gain_mm_mv == 5.0
    assert d.signals.shape[0] == page.signals.shape[0] == 2500
    score = score_image(d.signals, page.signals, page.fs)
    assert 10 * np.log10(score.ratio) >= 10.0


def test_a_small_picture_cropped_to_the_grid_reads_all_three_rows() -> None:
    """A web image of a 3x4 print: ~3 px/mm, cut at the grid, the last row at the edge."""
    page = generate_page(6, "clean", spec=PageSpec(layout=Layout.THREE_BY_FOUR, dpi=80.0,
                                                   grid_color="pink", header=False,
                                                   footer=False))
    ppm = page.px_per_mm
    gx0, gy0, gx1, gy1 = (round(v * ppm) for v in page.meta["grid_mm"])
    # cut where the last whole detection tile ends 54 px (17 mm) short of the bottom
    tile, step = geometry.TILE, geometry.TILE_STEP
    height = tile + step * ((gy1 - gy0 - tile - 54) // step) + 54
    crop = np.ascontiguousarray(page.image[gy0 : gy0 + height, gx0:gx1])
    d = digitize(crop, qa=False)
    assert d.layout == "3x4"
    assert all(np.isfinite(d.signals[:, LEAD_INDEX[lead]]).mean() > 0.2 for lead in LEADS)
    # ~8 dB measured (the whole page at 80 dpi scores the same); the pulse may be cut off
    assert 10 * np.log10(score_image(d.signals, page.signals, page.fs).ratio) >= 3.0


def test_a_picture_without_a_grid_is_refused() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    with pytest.raises(NoGridError, match="no ECG grid found"):
        digitize(noise)


def test_blank_paper_is_refused() -> None:
    blank = np.full((700, 900, 3), 245, np.uint8)
    with pytest.raises(DigitizationError):
        digitize(blank)


@pytest.mark.parametrize("bad", [np.zeros((50, 50, 3), np.uint8), np.zeros((10,), np.uint8)])
def test_unreadable_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(UnreadableImageError):
        digitize(bad)


def test_learned_engine_without_weights_says_so(monkeypatch, clean_page) -> None:
    import pipeline.digitizer as dz

    monkeypatch.setattr(dz, "_load_trace_model", lambda: None)
    with pytest.raises(DigitizationError, match="no learned weights installed"):
        digitize(clean_page.image, engine="learned")
    assert digitize(clean_page.image, engine="auto", qa=False).engine == "classic"


def test_a_learned_trace_map_plugs_into_the_same_stages(monkeypatch, clean_page) -> None:
    """The engine seam: a model only supplies the trace-probability map."""
    import pipeline.digitizer as dz
    from pipeline.traces import ink_probability

    class Oracle:
        def predict(self, image_rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
            return ink_probability(image_rgb, px_per_mm)

    monkeypatch.setattr(dz, "_load_trace_model", lambda: Oracle())
    d = digitize(clean_page.image, engine="learned", qa=False)
    assert d.engine == "learned"
    assert d.layout == str(Layout.STANDARD)


def test_the_deadline_is_enforced(clean_page) -> None:
    from pipeline.errors import DigitizationTimeout

    with pytest.raises(DigitizationTimeout):
        digitize(clean_page.image, time_limit_s=1e-6)
