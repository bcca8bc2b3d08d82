"""``cardioscan synth``: write synthetic pages with their ground truth, or a contact sheet."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.leads import LEADS, Layout
from pipeline.synthetic import (
    STYLES,
    TRAIN_WIDTH_PX,
    PageSpec,
    SyntheticPage,
    generate_page,
    generation_rate,
)
from pipeline.synthetic import contact_sheet as make_contact_sheet
from pipeline.synthetic.rate import MIN_WIDTH_PX
from pipeline.synthetic.spec import GRID_COLORS, random_spec

MIXED = "mixed"
WFDB_ADC_GAIN = 1000.0  # 1 uV per count, as in the PTB-XL derived records
SHEET_STYLES = ("clean",) * 6 + ("scan",) * 9 + ("photo",) * 9


def _sheet_specs(seed: int, n: int) -> Iterator[tuple[int, str, PageSpec]]:
    """Pages that between them show every layout, colour, grid style, speed and gain."""
    layouts = list(Layout)
    for i in range(n):
        style = SHEET_STYLES[i % len(SHEET_STYLES)]
        rng = np.random.default_rng([seed, i])
        spec = random_spec(rng, style)
        spec = dataclasses.replace(
            spec,
            layout=layouts[i % len(layouts)],
            grid_color=GRID_COLORS[i % len(GRID_COLORS)],
            grid_style="dotted" if i % 7 == 3 else "lines",
            paper_speed_mm_s=50.0 if i % 8 == 5 else 25.0,
            gain_mm_mv=(5.0, 10.0, 10.0, 20.0)[i % 4],
        )
        yield seed + i, style, spec


def _page_styles(style: str, n: int) -> list[str]:
    if style == MIXED:
        return [("clean", "scan", "photo")[i % 3] for i in range(n)]
    return [style] * n


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def page_record(page: SyntheticPage, name: str) -> dict[str, Any]:
    """The JSON ground truth of a page (everything except the per-sample arrays)."""
    gx0, gy0, gx1, gy1 = page.meta["grid_mm"]
    xs = np.arange(gx0, gx1 + 1e-6, 5.0)
    ys = np.arange(gy0, gy1 + 1e-6, 5.0)
    mm = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    px = page.paper_to_image(mm)
    return _json_ready({
        "name": name,
        "image": f"{name}.png",
        "record": name,
        "style": page.style,
        "width": page.image.shape[1],
        "height": page.image.shape[0],
        "layout": str(page.layout),
        "paper_speed_mm_s": page.paper_speed_mm_s,
        "gain_mm_mv": page.gain_mm_mv,
        "fs": page.fs,
        "seconds": page.seconds,
        "leads": list(LEADS),
        "px_per_mm": page.px_per_mm,
        "grid_origin_px": page.grid_origin_px,
        "paper_to_image": {
            "note": "image px of paper points on the 5 mm grid lattice (mm from paper top-left)",
            "paper_mm": mm, "image_px": px},
        "lead_boxes": page.lead_boxes,
        "pulse_boxes": page.pulse_boxes,
        "label_points": page.label_points,
        "spec": page.spec.to_dict(),
        "meta": page.meta,
    })


def write_page(page: SyntheticPage, out: Path, name: str) -> None:
    """DIR/<name>.png, .hea/.dat (WFDB, NaN kept), .json and .npz (paths and masks)."""
    import cv2
    import wfdb

    out.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out / f"{name}.png"), page.image[..., ::-1]):
        raise OSError(f"cannot write {out / name}.png")
    wfdb.wrsamp(name, fs=page.fs, units=["mV"] * 12, sig_name=list(LEADS),
                p_signal=page.signals, fmt=["16"] * 12, adc_gain=[WFDB_ADC_GAIN] * 12,
                baseline=[0] * 12, write_dir=str(out))
    (out / f"{name}.json").write_text(json.dumps(page_record(page, name)))
    arrays: dict[str, np.ndarray] = {"lead_mask": page.lead_mask, "grid_mask": page.grid_mask}
    arrays.update({f"path_{k}": v.astype(np.float32) for k, v in page.trace_paths.items()})
    arrays.update({f"time_{k}": v.astype(np.float32) for k, v in page.trace_times.items()})
    np.savez_compressed(out / f"{name}.npz", allow_pickle=False, **arrays)


def run_synth(contact_sheet: Path | None, out: Path | None, n: int, style: str, seed: int) -> int:
    """Entry point of ``cardioscan synth``; returns the exit code."""
    if style != MIXED and style not in STYLES:
        print(f"error: unknown style {style!r}; use mixed, {', '.join(STYLES)}", file=sys.stderr)
        return 2
    if contact_sheet is None and out is None:
        print("error: give --contact-sheet FILE.png and/or --out DIR", file=sys.stderr)
        return 2
    if n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    if contact_sheet is not None:
        import cv2

        if style == MIXED:
            pages = [generate_page(s, st, spec=sp, width_px=1600 if st == "photo" else None)
                     for s, st, sp in _sheet_specs(seed, n)]
        else:
            pages = [generate_page(seed + i, style) for i in range(n)]
        contact_sheet.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(contact_sheet), make_contact_sheet(pages)[..., ::-1]):
            print(f"error: cannot write {contact_sheet}", file=sys.stderr)
            return 1
        print(f"wrote {contact_sheet} ({len(pages)} pages)")
    if out is not None:
        for i, st in enumerate(_page_styles(style, n)):
            name = f"synth-{seed + i:06d}-{st}"
            write_page(generate_page(seed + i, st), out, name)
        print(f"wrote {n} pages to {out}")
    return 0


def run_speed(width: int | None, workers: int, n: int) -> int:
    """Entry point of ``cardioscan synth --speed``: a table of pages/s; returns the exit code."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    width_px = TRAIN_WIDTH_PX if width is None else width
    if n < 1 or workers < 1 or width_px < MIN_WIDTH_PX:
        print(f"error: --n and --workers must be at least 1, --width at least {MIN_WIDTH_PX}",
              file=sys.stderr)
        return 2
    with Progress(transient=True) as bar:
        task = bar.add_task(f"{n} pages per style, {width_px} px, {workers} processes",
                            total=len(STYLES))
        rate = generation_rate(width_px, workers, n, progress=lambda _: bar.advance(task))
    table = Table(title=f"Generation at {width_px} px wide, {workers} processes, {n} pages each")
    for style in (*STYLES, "training mix"):
        table.add_column(style, justify="right")
    table.add_row(*(f"{rate.per_style[s]:.1f} pages/s" for s in STYLES),
                  f"{rate.training_mix:.1f} pages/s")
    Console().print(table)
    return 0
