"""The web viewer against a server that asks for API keys, in headless Chromium.

``cardioscan serve`` runs with ``http.api_keys`` and the stand-in digitizer (this is about
the key, not the reading): without a key the page says one is needed; with the key typed
into the page's field, uploads, the job list and downloads work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from service_support import ServeProcess, page_png

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.e2e]

KEY = "viewer-key-0123456789abcdef"


def test_the_viewer_sends_the_key_typed_into_it(
    browser: Browser, serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    service = serve_process(workers=1, outputs='["json", "csv"]', dicom__enabled="false",
                            http__api_keys=json.dumps([{"name": "ward-pc", "key": KEY}]))
    picture = tmp_path / "ecg.png"
    picture.write_bytes(page_png(7))
    page = browser.new_page()
    page.goto(service.url + "/")
    page.wait_for_selector("#health.ok")
    page.set_input_files("#file", str(picture))
    page.click("#submit")
    page.wait_for_selector("#message.error")
    assert "API key" in page.inner_text("#message")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    assert page.evaluate("sessionStorage.getItem('cardioscan.apiKey')") == KEY
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_function("document.querySelectorAll('#jobs-table tbody tr').length >= 1")
    assert "done" in page.inner_text("#jobs-table")
    with page.expect_download() as download:
        page.click("#downloads a:has-text('CSV')")
    csv = Path(download.value.path()).read_text()
    assert csv.count("\n") > 100

    page.reload()  # the key survives a reload of the tab, in sessionStorage only
    assert page.input_value("#api-key") == KEY
    assert page.evaluate("localStorage.length") == 0

    assert service.stop() == 0
    assert KEY not in service.log.read_text()  # never logged
