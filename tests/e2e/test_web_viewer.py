"""The web viewer in headless Chromium: upload a scanned page, see what was read.

``cardioscan serve`` runs as a real process with the real digitizer; Playwright drives the
Debian Chromium (no browser download), picks a synthetic scan in the file input, presses
Digitize and reads the page a person would look at.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from service_support import ServeProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESULT_TIMEOUT_MS = 180_000
PAGE_WIDTH_PX = 1200
"""A scan of about 100 dpi: read as well as a larger one, in a third of the time."""

if (importlib.util.find_spec("pipeline.digitizer") is None
        and not os.environ.get("CARDIOSCAN_ENGINE")):
    pytest.skip("pipeline.digitizer is not in this checkout", allow_module_level=True)


@pytest.fixture
def scan_png(tmp_path: Path) -> Path:
    from PIL import Image

    from pipeline.synthetic import generate_page

    path = tmp_path / "scan.png"
    buf = io.BytesIO()
    Image.fromarray(generate_page(3, "scan", width_px=PAGE_WIDTH_PX).image).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_upload_shows_leads_measurements_and_downloads(
    browser: Browser, serve_process: Callable[..., ServeProcess], scan_png: Path,
    tmp_path: Path,
) -> None:
    service_url = serve_process(engine=None, timeout=120, workers=1,
                                outputs='["json", "csv", "overlay"]',
                                dicom__enabled="false").url
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(service_url + "/")
    page.wait_for_selector("#health.ok")
    assert page.is_disabled("#submit")
    page.set_input_files("#file", str(scan_png))
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)

    summary = page.inner_text("#summary")
    assert "mm/s" in summary and "mm/mV" in summary
    assert page.locator("#confidence tbody tr").count() == 12
    hr = page.inner_text("#metrics tr[data-metric=hr_bpm] td:nth-child(2)")
    assert hr.strip() != ""
    links = page.locator("#downloads a")
    assert links.count() >= 4
    csv_href = page.locator("#downloads a", has_text="CSV").get_attribute("href")
    assert csv_href is not None
    csv = httpx.get(service_url + csv_href, timeout=10)
    assert csv.status_code == 200 and csv.text.count("\n") > 100
    # The canvas was drawn on: it holds more than the blank paper's few colours.
    ink = page.evaluate(
        """() => { const c = document.querySelector('#ecg');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let dark = 0; for (let i = 0; i < d.length; i += 4)
                     if (d[i] < 80 && d[i + 1] < 80 && d[i + 2] < 80) dark++;
                   return dark; }"""
    )
    assert ink > 2000
    page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length >= 1")
    assert "done" in page.inner_text("#jobs-table")
