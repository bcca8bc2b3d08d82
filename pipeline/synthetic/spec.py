"""What a synthetic page shows: layout, speed, gain, paper, grid, fonts, signal source.

A ``PageSpec`` fixes the page content; the degradations (scan, photo) are drawn separately
from the same seed. Callers that need a particular page (a digitizer test wanting
"6x2 at 50 mm/s, 5 mm/mV") build one with ``random_spec(...)`` and ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.leads import GAINS_MM_MV, PAPER_SPEEDS_MM_S, Layout

STYLES = ("clean", "scan", "photo")
GRID_COLORS = ("red", "pink", "orange", "green", "grey", "bw")
GRID_STYLES = ("lines", "dotted")
PAPERS_MM: dict[str, tuple[float, float]] = {"a4": (297.0, 210.0), "letter": (279.4, 215.9)}
SIGNAL_SOURCES = ("model", "dicom", "photos-dev")
TRACE_WIDTH_MM = 250.0
"""Printed width of a full-length strip: 10 s at 25 mm/s, 5 s at 50 mm/s."""
PULSE_SECONDS = 0.2
"""Width of the 1 mV calibration pulse."""
HERSHEY_FONTS = (0, 1, 2, 3, 4, 6, 7)  # cv2.FONT_HERSHEY_* faces that look like print


@dataclass(frozen=True)
class PageSpec:
    """Everything about the printed page that ground truth depends on."""

    layout: Layout = Layout.STANDARD
    paper_speed_mm_s: float = 25.0
    gain_mm_mv: float = 10.0
    dpi: float = 200.0
    paper: str = "a4"
    grid_color: str = "red"
    grid_style: str = "lines"
    signal_source: str = "model"
    trace_width_mm: float = 0.3
    font: int = 0
    label_height_mm: float = 3.0
    font_stroke_mm: float = 0.25  # pen width of label and header text
    header: bool = True
    footer: bool = True
    separators: bool = True

    @property
    def seconds(self) -> float:
        """Time span of the record printed on the page."""
        return TRACE_WIDTH_MM / self.paper_speed_mm_s

    @property
    def paper_mm(self) -> tuple[float, float]:
        return PAPERS_MM[self.paper]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layout"] = str(self.layout)
        return d


def _pick(rng: np.random.Generator, items: tuple[Any, ...], weights: list[float]) -> Any:
    w = np.asarray(weights, dtype=float)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def random_spec(rng: np.random.Generator, style: str = "scan", *,
                dev_records: bool = False) -> PageSpec:
    """Draw a page weighted toward the common 3x4+1, 25 mm/s, 10 mm/mV print.

    Signals come from the generator, sometimes from pydicom's example record; the
    ``../shared`` development records only with ``dev_records`` (never in the fixed sets,
    which must be the same on a fresh clone).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    layout = _pick(rng, tuple(Layout), [0.55, 0.1, 0.12, 0.13, 0.1])
    speed = _pick(rng, PAPER_SPEEDS_MM_S, [0.85, 0.15])
    gain = _pick(rng, GAINS_MM_MV, [0.12, 0.76, 0.12])
    if layout == Layout.TWELVE_BY_ONE and rng.random() < 0.6:
        gain = 5.0  # 12 strips on one page are usually printed at half gain
    dpi = float(rng.uniform(100, 600)) if style == "clean" else float(rng.uniform(150, 300))
    return PageSpec(
        layout=layout,
        paper_speed_mm_s=speed,
        gain_mm_mv=gain,
        dpi=round(dpi, 1),
        paper=_pick(rng, ("a4", "letter"), [0.7, 0.3]),
        grid_color=_pick(rng, GRID_COLORS, [0.3, 0.2, 0.1, 0.07, 0.15, 0.18]),
        grid_style=_pick(rng, GRID_STYLES, [0.85, 0.15]),
        signal_source=_pick(rng, SIGNAL_SOURCES, [0.82, 0.08, 0.1 if dev_records else 0.0]),
        trace_width_mm=round(float(rng.uniform(0.2, 0.5)), 3),
        font=int(rng.choice(HERSHEY_FONTS)),
        label_height_mm=round(float(rng.uniform(2.2, 4.0)), 2),
        font_stroke_mm=round(float(rng.uniform(0.12, 0.4)), 3),
        header=bool(rng.random() < 0.8),
        footer=bool(rng.random() < 0.6),
        separators=bool(rng.random() < 0.6),
    )
