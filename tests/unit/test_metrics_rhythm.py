"""Rhythm and interval measurements on generated 12-lead records with known timing."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from pipeline.leads import LAYOUTS, LEAD_INDEX, Layout
from pipeline.metrics import measure
from pipeline.synthetic.ecg_model import generate_ecg, random_params

FS = 500


def _record(seed: int, hr: float, rhythm: str = "sinus", axis: float = 50.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    params = replace(random_params(rng), rhythm=rhythm, hr_bpm=hr, axis_deg=axis,
                     noise_mv=0.005, wander_mv=0.05, qrs_width=1.0, t_scale=1.0)
    signals, _ = generate_ecg(rng, 10.0, FS, params)
    return signals


def _as_printed(signals: np.ndarray, layout: Layout) -> np.ndarray:
    """NaN outside what a page of ``layout`` prints (as the digitizer returns it)."""
    out = np.full_like(signals, np.nan)
    n = signals.shape[0]
    for row in LAYOUTS[layout].rows:
        k = len(row)
        for c, lead in enumerate(row):
            a, b = round(c * n / k), round((c + 1) * n / k)
            out[a:b, LEAD_INDEX[lead]] = signals[a:b, LEAD_INDEX[lead]]
    return out


@pytest.mark.parametrize("hr", [48.0, 72.0, 95.0, 130.0])
@pytest.mark.parametrize("layout", [Layout.TWELVE_BY_ONE, Layout.STANDARD, Layout.THREE_BY_FOUR])
def test_heart_rate_within_a_few_bpm(hr: float, layout: Layout) -> None:
    m = measure(_as_printed(_record(int(hr), hr), layout), FS)
    assert m.hr_bpm is not None
    assert abs(m.hr_bpm - hr) <= 3.0
    assert m.rr_ms is not None and abs(m.rr_ms - 60000.0 / hr) <= 40.0


def test_intervals_are_physiological_and_qtc_follows_the_formulas() -> None:
    m = measure(_record(3, 75.0), FS)
    assert m.qrs_ms is not None and 70 <= m.qrs_ms <= 140
    assert m.pr_ms is not None and 100 <= m.pr_ms <= 260
    assert m.qt_ms is not None and 300 <= m.qt_ms <= 480
    assert m.rr_ms is not None and m.qtc_bazett_ms is not None
    rr_s = m.rr_ms / 1000.0
    assert m.qtc_bazett_ms == pytest.approx(m.qt_ms / math.sqrt(rr_s), abs=2.0)
    assert m.qtc_fridericia_ms == pytest.approx(m.qt_ms / rr_s ** (1 / 3), abs=2.0)


@pytest.mark.parametrize("axis", [-30.0, 20.0, 60.0, 100.0])
def test_frontal_axis_follows_the_heart_vector(axis: float) -> None:
    m = measure(_record(7, 70.0, axis=axis), FS)
    assert m.axis_deg is not None
    assert abs((m.axis_deg - axis + 180) % 360 - 180) <= 30.0


def test_nothing_measurable_gives_nulls() -> None:
    empty = np.full((5000, 12), np.nan)
    m = measure(empty, FS)
    assert m.hr_bpm is None and m.qrs_ms is None and m.axis_deg is None
    flat = np.zeros((5000, 12))
    assert measure(flat, FS).hr_bpm is None
    assert measure(np.zeros((100, 12)), FS).hr_bpm is None


def test_af_has_no_pr_interval() -> None:
    m = measure(_record(11, 90.0, rhythm="af"), FS)
    assert m.hr_bpm is not None
    assert m.pr_ms is None
