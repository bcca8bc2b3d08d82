"""Sub-pixel series extraction from trace-probability maps (pipeline.models.series)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from pipeline.models.series import find_baselines, track_rows

H, W = 420, 900


def ecg_like(x: np.ndarray, baseline: float, amp: float, invert: bool = False,
             shift: float = 0.0) -> np.ndarray:
    """A beat train with a sharp R (up), S (down) and a broad T, in image rows (y down)."""
    beat = np.zeros_like(x, dtype=float)
    for c in np.arange(60.0 + shift, W, 170.0):
        beat += amp * np.exp(-0.5 * ((x - c) / 2.4) ** 2)
        beat -= 0.4 * amp * np.exp(-0.5 * ((x - c - 7) / 2.6) ** 2)
        beat += 0.25 * amp * np.exp(-0.5 * ((x - c - 48) / 12) ** 2)
    return baseline + beat if invert else baseline - beat


def render(curves: list[np.ndarray], sigma: float = 1.0) -> np.ndarray:
    """Gaussian of the distance to densely sampled curves, like the training targets."""
    xs = np.arange(0, W, 0.05)
    pts = np.concatenate([np.stack([xs, c], axis=1) for c in curves])
    yy, xx = np.mgrid[0:H, 0:W]
    d, _ = cKDTree(pts).query(np.stack([xx.ravel(), yy.ravel()], axis=1),
                              distance_upper_bound=6.0)
    d = np.where(np.isfinite(d), d, 99.0).reshape(H, W)
    return np.exp(-0.5 * (d / sigma) ** 2).astype(np.float32)


@pytest.fixture(scope="module")
def page() -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    xs = np.arange(0, W, 0.05)
    xc = np.arange(W, dtype=float)
    baselines = [100.0, 230.0, 340.0]
    # Row 0 small; row 1 tall enough to cross into row 0's band; row 2 mostly negative.
    specs = [(40.0, False, 0.0), (124.0, False, 85.0), (70.0, True, 30.0)]
    dense = [ecg_like(xs, b, *sp) for b, sp in zip(baselines, specs, strict=True)]
    truth = [ecg_like(xc, b, *sp) for b, sp in zip(baselines, specs, strict=True)]
    return render(dense), truth, baselines


def snr_db(truth: np.ndarray, got: np.ndarray, baseline: float) -> float:
    err = got - truth
    return float(10 * np.log10(np.sum((truth - baseline) ** 2) / np.nansum(err ** 2)))


def test_sub_pixel_accuracy_and_both_deflections(page) -> None:
    prob, truth, baselines = page
    rows = track_rows(prob, baselines, sigma_px=1.0)
    assert len(rows) == 3
    for row, ref, b in zip(rows, truth, baselines, strict=True):
        err = np.abs(row.y - ref)
        assert np.isfinite(row.y).all()
        assert np.median(err) < 0.1  # sub-pixel on flat stretches
        assert np.percentile(err, 99) < 2.5  # QRS tips and troughs keep their amplitude
        assert snr_db(ref, row.y, b) > 30.0
    # The negative row's troughs: the deepest extracted point matches the truth.
    assert abs(np.max(rows[2].y) - np.max(truth[2])) < 1.0
    assert abs(np.min(rows[1].y) - np.min(truth[1])) < 1.0


def test_hard_argmax_would_cut_peaks(page) -> None:
    """The check above is not trivially met: a per-column argmax inside the band loses
    the tall row's R tips (it is the reason for the sub-pixel rules)."""
    prob, truth, _ = page
    band = prob[150:300]
    argmax = np.argmax(band, axis=0) + 150.0
    assert np.percentile(np.abs(argmax - truth[1]), 99) > 10.0
    assert snr_db(truth[1], argmax, 230.0) < 20.0


def test_overlapping_rows_are_kept_apart(page) -> None:
    prob, truth, baselines = page
    # Row 1's R waves reach above row 0's S troughs, a few px from row 0's baseline.
    assert np.min(truth[1]) < np.max(truth[0])
    rows = track_rows(prob, baselines, sigma_px=1.0)
    assert np.max(np.abs(rows[0].y - truth[0])) < 3.0
    assert np.max(np.abs(rows[1].y - truth[1])) < 3.0


def test_noisy_blurred_map_still_sub_pixel(page) -> None:
    prob, truth, baselines = page
    rng = np.random.default_rng(0)
    noisy = np.clip(gaussian_filter(prob, 0.6) * 1.4 + rng.normal(0, 0.05, prob.shape), 0, 1)
    rows = track_rows(noisy.astype(np.float32), baselines, sigma_px=1.2)
    for row, ref, b in zip(rows, truth, baselines, strict=True):
        assert np.nanmedian(np.abs(row.y - ref)) < 0.3
        assert snr_db(ref, row.y, b) > 18.0


def test_gaps_are_nan_not_invented(page) -> None:
    prob, _, baselines = page
    cut = prob.copy()
    cut[:, 400:480] = 0.0
    rows = track_rows(cut, baselines)
    assert np.isnan(rows[0].y[410:470]).all()
    assert np.isfinite(rows[0].y[300:390]).all()


def test_find_baselines(page) -> None:
    prob, _, baselines = page
    found = find_baselines(prob, min_gap_px=60)
    assert len(found) == 3
    assert np.max(np.abs(found - np.array(baselines))) < 3.0
