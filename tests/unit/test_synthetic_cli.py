"""``cardioscan synth`` writes pages, WFDB records with NaN, JSON and a contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import wfdb

from pipeline.leads import LEADS
from pipeline.synthetic import generate_page
from pipeline.synthetic.rate import GenerationRate
from service.synth_cli import run_speed, run_synth, write_page


def test_write_page_writes_image_record_json_and_arrays(tmp_path: Path) -> None:
    page = generate_page(40, "clean", width_px=700)
    name = "page40"
    write_page(page, tmp_path, name)
    img = cv2.imread(str(tmp_path / f"{name}.png"))
    assert img.shape == page.image.shape
    rec = wfdb.rdrecord(str(tmp_path / name))
    assert rec.sig_name == list(LEADS)
    assert rec.fs == 500
    np.testing.assert_array_equal(np.isnan(rec.p_signal), np.isnan(page.signals))
    np.testing.assert_allclose(rec.p_signal, page.signals, atol=1e-3, equal_nan=True)
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["layout"] == str(page.layout)
    assert meta["px_per_mm"] == page.px_per_mm
    assert set(meta["lead_boxes"]) == set(LEADS)
    arrays = np.load(tmp_path / f"{name}.npz")
    np.testing.assert_allclose(arrays["path_V3"], page.trace_paths["V3"], atol=1e-3)


def test_out_writes_n_pages(tmp_path: Path) -> None:
    assert run_synth(contact_sheet=None, out=tmp_path, n=2, style="scan", seed=7) == 0
    for seed in (7, 8):
        stem = tmp_path / f"synth-{seed:06d}-scan"
        assert wfdb.rdheader(str(stem)).n_sig == 12
        assert stem.with_suffix(".png").exists() and stem.with_suffix(".json").exists()


def test_contact_sheet(tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    assert run_synth(contact_sheet=sheet, out=None, n=3, style="scan", seed=0) == 0
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 1000


def test_bad_arguments_fail_with_a_message(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_synth(contact_sheet=None, out=tmp_path, n=1, style="fax", seed=0) == 2
    assert "unknown style" in capsys.readouterr().err
    assert run_synth(contact_sheet=None, out=None, n=1, style="clean", seed=0) == 2


def test_speed_times_every_style_on_worker_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_speed(width=320, workers=2, n=2) == 0
    out = capsys.readouterr().out
    assert "320 px wide, 2 processes" in out
    for column in ("clean", "scan", "photo", "training mix"):
        assert column in out
    assert out.count("pages/s") == 4


def test_training_mix_is_the_share_weighted_time_per_page() -> None:
    rate = GenerationRate(2100, 2, 10, {"clean": 30.0, "scan": 12.0, "photo": 8.0})
    # 0.1/30 + 0.3/12 + 0.6/8 s per page
    assert rate.training_mix == pytest.approx(1.0 / (0.1 / 30 + 0.3 / 12 + 0.6 / 8))
    assert 8.0 < rate.training_mix < 12.0


def test_speed_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_speed(width=10, workers=2, n=2) == 2
    assert "--width" in capsys.readouterr().err
