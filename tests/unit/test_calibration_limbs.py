"""The limb leads read at one instant are made consistent (Einthoven, Goldberger)."""

from __future__ import annotations

import numpy as np

from pipeline.calibration import LIMB_BASIS, _limb_projection
from pipeline.leads import LEAD_INDEX


def _limbs(n: int = 1250) -> np.ndarray:
    """(n, 12) leads: all six limb leads from one smooth (I, II) pair, the rest NaN."""
    t = np.arange(n) / 500.0
    i = 0.3 * np.sin(2 * np.pi * 1.1 * t) + 0.1 * np.sin(2 * np.pi * 7.0 * t)
    ii = 0.8 * np.sin(2 * np.pi * 1.1 * t + 0.6) + 0.2 * np.cos(2 * np.pi * 9.0 * t)
    sig = np.full((n, 12), np.nan)
    for lead, (a, b) in LIMB_BASIS.items():
        sig[:, LEAD_INDEX[lead]] = a * i + b * ii
    return sig


def test_one_grossly_misread_limb_lead_is_outvoted() -> None:
    """A 6x2 page reads all six limb leads at once. A 1 mV misreading of aVL (a
    neighbour's QRS taken as its own) is replaced from the five others, and barely
    spread onto them."""
    truth = _limbs()
    read = truth.copy()
    bad = slice(600, 650)
    avl = LEAD_INDEX["aVL"]
    read[bad, avl] += 1.0
    out = _limb_projection(read)
    assert np.max(np.abs(out[bad, avl] - truth[bad, avl])) < 0.3
    for lead in ("I", "II", "III", "aVR", "aVF"):
        j = LEAD_INDEX[lead]
        assert np.max(np.abs(out[:, j] - truth[:, j])) < 0.15


def test_consistent_leads_keep_their_shape_and_unread_ones_stay_unread() -> None:
    """(Each lead's own offset may move: the metrics and the scores take it out.)"""
    read = _limbs()
    for lead in ("I", "III"):
        read[:, LEAD_INDEX[lead]] = np.nan
    out = _limb_projection(read)
    assert np.isnan(out[:, LEAD_INDEX["I"]]).all() and np.isnan(out[:, LEAD_INDEX["III"]]).all()
    for lead in ("II", "aVR", "aVL", "aVF"):
        j = LEAD_INDEX[lead]
        moved = out[:, j] - read[:, j]
        np.testing.assert_allclose(moved, moved[0], atol=1e-9)
