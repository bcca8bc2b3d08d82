"""The physiologic generator and the real records behind synthetic pages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.signal import find_peaks

from pipeline.leads import DEFAULT_FS, LEAD_INDEX
from pipeline.synthetic.ecg_model import RHYTHMS, generate_ecg, random_params
from pipeline.synthetic.records import dicom_example


def _lead(sig: np.ndarray, name: str) -> np.ndarray:
    return sig[:, LEAD_INDEX[name]]


@pytest.mark.parametrize("rhythm", RHYTHMS)
def test_einthoven_and_goldberger_hold_exactly(rhythm: str) -> None:
    rng = np.random.default_rng(11)
    params = dataclasses.replace(random_params(rng), rhythm=rhythm)
    sig, _ = generate_ecg(rng, 10.0, DEFAULT_FS, params)
    i, ii = _lead(sig, "I"), _lead(sig, "II")
    assert sig.shape == (5000, 12)
    assert np.isfinite(sig).all()
    np.testing.assert_allclose(_lead(sig, "III"), ii - i, atol=1e-12)
    np.testing.assert_allclose(_lead(sig, "aVR"), -(i + ii) / 2, atol=1e-12)
    np.testing.assert_allclose(_lead(sig, "aVL"), i - ii / 2, atol=1e-12)
    np.testing.assert_allclose(_lead(sig, "aVF"), ii - i / 2, atol=1e-12)
    assert 0.3 < np.ptp(ii) < 8.0  # a plausible amplitude in mV


def test_normal_axis_gives_inverted_avr_and_upright_ii() -> None:
    rng = np.random.default_rng(3)
    params = dataclasses.replace(random_params(rng), rhythm="sinus", axis_deg=60.0,
                                 noise_mv=0.0, wander_mv=0.0, amplitude=1.0)
    sig, _ = generate_ecg(rng, 10.0, DEFAULT_FS, params)
    avr, ii = _lead(sig, "aVR"), _lead(sig, "II")
    assert abs(avr.min()) > abs(avr.max())
    assert ii.max() > abs(ii.min())


def _rr_cv(sig: np.ndarray) -> float:
    ii = _lead(sig, "II")
    energy = np.abs(np.gradient(ii))
    peaks, _ = find_peaks(energy, height=0.5 * energy.max(), distance=int(0.25 * DEFAULT_FS))
    rr = np.diff(peaks)
    return float(rr.std() / rr.mean())


def test_af_is_irregular_and_sinus_is_regular() -> None:
    base = dataclasses.replace(random_params(np.random.default_rng(5)), hr_bpm=80.0,
                               noise_mv=0.0, wander_mv=0.0, amplitude=1.0, qrs_width=1.0)
    sinus, _ = generate_ecg(np.random.default_rng(1), 10.0, DEFAULT_FS,
                            dataclasses.replace(base, rhythm="sinus"))
    af, _ = generate_ecg(np.random.default_rng(1), 10.0, DEFAULT_FS,
                         dataclasses.replace(base, rhythm="af"))
    assert _rr_cv(af) > 2 * _rr_cv(sinus)


def test_generator_is_deterministic_and_varies_with_seed() -> None:
    a, pa = generate_ecg(np.random.default_rng(9), 5.0)
    b, pb = generate_ecg(np.random.default_rng(9), 5.0)
    c, _ = generate_ecg(np.random.default_rng(10), 5.0)
    assert a.shape == (2500, 12)
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert not np.allclose(a, c)


def test_dicom_example_is_a_500_hz_12_lead_record() -> None:
    sig = dicom_example()
    assert sig.shape == (5000, 12)
    assert np.isfinite(sig).all()
    # The record was acquired with III derived from I and II.
    np.testing.assert_allclose(_lead(sig, "III"), _lead(sig, "II") - _lead(sig, "I"), atol=0.01)
    assert 0.5 < np.ptp(_lead(sig, "II")) < 6.0
