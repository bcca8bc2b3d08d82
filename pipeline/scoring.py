"""The PhysioNet ECG-image-digitization scores, so that bench figures compare with the field's.

Two figures are computed from the same predictions:

* **Kaggle 2025** ("PhysioNet - Digitization of ECG Images", metric notebook
  ``kaggle.com/code/metric/physionet-ecg-signal-extraction-metric``). Per lead, the
  reference is the printed segment of the lead; the prediction over the same samples is
  shifted in time to the cross-correlation peak of the mean-removed signals within
  ``±0.2 s`` (``int(fs * 0.2)`` samples; on a tie the smallest ``|lag|``), samples shifted
  in are NaN, the vertical offset is removed by least squares over the overlapping
  samples, and the remaining NaN count as 0. Signal power ``Σ ref²`` and noise power
  ``Σ (ref - pred)²`` are summed over the 12 leads of an image and their ratio is capped
  at 384. A set scores ``10·log10(mean of the ratios)`` (at least -384); the best possible
  figure is ``10·log10(384) = 25.84 dB``.
* **Challenge 2024** (``physionetchallenges/evaluation-2024``, ``helper_code.compute_snr``):
  per lead over the whole record, NaN in reference and prediction count as 0, no
  alignment, ``10·log10(Σ ref² / Σ noise²)``; the set figure is the mean of these
  per-lead dB over every (image, lead) pair, ignoring NaN.

The Kaggle submission format cannot carry NaN, so a NaN in a prediction is read as the 0
a submission would have had to hold; a failed image is therefore scored as an all-NaN
(= all-zero) prediction, which after offset removal scores
``Σ ref² / Σ (ref - mean(ref))²`` per image, about 1 (0 dB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.signal

from pipeline.leads import LEADS

MAX_TIME_SHIFT_S = 0.2
"""Largest time shift the Kaggle metric forgives, seconds."""
PERFECT_SCORE = 384.0
"""Cap on the signal-to-noise power ratio of one image (and floor of -384 dB for a set)."""
BEST_KAGGLE_DB = 10.0 * math.log10(PERFECT_SCORE)
"""25.84 dB: every image perfect."""


@dataclass(frozen=True)
class LeadScore:
    """How one lead of one image was aligned and what it contributes."""

    lead: str
    n_samples: int
    """Printed samples of the reference (0: the lead is not in the reference)."""
    lag_samples: int
    """Shift applied to the prediction: positive delays it."""
    offset: float
    """Vertical offset (mV) removed from the shifted prediction."""
    signal_power: float
    noise_power: float
    challenge_db: float
    """Challenge 2024 SNR of this lead, dB (inf for a perfect lead, NaN if undefined)."""

    @property
    def ratio(self) -> float:
        """This lead's own capped power ratio, the Kaggle rule applied to one lead."""
        return _capped_ratio(self.signal_power, self.noise_power)

    @property
    def db(self) -> float:
        return _to_db(self.ratio)


@dataclass(frozen=True)
class ImageScore:
    """Kaggle and Challenge figures for one image."""

    signal_power: float
    noise_power: float
    ratio: float
    """Capped ``signal_power / noise_power``: the number the Kaggle metric averages."""
    leads: tuple[LeadScore, ...]

    @property
    def db(self) -> float:
        """The image's own Kaggle figure, ``10·log10(ratio)``."""
        return _to_db(self.ratio)

    @property
    def per_lead_db(self) -> dict[str, float]:
        """Each lead's capped ratio in dB, after the Kaggle alignment."""
        return {ls.lead: ls.db for ls in self.leads if ls.n_samples}

    @property
    def challenge_lead_db(self) -> dict[str, float]:
        """Each lead's Challenge 2024 SNR in dB."""
        return {ls.lead: ls.challenge_db for ls in self.leads}


@dataclass(frozen=True)
class SetScore:
    """Figures for a set of images."""

    n_images: int
    kaggle_db: float
    """``10·log10`` of the mean image ratio: the Kaggle 2025 score."""
    challenge_db: float
    """Mean of per-lead Challenge 2024 dB over every (image, lead) pair."""
    per_lead_db: dict[str, float]
    """Per lead, ``10·log10`` of the mean over images of that lead's capped ratio."""
    mean_ratio: float


def _capped_ratio(signal_power: float, noise_power: float) -> float:
    if noise_power == 0:
        return PERFECT_SCORE
    if signal_power == 0:
        return 0.0
    return min(signal_power / noise_power, PERFECT_SCORE)


def _to_db(ratio: float) -> float:
    return 10.0 * math.log10(ratio) if ratio > 0 else -math.inf


def align(label: np.ndarray, pred: np.ndarray, max_shift: float) -> tuple[np.ndarray, int, float]:
    """Shift and offset ``pred`` onto ``label`` the way the Kaggle metric does.

    Both are finite 1-D arrays. Returns the aligned prediction (NaN where samples were
    shifted in), the lag applied and the vertical offset removed.
    """
    label = np.asarray(label, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    n_label, n_pred = label.size, pred.size
    correlation = scipy.signal.correlate(label - label.mean(), pred - pred.mean(), mode="full")
    lags = scipy.signal.correlation_lags(n_label, n_pred, mode="full")
    window = np.abs(lags) <= max_shift
    peak = correlation[window].max()
    ties = np.flatnonzero(window & (correlation == peak))
    lag = int(lags[ties[np.argmin(np.abs(lags[ties]))]])

    aligned = np.full(n_label, np.nan)
    start = max(lag, 0)
    src_start = max(-lag, 0)
    src_end = min(n_label - lag, n_pred)
    if src_end > src_start:
        aligned[start : start + src_end - src_start] = pred[src_start:src_end]

    both = np.isfinite(aligned)
    offset = float(np.mean(aligned[both] - label[both])) if both.any() else 0.0
    return aligned - offset, lag, offset


def _challenge_db(label: np.ndarray, pred: np.ndarray) -> float:
    label = np.nan_to_num(label, nan=0.0)
    pred = np.nan_to_num(pred, nan=0.0)
    signal_power = float(np.sum(label**2))
    noise_power = float(np.sum((pred - label) ** 2))
    if noise_power > 0:
        return 10.0 * math.log10(signal_power / noise_power) if signal_power > 0 else -math.inf
    return math.inf


def score_image(pred: np.ndarray, ref: np.ndarray, fs: float) -> ImageScore:
    """Score one digitized image against its reference record.

    ``pred`` and ``ref`` are ``(n, 12)`` in mV, columns in :data:`LEADS` order, NaN where a
    lead is not printed (``ref``) or not read (``pred``). ``pred`` is cut or NaN-padded to
    the length of ``ref``, as the Challenge's ``trim_signal`` does.
    """
    ref = np.asarray(ref, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    n_leads = len(LEADS)
    if ref.ndim != 2 or ref.shape[1] != n_leads or pred.ndim != 2 or pred.shape[1] != n_leads:
        raise ValueError(f"expected (n, {n_leads}) arrays, got {pred.shape} and {ref.shape}")
    if pred.shape[0] != ref.shape[0]:
        fitted = np.full_like(ref, np.nan)
        n = min(pred.shape[0], ref.shape[0])
        fitted[:n] = pred[:n]
        pred = fitted
    pred = np.where(np.isinf(pred), np.nan, pred)
    max_shift = int(fs * MAX_TIME_SHIFT_S)

    lead_scores = []
    for i, lead in enumerate(LEADS):
        printed = np.isfinite(ref[:, i])
        label = ref[printed, i]
        challenge = _challenge_db(ref[:, i], pred[:, i])
        if label.size == 0:
            lead_scores.append(LeadScore(lead, 0, 0, 0.0, 0.0, 0.0, challenge))
            continue
        guess = np.nan_to_num(pred[printed, i], nan=0.0)
        aligned, lag, offset = align(label, guess, max_shift)
        aligned = np.nan_to_num(aligned, nan=0.0)
        lead_scores.append(
            LeadScore(
                lead,
                int(label.size),
                lag,
                offset,
                float(np.sum(label**2)),
                float(np.sum((label - aligned) ** 2)),
                challenge,
            )
        )
    signal_power = sum(ls.signal_power for ls in lead_scores)
    noise_power = sum(ls.noise_power for ls in lead_scores)
    return ImageScore(
        signal_power=signal_power,
        noise_power=noise_power,
        ratio=_capped_ratio(signal_power, noise_power),
        leads=tuple(lead_scores),
    )


def _set_db(ratios: Sequence[float]) -> float:
    mean = float(np.mean(ratios))
    return max(_to_db(mean), -PERFECT_SCORE)


def aggregate(scores: Sequence[ImageScore]) -> SetScore:
    """Combine image scores: mean of ratios then dB (Kaggle); mean of lead dB (Challenge)."""
    if not scores:
        nan = math.nan
        return SetScore(0, nan, nan, {lead: nan for lead in LEADS}, nan)
    ratios = [s.ratio for s in scores]
    challenge = np.array([ls.challenge_db for s in scores for ls in s.leads], dtype=np.float64)
    finite_or_inf = challenge[~np.isnan(challenge)]
    challenge_db = float(np.mean(finite_or_inf)) if finite_or_inf.size else math.nan
    per_lead: dict[str, float] = {}
    for i, lead in enumerate(LEADS):
        lead_ratios = [s.leads[i].ratio for s in scores if s.leads[i].n_samples]
        per_lead[lead] = _set_db(lead_ratios) if lead_ratios else math.nan
    return SetScore(
        n_images=len(scores),
        kaggle_db=_set_db(ratios),
        challenge_db=challenge_db,
        per_lead_db=per_lead,
        mean_ratio=float(np.mean(ratios)),
    )
