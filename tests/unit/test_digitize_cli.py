"""``cardioscan digitize``: one line per failed picture, the rest still written, exit status."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import wfdb
from PIL import Image
from service_support import CRASH, ENGINE, HANG, NO_GRID, SECONDS, UNPICKLABLE, marked
from typer.testing import CliRunner

from pipeline.leads import LEADS
from service import digitize_worker
from service.cli import app
from service.digitize_cli import run_digitize

FAKE = ENGINE


def save_png(path: Path, ident: int = 1, behaviour: int = 0) -> Path:
    image = marked(np.full((60, 80, 3), 250, np.uint8), ident, behaviour)
    Image.fromarray(image).save(path)
    return path


def save_pdf(path: Path, ident: int = 2) -> Path:
    # A PDF whose first page is our instruction picture (flat colours survive rendering).
    image = np.full((60, 80, 3), 250, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PDF", resolution=72)
    path.write_bytes(buffer.getvalue())
    return path


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_failed_pictures_get_one_line_and_the_rest_are_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = save_png(tmp_path / "good.png")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture\n")
    no_grid = save_png(tmp_path / "blank.png", behaviour=NO_GRID)
    missing = tmp_path / "missing.jpg"
    crash = save_png(tmp_path / "crash.png", behaviour=CRASH)
    pdf = save_pdf(tmp_path / "scan.pdf")
    odd = save_png(tmp_path / "odd.png", behaviour=UNPICKLABLE)
    out = tmp_path / "out"

    status = run_digitize([good, not_image, no_grid, missing, crash, pdf, odd], out, fs=250,
                          formats="wfdb,json,csv", timeout_s=30, target=FAKE)

    assert status == 1
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 5
    assert lines[0].startswith(f"{not_image}: unsupported file type")
    assert lines[1] == f"{no_grid}: no ECG grid found"
    assert lines[2].startswith(f"{missing}: cannot read file")
    assert lines[3] == f"{crash}: digitizer process died (exit code 3)"
    assert lines[4].startswith(f"{odd}: internal error: result cannot be passed back")

    # the good picture, and the PDF after the crash (a fresh child), are complete records
    for stem in ("good", "scan"):
        record = wfdb.rdrecord(str(out / stem))
        assert record.sig_name == list(LEADS)
        assert record.fs == 250 and record.sig_len == SECONDS * 250
        assert np.isnan(record.p_signal[:100, LEADS.index("V1")]).all()
        assert np.isfinite(record.p_signal[:, LEADS.index("II")]).all()
        body = json.loads((out / f"{stem}.json").read_text())
        assert body["layout"] == "3x4+1" and body["steps"] == []
        assert body["leads"]["V1"][0] is None
        assert (out / f"{stem}.csv").exists()
    assert not (out / "blank.hea").exists()


def test_a_hung_picture_is_killed_at_the_time_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hung = save_png(tmp_path / "hung.png", behaviour=HANG)
    after = save_png(tmp_path / "after.png")
    status = run_digitize([hung, after], tmp_path / "out", fs=500, formats="wfdb",
                          timeout_s=1, target=FAKE)
    assert status == 1
    assert stderr_lines(capsys.readouterr().err) == [f"{hung}: timed out after 1 s"]
    assert wfdb.rdrecord(str(tmp_path / "out" / "after")).sig_len == SECONDS * 500
    assert not (tmp_path / "out" / "after.json").exists()  # only the formats asked for


def test_unknown_digitizer_fails_every_picture_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [save_png(tmp_path / f"p{i}.png") for i in range(3)]
    status = run_digitize(images, tmp_path / "out", target="no_such_module:digitize")
    assert status == 1
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 3
    assert all("digitizer unavailable: ModuleNotFoundError" in line for line in lines)


def test_same_output_name_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = save_png(tmp_path / "a.png")
    (tmp_path / "b").mkdir()
    second = save_png(tmp_path / "b" / "a.png")
    assert run_digitize([first, second], tmp_path / "out", target=FAKE) == 1
    assert stderr_lines(capsys.readouterr().err) == [
        f"{second}: output name 'a' is already taken by {first}"
    ]


def test_cli_contract_through_typer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digitize_worker, "DEFAULT_TARGET", FAKE)
    good = save_png(tmp_path / "ecg.png")
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["digitize", str(good), str(bad), "--out", str(out)])
    assert result.exit_code == 1
    assert f"{bad}: empty file (0 bytes)" in result.output
    assert (out / "ecg.hea").exists() and (out / "ecg.json").exists()
    assert not (out / "ecg.csv").exists()  # default --format is wfdb,json

    usage = CliRunner().invoke(app, ["digitize", str(good), "--out", str(out), "--format", "xml"])
    assert usage.exit_code == 2
    assert "unknown format 'xml'" in usage.output


def test_real_digitizer_on_a_synthetic_page(tmp_path: Path) -> None:
    pytest.importorskip("pipeline.digitizer")
    synthetic = pytest.importorskip("pipeline.synthetic")
    if not hasattr(synthetic, "generate_page"):
        pytest.skip("synthetic pages not available yet")
    page = synthetic.generate_page(3, "clean", width_px=1200)  # ~100 dpi: quick to read
    picture = tmp_path / "synthetic.png"
    Image.fromarray(page.image).save(picture)
    status = run_digitize([picture], tmp_path / "out", fs=500, timeout_s=120)
    assert status == 0
    record = wfdb.rdrecord(str(tmp_path / "out" / "synthetic"))
    assert record.sig_name == list(LEADS)
    assert record.fs == 500
    assert np.isfinite(record.p_signal).any(axis=0).sum() >= 6
