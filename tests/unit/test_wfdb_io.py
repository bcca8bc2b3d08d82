"""WFDB and CSV output: what ``wfdb.rdrecord`` and a spreadsheet read back."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import wfdb
from service_support import digitize

from adapters.wfdb_io import (
    ADC_GAIN,
    canonical_lead,
    read_record,
    record_stem,
    write_csv,
    write_record,
)
from pipeline.leads import LEADS
from pipeline.result import Digitization


def digitization(fs: int = 500) -> Digitization:
    dig = digitize(np.zeros((40, 40, 3), np.uint8), fs=fs, qa=False)
    rng = np.random.default_rng(1)
    dig.signals = rng.normal(0, 0.8, (10 * fs, len(LEADS)))  # a 10 s record
    dig.signals[:1250, 6:] = np.nan  # chest leads not printed in the first 2.5 s
    dig.signals[:, LEADS.index("aVL")] = np.nan  # a lead not read at all
    return dig


def test_round_trip_keeps_values_and_nan(tmp_path: Path) -> None:
    dig = digitization()
    path = write_record(dig, tmp_path, "ecg_01")
    assert path == tmp_path / "ecg_01"
    record = wfdb.rdrecord(str(path))
    assert record.sig_name == list(LEADS)
    assert record.fs == 500 and record.sig_len == 5000
    assert record.units == ["mV"] * 12
    assert record.fmt == ["16"] * 12
    np.testing.assert_array_equal(np.isnan(record.p_signal), np.isnan(dig.signals))
    finite = np.isfinite(dig.signals)
    assert np.abs(record.p_signal[finite] - dig.signals[finite]).max() <= 0.5 / ADC_GAIN + 1e-9
    assert any("CardioScan" in line for line in record.comments)


def test_nan_is_stored_as_the_format_16_invalid_value(tmp_path: Path) -> None:
    dig = digitization()
    path = write_record(dig, tmp_path, "raw")
    digital = wfdb.rdrecord(str(path), physical=False).d_signal
    assert (digital[np.isnan(dig.signals)] == -32768).all()
    assert (digital[np.isfinite(dig.signals)] > -32768).all()


def test_out_of_range_values_are_clipped_not_turned_into_nan(tmp_path: Path) -> None:
    dig = digitization()
    dig.signals[0, 0], dig.signals[1, 0] = -100.0, 100.0
    signals, _ = read_record(write_record(dig, tmp_path, "clip"))
    assert signals[0, 0] == pytest.approx(-32.767)
    assert signals[1, 0] == pytest.approx(32.767)


def test_read_record_maps_lead_name_variants(tmp_path: Path) -> None:
    names = ["ii", "Lead I", "AVR", "MDC_ECG_LEAD_V1", "resp"]
    data = np.arange(50, dtype=float).reshape(10, 5) / 10
    wfdb.wrsamp("other", fs=250, units=["mV", "mV", "mV", "uV", "mV"], sig_name=names,
                p_signal=data.copy(), fmt=["16"] * 5, adc_gain=[1000.0] * 5, baseline=[0] * 5,
                write_dir=str(tmp_path))
    signals, fs = read_record(tmp_path / "other.hea")
    assert fs == 250 and signals.shape == (10, 12)
    np.testing.assert_allclose(signals[:, LEADS.index("II")], data[:, 0], atol=1e-3)
    np.testing.assert_allclose(signals[:, LEADS.index("I")], data[:, 1], atol=1e-3)
    np.testing.assert_allclose(signals[:, LEADS.index("aVR")], data[:, 2], atol=1e-3)
    np.testing.assert_allclose(signals[:, LEADS.index("V1")], data[:, 3] / 1000, atol=1e-6)
    assert np.isnan(signals[:, LEADS.index("V6")]).all()


def test_lead_names() -> None:
    assert canonical_lead("avf") == "aVF"
    assert canonical_lead(" V6 ") == "V6"
    assert canonical_lead("Pleth") is None


def test_record_names_are_made_safe() -> None:
    assert record_stem("01032_hr-0") == "01032_hr-0"
    assert record_stem("scan 2024.v2") == "scan_2024_v2"
    assert record_stem("...") == "record"


def test_invalid_record_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_record(digitization(), tmp_path, "bad name")


def test_csv_has_time_and_empty_cells_for_nan(tmp_path: Path) -> None:
    dig = digitization(fs=250)
    path = write_csv(dig, tmp_path / "out.csv")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["time_s", *LEADS]
    assert len(rows) == 1 + dig.signals.shape[0]
    assert float(rows[2][0]) == pytest.approx(1 / 250)
    assert rows[1][1 + LEADS.index("V1")] == ""
    assert rows[1][1 + LEADS.index("aVL")] == ""
    assert float(rows[1][1]) == pytest.approx(dig.signals[0, 0], abs=1e-4)
