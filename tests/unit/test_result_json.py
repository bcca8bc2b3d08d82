"""The result document: the seed API's shape, strict JSON, NaN as null."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image
from service_support import digitize

from adapters.result_json import to_response
from pipeline.leads import LEADS
from pipeline.result import Digitization, Metrics


def make_digitization() -> Digitization:
    image = np.zeros((300, 2000, 3), np.uint8)
    image[:, :, 0] = 255
    dig = digitize(image, fs=500)
    dig.qa_images = {"plot": image[:100, :200], "overlay": image, "extra_view": image[:50, :50]}
    dig.metrics = Metrics(hr_bpm=71.96, rr_ms=833.8, qt_ms=float("nan"))
    dig.confidence = {lead: 0.5 for lead in LEADS if lead != "V6"}
    return dig


def test_seed_shape_and_extras() -> None:
    dig = make_digitization()
    body = to_response(dig, job_id="job-1")
    for key in ("steps", "leads", "lead_boxes", "metrics", "sampling_hz"):
        assert key in body
    assert body["job_id"] == "job-1"
    assert list(body["leads"]) == list(LEADS)
    assert body["sampling_hz"] == 500 and isinstance(body["sampling_hz"], int)
    assert body["layout"] == "3x4+1"
    assert body["paper_speed_mm_s"] == 25.0 and body["gain_mm_mv"] == 10.0
    assert body["engine"] == "fake-auto"
    assert set(body["lead_boxes"]["I"]) == {"x1", "y1", "x2", "y2"}
    assert body["lead_boxes"]["I"]["x1"] == 0.1
    assert body["metrics"]["hr_bpm"] == 72.0
    assert body["metrics"]["qt_ms"] is None and body["metrics"]["pr_ms"] is None
    assert body["confidence"]["I"] == 0.5 and body["confidence"]["V6"] is None


def test_nan_becomes_null_and_json_is_strict() -> None:
    dig = make_digitization()
    text = json.dumps(to_response(dig), allow_nan=False)
    body = json.loads(text)
    v1 = body["leads"]["V1"]
    assert len(v1) == dig.signals.shape[0]
    assert v1[0] is None  # not printed in the first quarter
    assert v1[-1] == round(float(dig.signals[-1, LEADS.index("V1")]), 4)


def test_steps_are_jpeg_data_urls_in_a_stable_order() -> None:
    body = to_response(make_digitization())
    titles = [step["title"] for step in body["steps"]]
    assert len(titles) == 3
    assert titles[0].startswith("Extracted traces") and titles[-1] == "Extra view"
    for step in body["steps"]:
        prefix = "data:image/jpeg;base64,"
        assert step["image"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(step["image"][len(prefix):])))
        assert picture.format == "JPEG" and picture.width <= 1200
    overlay = Image.open(io.BytesIO(base64.b64decode(body["steps"][0]["image"].split(",")[1])))
    assert overlay.size == (1200, 180)


def test_cli_document_has_no_images() -> None:
    body = to_response(make_digitization(), include_images=False)
    assert body["steps"] == []
    assert body["job_id"] is None
    assert "data:image" not in json.dumps(body)
