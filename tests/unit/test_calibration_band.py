"""The read leads are band-limited to what a printed trace can hold, and no more."""

from __future__ import annotations

import numpy as np

from pipeline.calibration import PRINT_CYCLES_PER_MM, band_limit

FS = 500.0


def _amplitude(x: np.ndarray, hz: float) -> float:
    """Amplitude of the ``hz`` component of ``x`` (a whole number of cycles long)."""
    t = np.arange(len(x)) / FS
    return float(2.0 * abs(np.mean(x * np.exp(-2j * np.pi * hz * t))))


def test_waves_pass_and_pixel_jitter_is_removed() -> None:
    t = np.arange(2500) / FS
    wave = np.sin(2 * np.pi * 10.0 * t)  # QRS-band content
    jitter = 0.2 * np.sin(2 * np.pi * 150.0 * t)  # far above 42.5 Hz at 25 mm/s
    sig = np.stack([wave + jitter] * 12, axis=1)
    out = band_limit(sig, FS, 25.0)
    inner = slice(100, 2400)  # away from the stretch ends
    assert abs(_amplitude(out[inner, 0], 10.0) / _amplitude(wave[inner], 10.0) - 1) < 0.02
    assert _amplitude(out[inner, 0], 150.0) < 0.1 * _amplitude(jitter[inner], 150.0)


def test_cutoff_follows_the_paper_speed() -> None:
    """At 50 mm/s the print holds twice the detail: 65 Hz passes there, not at 25 mm/s."""
    t = np.arange(2500) / FS
    sig = np.repeat(np.sin(2 * np.pi * 65.0 * t)[:, None], 12, axis=1)
    inner = slice(100, 2400)
    slow = _amplitude(band_limit(sig, FS, 25.0)[inner, 0], 65.0)
    fast = _amplitude(band_limit(sig, FS, 50.0)[inner, 0], 65.0)
    assert slow < 0.3 and fast > 0.8
    assert PRINT_CYCLES_PER_MM * 25.0 < 65.0 < PRINT_CYCLES_PER_MM * 50.0


def test_gaps_stay_gaps_and_each_stretch_is_filtered_alone() -> None:
    sig = np.full((2500, 12), np.nan)
    sig[:1000, 0] = 1.0
    sig[1200:, 0] = -1.0  # a step across the gap must not leak into either side
    sig[5:12, 1] = 3.0  # too short to filter: left as read
    out = band_limit(sig, FS, 25.0)
    assert np.isnan(out[1000:1200, 0]).all() and np.isnan(out[:, 2]).all()
    np.testing.assert_allclose(out[:1000, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1200:, 0], -1.0, atol=1e-6)
    np.testing.assert_array_equal(out[5:12, 1], 3.0)


def test_low_output_rates_are_left_alone() -> None:
    """At --fs 80 the output cannot carry 42.5 Hz anyway; nothing to remove."""
    rng = np.random.default_rng(0)
    sig = rng.normal(size=(1000, 12))
    np.testing.assert_array_equal(band_limit(sig, 80.0, 25.0), sig)
