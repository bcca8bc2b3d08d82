"""The 12 standard leads and the page layouts they are printed in.

Every module that names a lead or a layout takes it from here, so that the order of
the leads (I, II, III, aVR, aVL, aVF, V1..V6) is written down exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
LEAD_INDEX: dict[str, int] = {name: i for i, name in enumerate(LEADS)}

DEFAULT_FS = 500
"""Output sampling rate in Hz."""
PAGE_SECONDS = 10.0
"""Time span of the usual printed page."""
PAPER_SPEEDS_MM_S: tuple[float, ...] = (25.0, 50.0)
GAINS_MM_MV: tuple[float, ...] = (5.0, 10.0, 20.0)


class Layout(StrEnum):
    """How the 12 leads are arranged on the page."""

    STANDARD = "3x4+1"  # 3 rows x 4 columns plus a lead II rhythm strip
    THREE_BY_FOUR = "3x4"
    THREE_BY_FOUR_3R = "3x4+3"  # plus rhythm strips V1, II, V5
    SIX_BY_TWO = "6x2"
    TWELVE_BY_ONE = "12x1"


@dataclass(frozen=True)
class LayoutSpec:
    """Rows of the page, top to bottom; each row lists its leads left to right.

    A row with one lead is a full-width strip (a rhythm strip, or a 12x1 row).
    A lead in column ``c`` of a row with ``k`` columns covers the time span
    ``[c, c + 1) * seconds / k`` of the record, the convention of PTB-XL prints and
    of the PhysioNet image-digitization data.
    """

    layout: Layout
    rows: tuple[tuple[str, ...], ...]
    rhythm_rows: int  # how many of the last rows are rhythm strips

    @property
    def n_rows(self) -> int:
        return len(self.rows)


_GRID_3X4: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)

LAYOUTS: dict[Layout, LayoutSpec] = {
    Layout.STANDARD: LayoutSpec(Layout.STANDARD, (*_GRID_3X4, ("II",)), 1),
    Layout.THREE_BY_FOUR: LayoutSpec(Layout.THREE_BY_FOUR, _GRID_3X4, 0),
    Layout.THREE_BY_FOUR_3R: LayoutSpec(
        Layout.THREE_BY_FOUR_3R, (*_GRID_3X4, ("V1",), ("II",), ("V5",)), 3
    ),
    Layout.SIX_BY_TWO: LayoutSpec(
        Layout.SIX_BY_TWO,
        (("I", "V1"), ("II", "V2"), ("III", "V3"), ("aVR", "V4"), ("aVL", "V5"), ("aVF", "V6")),
        0,
    ),
    Layout.TWELVE_BY_ONE: LayoutSpec(Layout.TWELVE_BY_ONE, tuple((lead,) for lead in LEADS), 0),
}


def segment_span(n_columns: int, column: int, seconds: float = PAGE_SECONDS) -> tuple[float, float]:
    """Start and end time (s) that column ``column`` of a ``n_columns`` row prints."""
    width = seconds / n_columns
    return column * width, (column + 1) * width
