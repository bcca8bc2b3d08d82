"""The fixed, seeded page sets used by ``cardioscan bench``, and contact sheets."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import cv2
import numpy as np

from pipeline.synthetic.page import SyntheticPage, generate_page

SET_SIZE = 50
_SETS: dict[str, tuple[str, int]] = {
    "synthetic-scan": ("scan", 1_000_000),
    "synthetic-photo": ("photo", 2_000_000),
}
SET_NAMES = tuple(_SETS)


def synthetic_set(name: str, n: int | None = None) -> Iterator[SyntheticPage]:
    """Yield the ``n`` (default 50) fixed pages of set ``name``; identical on every machine."""
    if name not in _SETS:
        raise ValueError(f"unknown synthetic set {name!r}; expected one of {', '.join(_SETS)}")
    style, base = _SETS[name]
    for i in range(SET_SIZE if n is None else n):
        yield generate_page(base + i, style)


def _caption(page: SyntheticPage) -> str:
    d = page.meta.get("degradations", {})
    return (f"{page.style} {page.layout} {page.paper_speed_mm_s:g}mm/s {page.gain_mm_mv:g}mm/mV "
            f"{page.spec.grid_color}{' dot' if page.spec.grid_style == 'dotted' else ''}"
            f"{' rot' + str(round(d['rotation_deg'])) if 'rotation_deg' in d else ''}")


def contact_sheet(pages: Iterable[SyntheticPage], cols: int = 6, tile_w: int = 480
                  ) -> np.ndarray:
    """Thumbnails of ``pages`` in a grid with a one-line caption each (RGB uint8)."""
    tiles = []
    tile_h = round(tile_w * 0.75)
    for page in pages:
        img = page.image
        s = min(tile_w / img.shape[1], (tile_h - 18) / img.shape[0])
        thumb = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                           interpolation=cv2.INTER_AREA)
        tile = np.full((tile_h, tile_w, 3), 255, np.uint8)
        tile[18:18 + thumb.shape[0], :thumb.shape[1]] = thumb
        cv2.putText(tile, _caption(page), (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                    cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        raise ValueError("no pages for the contact sheet")
    while len(tiles) % cols:
        tiles.append(np.full((tile_h, tile_w, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
    return np.vstack(rows)
