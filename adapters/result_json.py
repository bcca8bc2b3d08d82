"""The JSON result of one digitization: the seed API's response shape, plus what we read.

The same document is the REST response of ``POST /api/v1/digitize`` (with the QA pictures
as ``steps``) and the CLI's ``DIR/<stem>.json`` (without them), so a script written against
one reads the other. Keys of the seed's shape: ``steps``, ``leads``, ``lead_boxes``,
``metrics``, ``sampling_hz``. Missing samples and unmeasurable metrics are ``null``.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image

from pipeline.leads import LEADS
from pipeline.result import Digitization

SCHEMA = "cardioscan.result/1"
LEAD_DECIMALS = 4
"""mV rounded to 0.1 µV: far below what a printed trace can hold, and half the bytes."""
STEP_IMAGE_MAX_WIDTH = 1200
STEP_IMAGE_JPEG_QUALITY = 88

_STEPS: dict[str, tuple[str, str]] = {
    "overlay": (
        "Extracted traces over the rectified page",
        "The 12 digitized leads drawn in colour over the page after perspective and grid "
        "correction. Where the coloured line covers the printed trace, extraction is right.",
    ),
    "boxes": (
        "Lead boxes",
        "Where each lead was found on the rectified page, with its label.",
    ),
    "plot": (
        "Digitized 12-lead ECG",
        "The digitized signals re-plotted on ECG paper, to compare with the source.",
    ),
}


def _number(value: float | None, decimals: int | None = None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, decimals) if decimals is not None else value


def _lead_values(column: np.ndarray) -> list[float | None]:
    rounded = np.round(np.asarray(column, dtype=np.float64), LEAD_DECIMALS)
    return [float(v) if math.isfinite(v) else None for v in rounded.tolist()]


def image_data_url(image_rgb: np.ndarray, *, max_width: int = STEP_IMAGE_MAX_WIDTH) -> str:
    """An RGB picture as a ``data:image/jpeg;base64,...`` URL, at most ``max_width`` wide."""
    picture = Image.fromarray(np.ascontiguousarray(image_rgb, dtype=np.uint8)).convert("RGB")
    if picture.width > max_width:
        height = max(1, round(picture.height * max_width / picture.width))
        picture = picture.resize((max_width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=STEP_IMAGE_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _steps(dig: Digitization) -> list[dict[str, str]]:
    names = [k for k in _STEPS if k in dig.qa_images]
    names += sorted(k for k in dig.qa_images if k not in _STEPS)
    steps = []
    for name in names:
        title, description = _STEPS.get(name, (name.replace("_", " ").capitalize(), ""))
        steps.append(
            {"title": title, "description": description,
             "image": image_data_url(dig.qa_images[name])}
        )
    return steps


def to_response(
    dig: Digitization, *, job_id: str | None = None, include_images: bool = True
) -> dict[str, Any]:
    """The result document for ``dig``; JSON-serialisable with strict ``json.dumps``."""
    signals = np.asarray(dig.signals, dtype=np.float64)
    fs = float(dig.fs)
    return {
        "schema": SCHEMA,
        "job_id": job_id,
        "steps": _steps(dig) if include_images else [],
        "leads": {name: _lead_values(signals[:, i]) for i, name in enumerate(LEADS)},
        "lead_boxes": {
            name: {k: _number(v, 4) for k, v in asdict(box).items()}
            for name, box in dig.lead_boxes.items()
        },
        "metrics": {k: _number(v, 1) for k, v in asdict(dig.metrics).items()},
        "sampling_hz": int(fs) if fs.is_integer() else fs,
        "n_samples": int(signals.shape[0]),
        "duration_s": _number(dig.duration_s, 4),
        "units": "mV",
        "layout": str(dig.layout),
        "paper_speed_mm_s": _number(dig.paper_speed_mm_s),
        "gain_mm_mv": _number(dig.gain_mm_mv),
        "px_per_mm": _number(dig.px_per_mm, 3),
        "grid_confidence": _number(dig.grid_confidence, 3),
        "confidence": {name: _number(dig.confidence.get(name), 3) for name in LEADS},
        "engine": dig.engine,
        "warnings": list(dig.warnings),
        "stage_seconds": {k: _number(v, 3) for k, v in dig.stage_seconds.items()},
    }
