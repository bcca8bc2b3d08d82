"""``cardioscan bench`` reports exactly what the scorer gives for what the digitizer returned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import wfdb
from PIL import Image
from service_support import ENGINE, NO_GRID, marked, shifted

from adapters.wfdb_io import read_record
from pipeline.leads import LEADS
from pipeline.scoring import aggregate, score_image
from service.bench import pair_folder, run_bench

FAKE = ENGINE
SHIFT = 7  # samples: 14 ms at 500 Hz, inside the metric's 0.2 s window
FS = 500


def pages(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(picture, reference signals) pairs: synthetic pages when they exist, else plain ones."""
    try:
        from pipeline.synthetic import generate_page
    except ImportError:
        generate_page = None
    if generate_page is not None:
        out = []
        for seed in range(count):
            page = generate_page(seed, "clean", width_px=800)
            out.append((page.image, page.signals))
        return out
    rng = np.random.default_rng(0)
    t = np.arange(10 * FS) / FS
    out = []
    for _ in range(count):
        signals = np.sin(2 * np.pi * rng.uniform(0.8, 2.0) * t)[:, None] * rng.uniform(
            0.2, 1.5, len(LEADS))
        signals[: len(t) // 2, 6:] = np.nan
        out.append((np.full((100, 160, 3), 245, np.uint8), signals))
    return out


def write_reference(folder: Path, name: str, signals: np.ndarray) -> None:
    wfdb.wrsamp(name, fs=FS, units=["mV"] * 12, sig_name=list(LEADS),
                p_signal=np.clip(signals, -32, 32), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                baseline=[0] * 12, write_dir=str(folder))


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data, truth = tmp_path / "set", tmp_path / "truth"
    data.mkdir()
    truth.mkdir()
    names = ["rec1", "rec10", "rec2"]  # rec10-0.png must pair with rec10, not rec1
    for ident, (name, (image, signals)) in enumerate(zip(names, pages(3), strict=True)):
        behaviour = NO_GRID if name == "rec2" else 0
        Image.fromarray(marked(image, ident, behaviour)).save(data / f"{name}-0.png")
        write_reference(data, name, signals)
        np.save(truth / f"{ident}.npy", signals)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(data / "orphan.png")
    monkeypatch.setenv("CARDIOSCAN_FAKE_TRUTH", str(truth))
    monkeypatch.setenv("CARDIOSCAN_FAKE_SHIFT", str(SHIFT))
    return data


def test_pairs_by_longest_record_prefix(folder: Path) -> None:
    pairs = [(picture.name, record.name) for picture, record in pair_folder(folder)]
    assert pairs == [("rec1-0.png", "rec1"), ("rec10-0.png", "rec10"), ("rec2-0.png", "rec2")]


def test_figures_are_the_scorers(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    status = run_bench(str(folder), n=None, device="cpu", engine="auto", batch=1,
                       json_path=out, target=FAKE)
    assert status == 0
    figures = json.loads(out.read_text())

    truth = folder.parent / "truth"
    expected = []
    for ident, name in enumerate(["rec1", "rec10", "rec2"]):
        reference, fs = read_record(folder / name)
        if name == "rec2":  # the failed picture scores as an all-NaN prediction
            prediction = np.full_like(reference, np.nan)
        else:
            prediction = shifted(np.load(truth / f"{ident}.npy"), SHIFT)
        expected.append(score_image(prediction, reference, fs))
    want = aggregate(expected)

    assert figures["n_images"] == 3 and figures["failures"] == 1
    assert [i["name"] for i in figures["images"]] == ["rec1-0.png", "rec10-0.png", "rec2-0.png"]
    assert figures["images"][2]["error"] == "no ECG grid found"
    assert figures["kaggle_db"] == pytest.approx(want.kaggle_db, abs=1e-9)
    assert figures["challenge_db"] == pytest.approx(want.challenge_db, abs=1e-9)
    for lead in LEADS:
        assert figures["per_lead_db"][lead] == pytest.approx(want.per_lead_db[lead], abs=1e-9)
    for got, image in zip(figures["images"], expected, strict=True):
        assert got["ratio"] == pytest.approx(image.ratio, abs=1e-9)
    assert figures["peak_memory_mb"] > 10  # a Python process with numpy holds more than that
    assert figures["median_seconds_per_image"] >= 0
    assert figures["images_per_second"] > 0

    # the shift is forgiven: the two good pictures score far above the failed one
    assert figures["images"][0]["db"] > 15 and figures["images"][2]["db"] < 3

    table = capsys.readouterr().out
    assert "Kaggle dB" in table and f"{want.kaggle_db:.2f}" in table
    assert "Challenge dB" in table and f"{want.challenge_db:.2f}" in table
    assert "no ECG grid found" in table


def test_missing_set_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench(str(tmp_path / "nope"), json_path=None, target=FAKE) == 2
    assert "--set must be" in capsys.readouterr().err


def test_synthetic_set_runs(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("pipeline.synthetic")
    if not hasattr(synthetic, "synthetic_set"):
        pytest.skip("synthetic sets not available yet")
    out = tmp_path / "b.json"
    assert run_bench("synthetic-scan", n=2, json_path=out, target=FAKE) == 0
    figures = json.loads(out.read_text())
    assert figures["n_images"] == 2 and figures["failures"] == 0
    assert math.isfinite(figures["kaggle_db"])


def test_digitizer_that_cannot_load_fails_the_bench(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bench(str(folder), json_path=None, target="no_such_module:digitize") == 1
    assert "digitizer unavailable" in capsys.readouterr().err
