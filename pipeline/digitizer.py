"""``digitize``: one ECG picture -> 12 calibrated leads, as a chain of swappable stages.

Stages and what each hands the next (all on the rectified page):

1-2. :func:`pipeline.grid.rectify` -> ``RectifiedPage`` (axis-aligned grid, uniform
     ``px_per_mm``); raises :class:`~pipeline.errors.NoGridError`.
  *  **trace probability** (H, W) in [0, 1]: the engine seam. ``classic`` computes it
     from colour and morphology (:func:`pipeline.traces.ink_probability`); ``learned``
     asks ``pipeline.models.load_trace_model()`` for a model with
     ``predict(image_rgb, px_per_mm) -> (H, W) float32`` (``None`` when no weights are
     installed). ``auto`` uses the model when there is one, else ``classic``.
3.   :func:`pipeline.layout.detect_layout` -> ``PageLayout`` (rows, leads, pulses, paper
     speed, gain, time axis).
4.   :func:`pipeline.traces.extract` -> one ``RowTrace`` (sub-pixel centre line) per row.
5.   :func:`pipeline.calibration.to_signals` -> (n, 12) mV at ``fs`` + per-lead trust.
  *  :func:`pipeline.metrics.measure` -> HR, intervals, axis.
6.   :func:`pipeline.qa.qa_images` -> overlay, boxes, plot.

Every failure is a :class:`~pipeline.errors.DigitizationError` with a one-line reason; an
unexpected exception inside a stage is logged with its traceback and re-raised as one, so
a caller (CLI, worker) never sees anything else. A cooperative deadline is checked
between stages and between rows, so a pathological picture ends in
:class:`~pipeline.errors.DigitizationTimeout` instead of hanging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from pipeline import calibration, layout, metrics, traces
from pipeline import qa as qa_stage
from pipeline.errors import DigitizationError, DigitizationTimeout, UnreadableImageError
from pipeline.leads import DEFAULT_FS, LAYOUTS, LEADS
from pipeline.result import Box, Digitization

log = logging.getLogger(__name__)

ENGINES = ("auto", "classic", "learned")
DEFAULT_TIME_LIMIT_S = 60.0
"""Per-image limit unless the caller sets one."""
MIN_SIDE_PX = 200
MAX_PIXELS = 120_000_000
FS_RANGE = (50, 2000)


class TraceModel(Protocol):
    """What a learned engine provides: the trace-probability map of a rectified page."""

    def predict(self, image_rgb: np.ndarray, px_per_mm: float) -> np.ndarray: ...


def _load_trace_model() -> TraceModel | None:
    """The installed learned model, or ``None`` (no ``pipeline.models`` loader/weights)."""
    try:
        from pipeline import models
    except ImportError:
        return None
    loader: Callable[[], Any] | None = getattr(models, "load_trace_model", None)
    if loader is None:
        return None
    model = loader()
    return model if model is not None else None


class _Clock:
    """Stage timings and the cooperative deadline."""

    def __init__(self, limit_s: float | None) -> None:
        self.start = time.perf_counter()
        self.limit = limit_s
        self.seconds: dict[str, float] = {}
        self.stage = "start"

    def check(self) -> None:
        if self.limit is not None and time.perf_counter() - self.start > self.limit:
            raise DigitizationTimeout(
                f"digitization took longer than {self.limit:g} s (during {self.stage})")

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.check()
        self.stage = stage
        t = time.perf_counter()
        try:
            yield
        except DigitizationError:
            raise
        except MemoryError as e:
            raise DigitizationError(f"out of memory during {stage}") from e
        except Exception as e:
            log.exception("digitizer stage %s failed", stage)
            raise DigitizationError(
                f"internal error during {stage}: {type(e).__name__}: {e}") from e
        finally:
            self.seconds[stage] = round(time.perf_counter() - t, 4)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate the picture and return it as contiguous RGB uint8."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        raise UnreadableImageError("not an image array (expected H x W x 3 RGB)")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise UnreadableImageError(f"unexpected number of channels: {image.shape[2]}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE_PX:
        raise UnreadableImageError(f"image too small to read ({w}x{h} px)")
    if h * w > MAX_PIXELS:
        raise UnreadableImageError(f"image too large ({w}x{h} px)")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and float(np.nanmax(image)) <= 1.0:
            image = np.nan_to_num(image * 255.0)
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def _oriented_layout(prob: np.ndarray, ppm: float, thickness: float
                     ) -> tuple[layout.PageLayout, int]:
    """The layout and the quarter turns (counter-clockwise) that make the page readable.

    The grid stage picks the orientation from the ink; when its pick shows no readable
    rows, or rows without a calibration pulse, the half turn and then the quarter turns
    are tried, and the first orientation whose rows start with pulses is kept.
    """
    first: layout.PageLayout | None = None
    error: DigitizationError | None = None
    try:
        first = layout.detect_layout(prob, ppm, thickness)
        if first.pulses:
            return first, 0
    except DigitizationError as e:
        error = e
    for turns in (2, 1, 3):
        try:
            cand = layout.detect_layout(np.ascontiguousarray(np.rot90(prob, turns)), ppm,
                                        thickness)
        except DigitizationError:
            continue
        if cand.pulses:
            return cand, turns
    if first is not None:
        return first, 0
    assert error is not None
    raise error


def _lead_boxes(page: layout.PageLayout, shape: tuple[int, ...]) -> dict[str, Box]:
    """Each lead's first printing, as fractions of the rectified page."""
    h, w = shape[:2]
    out: dict[str, Box] = {}
    for r, row in enumerate(page.rows):
        for c, lead in enumerate(row.leads):
            if lead in out:
                continue
            x0, y0, x1, y1 = page.segment_box(r, c)
            out[lead] = Box(round(max(0.0, x0 / w), 4), round(max(0.0, y0 / h), 4),
                            round(min(1.0, x1 / w), 4), round(min(1.0, y1 / h), 4))
    return out


def digitize(image_rgb: np.ndarray, *, fs: int = DEFAULT_FS, engine: str = "auto",
             qa: bool = True, time_limit_s: float | None = DEFAULT_TIME_LIMIT_S
             ) -> Digitization:
    """Digitize one ECG picture (RGB uint8) into 12 leads at ``fs`` Hz.

    Raises a :class:`~pipeline.errors.DigitizationError` subclass with the reason when
    the picture cannot be read (no grid, no layout, unreadable, too slow).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if not FS_RANGE[0] <= fs <= FS_RANGE[1]:
        raise ValueError(f"fs must be within {FS_RANGE[0]}-{FS_RANGE[1]} Hz, got {fs}")
    clock = _Clock(time_limit_s)
    image = _as_rgb(image_rgb)
    from pipeline import grid  # the geometry stages are heavy to import; keep CLI help fast

    with clock("rectify"):
        rect = grid.rectify(image)
    ppm = float(rect.px_per_mm)

    model = None
    if engine in ("auto", "learned"):
        with clock("load_model"):
            model = _load_trace_model()
        if model is None and engine == "learned":
            raise DigitizationError("no learned weights installed")
    used = "learned" if model is not None else "classic"
    with clock("trace_probability"):
        if model is not None:
            prob = np.clip(np.asarray(model.predict(rect.image, ppm), np.float32), 0.0, 1.0)
            if prob.shape != rect.image.shape[:2]:
                raise DigitizationError("learned model returned a map of the wrong size")
        else:
            prob = traces.ink_probability(rect.image, ppm)
        thickness = traces.trace_thickness(prob, ppm)
    with clock("layout"):
        page, turns = _oriented_layout(prob, ppm, thickness)
    if turns:
        prob = np.ascontiguousarray(np.rot90(prob, turns))
        page_image = np.ascontiguousarray(np.rot90(rect.image, turns))
    else:
        page_image = rect.image
    with clock("traces"):
        rows = traces.extract(prob, page.row_specs(), ppm, thickness, check=clock.check)
        page = layout.relabel_six_rows(page, rows)
    with clock("calibration"):
        leads = calibration.to_signals(page, rows, fs)
    if not any(np.isfinite(leads.signals[:, j]).any() for j in range(len(LEADS))):
        raise DigitizationError("no lead could be read from the traces")
    with clock("metrics"):
        measured = metrics.measure(leads.signals, fs)
    images: dict[str, np.ndarray] = {}
    if qa:
        with clock("qa"):
            images = qa_stage.qa_images(page_image, page, rows, leads.signals, fs)
    factor = page.confidence * (0.5 + 0.5 * float(rect.grid_confidence))
    confidence = {k: round(v * factor, 3) for k, v in leads.confidence.items()}
    for k in LEADS:
        confidence.setdefault(k, 0.0)
    return Digitization(
        signals=leads.signals,
        fs=float(fs),
        layout=str(LAYOUTS[page.layout].layout),
        paper_speed_mm_s=page.paper_speed_mm_s,
        gain_mm_mv=page.gain_mm_mv,
        px_per_mm=ppm,
        grid_confidence=float(rect.grid_confidence),
        confidence=confidence,
        lead_boxes=_lead_boxes(page, page_image.shape),
        metrics=measured,
        engine=used,
        qa_images=images,
        stage_seconds={**{f"grid.{k}": round(v, 4) for k, v in rect.seconds.items()},
                       **clock.seconds},
        warnings=[*page.warnings, *leads.warnings],
    )
