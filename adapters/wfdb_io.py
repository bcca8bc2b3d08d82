"""WFDB and CSV files of a digitized ECG: the formats research tools read.

A record holds the 12 standard leads in :data:`LEADS` order, format 16 at 1000 adu/mV
(1 µV steps, ±32.767 mV), units mV. A sample the page did not print is written as
WFDB's format-16 invalid value -32768, which ``wfdb.rdrecord`` reads back as NaN.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import wfdb

from pipeline.leads import LEAD_INDEX, LEADS
from pipeline.result import Digitization

ADC_GAIN = 1000.0
"""Digital units per mV: 1 µV resolution, the PTB-XL convention."""
WFDB_FORMAT = "16"
_DIGITAL_MAX = 32767
"""Largest magnitude written; -32768 is reserved for "not printed"."""
UNITS = "mV"
_RECORD_NAME = re.compile(r"[^-\w]+")

_LEAD_ALIASES: dict[str, str] = {name.casefold(): name for name in LEADS}


def record_stem(name: str) -> str:
    """``name`` made safe as a WFDB record name (letters, digits, ``-`` and ``_`` only)."""
    stem = _RECORD_NAME.sub("_", name).strip("_")
    return stem or "record"


def canonical_lead(name: str) -> str | None:
    """The :data:`LEADS` name for a channel label such as ``AVR``, ``Lead II`` or
    ``MDC_ECG_LEAD_V1``; ``None`` if it is not one of the 12 standard leads."""
    key = name.strip().casefold().replace(" ", "").replace("_", "")
    for prefix in ("mdcecglead", "lead", "ecg"):
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix):]
            break
    return _LEAD_ALIASES.get(key)


def _comments(dig: Digitization) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        software = f"CardioScan {version('cardioscan')}"
    except PackageNotFoundError:
        software = "CardioScan"
    return [
        f"Digitized from an ECG image by {software}, engine {dig.engine}",
        f"layout: {dig.layout}",
        f"paper speed: {dig.paper_speed_mm_s:g} mm/s",
        f"gain: {dig.gain_mm_mv:g} mm/mV",
        "samples the image does not show are missing (NaN)",
    ]


def write_record(dig: Digitization, out_dir: Path, stem: str) -> Path:
    """Write ``out_dir/<stem>.hea`` and ``.dat``; returns the record path without extension.

    ``stem`` must already be a valid record name (see :func:`record_stem`).
    """
    if record_stem(stem) != stem:
        raise ValueError(f"not a valid WFDB record name: {stem!r}")
    signals = np.asarray(dig.signals, dtype=np.float64)
    if signals.ndim != 2 or signals.shape[1] != len(LEADS):
        raise ValueError(f"expected (n, {len(LEADS)}) signals, got {signals.shape}")
    if signals.shape[0] == 0:
        raise ValueError("no samples to write")
    limit = _DIGITAL_MAX / ADC_GAIN
    physical = np.where(np.isinf(signals), np.nan, signals)
    physical = np.clip(physical, -limit, limit)  # keeps NaN, never reaches -32768
    out_dir.mkdir(parents=True, exist_ok=True)
    fs = float(dig.fs)
    wfdb.wrsamp(
        stem,
        fs=int(fs) if fs.is_integer() else fs,
        units=[UNITS] * len(LEADS),
        sig_name=list(LEADS),
        p_signal=physical,
        fmt=[WFDB_FORMAT] * len(LEADS),
        adc_gain=[ADC_GAIN] * len(LEADS),
        baseline=[0] * len(LEADS),
        comments=_comments(dig),
        write_dir=str(out_dir),
    )
    return out_dir / stem


def read_record(path: Path | str) -> tuple[np.ndarray, float]:
    """Read a WFDB record into ``(n, 12)`` mV in :data:`LEADS` order, and its rate in Hz.

    ``path`` may end in ``.hea``. Channels are matched by name, whatever spelling the
    writer used; a lead the record lacks is all NaN, as are samples stored as invalid.
    """
    path = Path(path)
    if path.suffix in (".hea", ".dat"):
        path = path.with_suffix("")
    record = wfdb.rdrecord(str(path), physical=True)
    p_signal = np.asarray(record.p_signal, dtype=np.float64)
    out = np.full((p_signal.shape[0], len(LEADS)), np.nan)
    units = record.units or [UNITS] * p_signal.shape[1]
    for column, name in enumerate(record.sig_name):
        lead = canonical_lead(name)
        if lead is None:
            continue
        scale = _to_millivolts(units[column])
        out[:, LEAD_INDEX[lead]] = p_signal[:, column] * scale
    return out, float(record.fs)


def _to_millivolts(unit: str | None) -> float:
    scales = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}
    return scales.get((unit or UNITS).strip().casefold(), 1.0)


def write_csv(dig: Digitization, path: Path) -> Path:
    """Write ``time_s`` plus the 12 leads in mV, one row per sample; empty cells for NaN."""
    signals = np.asarray(dig.signals, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time_s", *LEADS])
        for index, row in enumerate(signals):
            cells = ["" if not np.isfinite(v) else f"{v:.4f}" for v in row]
            writer.writerow([f"{index / dig.fs:.6f}", *cells])
    return path
