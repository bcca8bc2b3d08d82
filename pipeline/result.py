"""What the digitizer returns for one picture."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.leads import LEADS


@dataclass(frozen=True)
class Box:
    """A lead's box on the rectified page, as fractions of its width and height."""

    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Metrics:
    """Rhythm and interval measurements; ``None`` where they cannot be measured."""

    hr_bpm: float | None = None
    rr_ms: float | None = None
    pr_ms: float | None = None
    qrs_ms: float | None = None
    qt_ms: float | None = None
    qtc_bazett_ms: float | None = None
    qtc_fridericia_ms: float | None = None
    axis_deg: float | None = None


@dataclass
class Digitization:
    """12 calibrated leads plus everything the service reports about how they were read.

    ``signals`` has shape ``(n_samples, 12)`` in mV, columns in :data:`LEADS` order;
    a sample of a lead at a time the page does not print is NaN.
    """

    signals: np.ndarray
    fs: float
    layout: str
    paper_speed_mm_s: float
    gain_mm_mv: float
    px_per_mm: float
    grid_confidence: float
    confidence: dict[str, float]
    lead_boxes: dict[str, Box]
    metrics: Metrics
    engine: str
    qa_images: dict[str, np.ndarray] = field(default_factory=dict)
    """RGB uint8 pictures for a person to check: ``overlay``, ``boxes``, ``plot``."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def leads(self) -> dict[str, np.ndarray]:
        return {name: self.signals[:, i] for i, name in enumerate(LEADS)}

    @property
    def duration_s(self) -> float:
        return self.signals.shape[0] / self.fs
