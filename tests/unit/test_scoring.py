"""The PhysioNet scores on cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.leads import LEADS
from pipeline.scoring import BEST_KAGGLE_DB, PERFECT_SCORE, aggregate, align, score_image

N_LEADS = len(LEADS)


def every_lead(values: list[float]) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=float)[:, None], N_LEADS, axis=1)


def test_best_score_is_25_84_db() -> None:
    assert round(BEST_KAGGLE_DB, 4) == 25.8433


def test_perfect_prediction_scores_the_cap() -> None:
    ref = every_lead([0, 1, 2, 1, 0, -1, 0, 0])
    image = score_image(ref.copy(), ref, fs=10)
    assert image.ratio == PERFECT_SCORE
    assert image.noise_power == 0
    result = aggregate([image])
    assert result.kaggle_db == pytest.approx(25.8433, abs=1e-4)
    assert result.challenge_db == math.inf  # the Challenge 2024 rule: y == 0 -> inf
    assert all(v == pytest.approx(25.8433, abs=1e-4) for v in result.per_lead_db.values())


def test_shift_within_0_2_s_is_forgiven() -> None:
    # fs 10 Hz -> the metric forgives int(10 * 0.2) = 2 samples.
    ref = every_lead([0, 0, 0, 1, 3, 1, 0, 0, 0, 0])
    late = every_lead([0, 0, 0, 0, 0, 1, 3, 1, 0, 0])  # 2 samples late
    image = score_image(late, ref, fs=10)
    assert {ls.lag_samples for ls in image.leads} == {-2}
    # the 2 samples shifted in at the end are NaN -> 0, and the reference is 0 there
    assert image.noise_power == 0 and image.ratio == PERFECT_SCORE


def test_shift_beyond_0_2_s_is_not_forgiven() -> None:
    ref = every_lead([0, 0, 0, 1, 3, 1, 0, 0, 0, 0])
    late = every_lead([0, 0, 0, 0, 0, 0, 1, 3, 1, 0])  # 3 samples late, window is 2
    image = score_image(late, ref, fs=10)
    assert {abs(ls.lag_samples) for ls in image.leads} <= {0, 1, 2}
    assert image.ratio < 2


def test_alignment_matches_the_metric_examples() -> None:
    # The four alignment examples of the Kaggle metric's own docstring.
    aligned, _, _ = align(np.array([0, 1, 2, 1, 0.0]), np.array([0, 1, 2, 1, 0.0]), math.inf)
    np.testing.assert_allclose(aligned, [0, 1, 2, 1, 0], atol=1e-9)
    aligned, _, offset = align(np.array([0, 1, 2, 1, 0.0]), np.array([10, 11, 12, 11, 10.0]),
                               math.inf)
    np.testing.assert_allclose(aligned, [0, 1, 2, 1, 0], atol=1e-9)
    assert offset == pytest.approx(10)
    aligned, lag, _ = align(np.array([0, 0, 1, 2, 1, 0, 0.0]), np.array([1, 2, 1, 0, 0, 0, 0.0]),
                            math.inf)
    assert lag == 2
    np.testing.assert_allclose(aligned, [np.nan, np.nan, 1, 2, 1, 0, 0], atol=1e-9)
    aligned, _, _ = align(np.array([0, 0, 0, 0, 1, 2, 1.0]), np.array([1, 2, 1, 0, 0, 0, 0.0]), 10)
    np.testing.assert_allclose(aligned, [np.nan] * 4 + [1, 2, 1], atol=1e-9)


def test_tie_takes_the_smallest_lag() -> None:
    # A constant prediction correlates 0 at every lag: lag 0 must win.
    _, lag, _ = align(np.array([0, 3, 0, 3, 0.0]), np.zeros(5), 2)
    assert lag == 0


def test_vertical_offset_is_removed() -> None:
    ref = every_lead([0, 1, 2, 1, 0, -1, 0, 0])
    image = score_image(ref + 0.5, ref, fs=10)
    assert image.ratio == PERFECT_SCORE
    assert all(ls.offset == pytest.approx(0.5) for ls in image.leads)
    # the Challenge 2024 figure does not forgive the offset: per lead 7 / (8 * 0.5²) = 3.5
    assert aggregate([image]).challenge_db == pytest.approx(10 * math.log10(3.5))


def test_all_zero_prediction() -> None:
    # Per lead: ref [0, 2, 0, 2] has power 8; the zero prediction is lifted to the mean 1,
    # leaving noise 4 -> ratio 2 per lead and per image.
    ref = every_lead([0, 2, 0, 2])
    image = score_image(np.zeros_like(ref), ref, fs=1)
    assert image.signal_power == pytest.approx(12 * 8)
    assert image.noise_power == pytest.approx(12 * 4)
    assert image.ratio == pytest.approx(2.0)
    result = aggregate([image])
    assert result.kaggle_db == pytest.approx(10 * math.log10(2))
    assert result.challenge_db == pytest.approx(0.0)  # 10 log10(8 / 8), no offset removal


def test_nan_prediction_counts_as_zero() -> None:
    ref = every_lead([0, 2, 0, 2])
    all_nan = score_image(np.full_like(ref, np.nan), ref, fs=1)
    assert all_nan.ratio == pytest.approx(2.0)  # the same as all zero
    # One NaN: guess [0, 0, 0, 2] -> offset -0.5 -> [0.5, 0.5, 0.5, 2.5];
    # noise 0.25 + 2.25 + 0.25 + 0.25 = 3 per lead, signal 8 -> ratio 8 / 3.
    pred = every_lead([0, np.nan, 0, 2])
    image = score_image(pred, ref, fs=1)
    assert image.ratio == pytest.approx(8 / 3)


def test_only_the_printed_segment_is_scored() -> None:
    ref = every_lead([np.nan, np.nan, 1, 3, 1, 0, np.nan, np.nan])
    pred = every_lead([50, -50, 1, 3, 1, 0, 99, 99])  # nonsense where nothing is printed
    image = score_image(pred, ref, fs=1)
    assert image.ratio == PERFECT_SCORE
    assert all(ls.n_samples == 4 for ls in image.leads)


def test_set_takes_the_mean_ratio_then_db() -> None:
    ref = every_lead([0, 2, 0, 2])
    perfect = score_image(ref.copy(), ref, fs=1)
    zero = score_image(np.zeros_like(ref), ref, fs=1)
    result = aggregate([perfect, zero])
    assert result.mean_ratio == pytest.approx((384 + 2) / 2)
    assert result.kaggle_db == pytest.approx(10 * math.log10(193))
    # not the mean of the image dB figures
    assert result.kaggle_db != pytest.approx((perfect.db + zero.db) / 2)


def test_zero_reference_gives_the_floor() -> None:
    ref = every_lead([0, 0, 0, 0])
    result = aggregate([score_image(every_lead([1, 2, 3, 4]), ref, fs=1)])
    assert result.kaggle_db == -PERFECT_SCORE


def test_kaggle_docstring_example() -> None:
    # The Kaggle metric's docstring example at fs = 1: short leads of 3 samples, lead II
    # of 12; its published figures are 25.8433, 13.6291 and 13.0576.
    values = {
        "I": [0.1, 0.3, 0.4], "III": [0.6, 0.6, 0.4], "aVR": [0.2, 0.3, 0.4],
        "aVL": [0.5, 0.2, 0.7], "aVF": [0.2, 0.3, 0.4], "V1": [0.8, 0.6, 0.7],
        "V2": [0.2, 0.3, -0.1], "V3": [0.5, 0.6, 0.7], "V4": [0.2, 0.9, 0.4],
        "V5": [0.5, 0.6, 0.7], "V6": [0.1, 0.3, 0.4],
        "II": [0.6, 0.6, 0.4, 0.2, 0.3, 0.4, 0.5, 0.2, 0.7, 0.2, 0.3, 0.4],
    }
    ref = np.full((12, N_LEADS), np.nan)
    for lead, column in values.items():
        ref[: len(column), LEADS.index(lead)] = column
    pred = ref.copy()
    assert aggregate([score_image(pred, ref, 1)]).kaggle_db == pytest.approx(25.8433, abs=1e-4)
    pred[0, LEADS.index("I")] = 0.9
    assert aggregate([score_image(pred, ref, 1)]).kaggle_db == pytest.approx(13.6291, abs=1e-4)
    pred[1, LEADS.index("III")] = 0.3
    assert aggregate([score_image(pred, ref, 1)]).kaggle_db == pytest.approx(13.0576, abs=1e-4)


def test_prediction_length_is_fitted_to_the_reference() -> None:
    ref = every_lead([0, 1, 2, 1, 0, 0])
    short = score_image(ref[:4].copy(), ref, fs=1)
    assert short.ratio == PERFECT_SCORE  # missing tail is NaN -> 0, and ref is 0 there
    long = score_image(np.vstack([ref, every_lead([9, 9])]), ref, fs=1)
    assert long.ratio == PERFECT_SCORE


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError):
        score_image(np.zeros((5, 11)), np.zeros((5, 12)), fs=1)
