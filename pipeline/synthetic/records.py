"""Real 12-lead records used as page signals next to the physiologic generator.

- pydicom's bundled 12-lead example (always available; 10 s at 1 kHz, resampled to 500 Hz).
- The WFDB records in ``../shared/data/photos-dev`` when that folder exists. They are for
  development only: the fixed sets never depend on them, so a fresh clone reproduces them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from pipeline.leads import DEFAULT_FS, LEADS

PHOTOS_DEV = Path(os.environ.get("CARDIOSCAN_PHOTOS_DEV", "/work/shared/data/photos-dev"))
_DICOM_LABELS = {"Lead I (Einthoven)": "I", "Lead II": "II", "Lead III": "III"}


@lru_cache(maxsize=1)
def dicom_example() -> np.ndarray:
    """pydicom's ``waveform_ecg.dcm`` rhythm group as (n,12) mV at 500 Hz, LEADS order."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("waveform_ecg.dcm")
    if path is None:
        raise FileNotFoundError("pydicom test file waveform_ecg.dcm is missing")
    ds = pydicom.dcmread(path)
    group = ds.WaveformSequence[0]
    raw = ds.waveform_array(0).astype(float) / 1000.0  # uV -> mV
    names = []
    for ch in group.ChannelDefinitionSequence:
        meaning = str(ch.ChannelSourceSequence[0].CodeMeaning)
        names.append(_DICOM_LABELS.get(meaning, meaning.removeprefix("Lead ")))
    fs_in = int(float(group.SamplingFrequency))
    sig = resample_poly(raw, DEFAULT_FS, fs_in, axis=0)
    return np.stack([sig[:, names.index(lead)] for lead in LEADS], axis=1)


@lru_cache(maxsize=1)
def photos_dev_records() -> tuple[np.ndarray, ...]:
    """The development WFDB records as (n,12) mV arrays (NaN where not printed); () if absent."""
    if not PHOTOS_DEV.is_dir():
        return ()
    import wfdb

    out = []
    for hea in sorted(PHOTOS_DEV.glob("*.hea")):
        rec = wfdb.rdrecord(str(hea.with_suffix("")))
        if rec.fs != DEFAULT_FS or rec.p_signal is None:
            continue
        names = list(rec.sig_name)
        if not all(lead in names for lead in LEADS):
            continue
        out.append(np.stack([rec.p_signal[:, names.index(lead)] for lead in LEADS], axis=1))
    return tuple(out)


def record_window(rng: np.random.Generator, source: str, seconds: float,
                  printed: np.ndarray) -> np.ndarray | None:
    """A window of a real record covering ``seconds``; None when no record fits.

    ``printed`` is the (n,12) bool mask of samples the page prints; a record fits when it
    has a finite value at every printed sample.
    """
    n = printed.shape[0]
    if source == "dicom":
        candidates: tuple[np.ndarray, ...] = (dicom_example(),)
    elif source == "photos-dev":
        candidates = photos_dev_records()
    else:
        return None
    for k in rng.permutation(len(candidates)):
        sig = candidates[int(k)]
        if sig.shape[0] < n:
            continue
        start = int(rng.integers(0, sig.shape[0] - n + 1)) if source == "dicom" else 0
        win = sig[start:start + n]
        if np.isfinite(win[printed]).all():
            return win.copy()
    return None
