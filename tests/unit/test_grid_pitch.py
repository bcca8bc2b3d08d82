"""Grid pitch (px/mm) on synthetic pages of known scale, and refusal of pictures without a grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import cv2
import numpy as np
import pytest

from pipeline.errors import NoGridError
from pipeline.grid import PITCH_PAD, axis_pitch, rectify
from pipeline.synthetic import SyntheticPage, generate_page, random_spec

PITCH_TOLERANCE = 0.01  # the acceptance: within 1 % of the truth


def page(seed: int, style: str, color: str, grid_style: str, dpi: float) -> SyntheticPage:
    spec = dataclasses.replace(random_spec(np.random.default_rng(seed), style),
                               grid_color=color, grid_style=grid_style, dpi=dpi,
                               signal_source="model")
    return generate_page(seed, style, spec=spec)


@pytest.mark.parametrize(
    ("style", "color", "grid_style", "dpi"),
    [
        ("clean", "red", "lines", 100.0),
        ("clean", "pink", "lines", 250.0),
        ("clean", "green", "dotted", 150.0),
        ("clean", "bw", "lines", 120.0),
        ("scan", "orange", "lines", 200.0),
        ("scan", "grey", "dotted", 150.0),
        ("scan", "bw", "dotted", 180.0),
    ],
)
def test_pitch_within_one_percent(style: str, color: str, grid_style: str, dpi: float) -> None:
    p = page(7 + int(dpi), style, color, grid_style, dpi)
    rect = rectify(p.image, orient=False, debug=False)
    assert rect.source_px_per_mm == pytest.approx(p.px_per_mm, rel=PITCH_TOLERANCE)
    assert rect.major_mm == 5.0


def _comb_spectrum(period_px: float, minor: bool, blur: float = 0.0) -> np.ndarray:
    """Summed spectrum of a 1-D grid profile: major lines (and optionally 4 minors between)."""
    n = 256
    x = np.arange(n)
    pos = (x % period_px)
    prof = np.exp(-0.5 * (np.minimum(pos, period_px - pos) / 0.8) ** 2)
    if minor:
        minor_pos = x % (period_px / 5)
        prof += 0.4 * np.exp(-0.5 * (np.minimum(minor_pos, period_px / 5 - minor_pos) / 0.6) ** 2)
    if blur:
        prof = np.convolve(prof, np.exp(-0.5 * (np.arange(-8, 9) / blur) ** 2), mode="same")
    rng = np.random.default_rng(0)
    spec = np.zeros(PITCH_PAD // 2 + 1)
    for _ in range(20):  # several noisy tiles, as the page gives
        tile = (prof + rng.normal(0, 0.05, n)) * np.hanning(n)
        f = np.fft.rfft(tile - tile.mean(), n=PITCH_PAD)
        p = np.abs(f) ** 2
        spec += p / p.sum()
    return spec


@pytest.mark.parametrize("period", [17.0, 24.6, 31.3])
def test_comb_fundamental_is_the_major_pitch_with_minor_lines(period: float) -> None:
    ap = axis_pitch(_comb_spectrum(period, minor=True), max_period_px=64)
    assert ap is not None
    assert ap.period_px == pytest.approx(period, rel=0.005)
    assert ap.minor_seen


def test_comb_of_major_lines_only_is_not_mistaken_for_minor_lines() -> None:
    ap = axis_pitch(_comb_spectrum(25.0, minor=False, blur=1.5), max_period_px=64)
    assert ap is not None
    assert ap.period_px == pytest.approx(25.0, rel=0.005)
    assert not ap.minor_seen


def test_a_flat_spectrum_has_no_comb() -> None:
    rng = np.random.default_rng(1)
    assert axis_pitch(rng.random(PITCH_PAD // 2 + 1) + 1.0, max_period_px=64) is None


def _text_page() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = np.full((1400, 1900, 3), 255, np.uint8)
    words = ["patient", "report", "normal", "sinus", "rhythm", "the", "quick", "brown", "fox",
             "jumps", "over"]
    for i in range(36):
        cv2.putText(img, " ".join(rng.choice(words, 8)), (50, 60 + 36 * i),
                    cv2.FONT_HERSHEY_SIMPLEX, 1.0, (25, 25, 25), 2)
    return img


def _smooth_noise() -> np.ndarray:
    rng = np.random.default_rng(4)
    small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img = cv2.resize(small, (1600, 1200), interpolation=cv2.INTER_CUBIC)
    return np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "picture",
    [
        pytest.param(lambda: np.full((1200, 1600, 3), 248, np.uint8), id="white-page"),
        pytest.param(lambda: np.tile(np.linspace(30, 230, 1600, dtype=np.uint8)[None, :, None],
                                     (1200, 1, 3)), id="gradient"),
        pytest.param(lambda: np.random.default_rng(5).integers(0, 256, (1200, 1600, 3),
                                                               dtype=np.uint8), id="noise"),
        pytest.param(_smooth_noise, id="smooth-noise"),
        pytest.param(_text_page, id="text-page"),
    ],
)
def test_picture_without_a_grid_is_refused(picture: Callable[[], np.ndarray]) -> None:
    with pytest.raises(NoGridError, match="no ECG grid found"):
        rectify(picture())
