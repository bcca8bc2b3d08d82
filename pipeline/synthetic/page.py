"""``generate_page``: one synthetic ECG page and its exact ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.leads import DEFAULT_FS, LEAD_INDEX, LEADS, Layout
from pipeline.synthetic.degrade import Degraded, degrade_photo, degrade_scan
from pipeline.synthetic.ecg_model import generate_ecg
from pipeline.synthetic.records import record_window
from pipeline.synthetic.render import header_lines, printed_mask, render_page
from pipeline.synthetic.spec import STYLES, PageSpec, random_spec
from pipeline.synthetic.warp import Homography, Warp

Box = tuple[float, float, float, float]
PHOTO_WIDTHS = (2000, 4000)
"""Width range (px) of photos when the caller does not fix ``width_px``."""
GRID_MASK_LEVEL = 64  # grid alpha (0..255) above which a pixel counts as grid ink


@dataclass
class PaperToImage:
    """Paper millimetres (k,2) -> image pixels (k,2), through the page's exact warp."""

    px_per_mm: float
    warp: Warp

    def __call__(self, mm: np.ndarray) -> np.ndarray:
        return self.warp.forward(np.asarray(mm, dtype=np.float64).reshape(-1, 2) * self.px_per_mm)


@dataclass
class SyntheticPage:
    """A page image with everything a digitizer should recover from it.

    ``trace_paths[lead]`` is the image position of every printed sample of the lead, in
    print order; ``trace_times[lead]`` gives each point's time (s) in the record. A lead
    printed twice (II in 3x4+1) lists both printings, one after the other.
    ``lead_boxes`` and ``label_points`` refer to a lead's first printing (the 12-lead grid);
    ``meta["segments"]`` lists every printing with its box.
    """

    image: np.ndarray
    signals: np.ndarray
    fs: int
    layout: Layout
    paper_speed_mm_s: float
    gain_mm_mv: float
    px_per_mm: float
    grid_origin_px: tuple[float, float]
    paper_to_image: PaperToImage
    trace_paths: dict[str, np.ndarray]
    lead_mask: np.ndarray
    lead_boxes: dict[str, Box]
    pulse_boxes: list[Box]
    label_points: dict[str, tuple[float, float]]
    style: str
    spec: PageSpec
    grid_mask: np.ndarray
    trace_times: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.signals.shape[0] / self.fs


def _bbox(points: np.ndarray) -> Box:
    return (float(points[:, 0].min()), float(points[:, 1].min()),
            float(points[:, 0].max()), float(points[:, 1].max()))


def _box_outline(box_mm: Box, k: int = 5) -> np.ndarray:
    """Points along the edges of a mm box, so a warped box's extent is found."""
    x0, y0, x1, y1 = box_mm
    t = np.linspace(0.0, 1.0, k)
    xs, ys = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
    return np.concatenate([np.stack([xs, np.full(k, y0)], 1), np.stack([xs, np.full(k, y1)], 1),
                           np.stack([np.full(k, x0), ys], 1), np.stack([np.full(k, x1), ys], 1)])


def _signals(spec: PageSpec, rng: np.random.Generator, n: int, printed: np.ndarray
             ) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {"signal_source": "model"}
    if spec.signal_source != "model":
        rec = record_window(rng, spec.signal_source, n / DEFAULT_FS, printed)
        if rec is not None:
            info["signal_source"] = spec.signal_source
            return np.where(printed, rec, 0.0), info
    sig, params = generate_ecg(rng, n / DEFAULT_FS, DEFAULT_FS)
    info.update(rhythm=params.rhythm, hr_bpm=round(params.hr_bpm, 1),
                axis_deg=round(params.axis_deg, 1), qrs_width=round(params.qrs_width, 2),
                beats=params.beats)
    return sig, info


def generate_page(seed: int, style: str = "scan", *, spec: PageSpec | None = None,
                  width_px: int | None = None) -> SyntheticPage:
    """Generate page ``seed`` in ``style`` ("clean", "scan" or "photo").

    The same seed gives the same page. ``spec`` fixes the page content (layout, speed,
    gain, grid...); ``width_px`` fixes the output width (for training at a fixed size),
    otherwise clean and scan pages use ``spec.dpi`` and photos are 2000-4000 px wide.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    spec_rng, sig_rng, render_rng, deg_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    if spec is None:
        spec = random_spec(spec_rng, style)
    fs = DEFAULT_FS
    n = round(spec.seconds * fs)
    printed = printed_mask(spec, n)
    full, sig_info = _signals(spec, sig_rng, n, printed)
    pw_mm = spec.paper_mm[0]
    if style == "photo":
        out_w = int(width_px) if width_px else int(deg_rng.integers(*PHOTO_WIDTHS))
        out_h = round(out_w * (0.75 if deg_rng.random() < 0.6 else 0.5625))
        ppm = 0.9 * out_w / pw_mm
    else:
        ppm = (width_px / pw_mm) if width_px else spec.dpi / 25.4
    hr = float(sig_info.get("hr_bpm", 70.0))
    rendered = render_page(spec, full, fs, ppm, render_rng, header_lines(render_rng, spec, hr))
    deg: Degraded
    if style == "clean":
        h, w = rendered.image.shape[:2]
        deg = Degraded(rendered.image, rendered.lead_mask, rendered.grid_alpha,
                       Warp((w, h), [Homography(np.eye(3))]))
    elif style == "scan":
        deg = degrade_scan(rendered, deg_rng)
    else:
        deg = degrade_photo(rendered, deg_rng, out_w, out_h)
    to_img = PaperToImage(ppm, deg.warp)
    geo = rendered.geometry

    # Every ground-truth point goes through the warp in one batch.
    chunks: list[np.ndarray] = []
    seg_t: list[np.ndarray] = []
    for seg in geo.segments:
        j = LEAD_INDEX[seg.lead]
        t = np.arange(seg.i0, seg.i1) / fs
        seg_t.append(t)
        chunks.append(np.stack([geo.trace_x0_mm + t * spec.paper_speed_mm_s,
                                seg.baseline_mm - full[seg.i0:seg.i1, j] * spec.gain_mm_mv], 1))
        chunks.append(_box_outline(seg.cell_mm))
        lb = seg.label_box_mm or seg.cell_mm
        chunks.append(np.array([[(lb[0] + lb[2]) / 2, (lb[1] + lb[3]) / 2]]))
    chunks.extend(_box_outline(b) for b in geo.pulse_boxes_mm)
    gx0, gy0, gx1, gy1 = geo.grid_mm
    cx, cy = (gx0 + gx1) / 2, (gy0 + gy1) / 2
    chunks.append(np.array([[gx0, gy0], [cx, cy], [cx + 10.0, cy], [cx, cy + 10.0]]))
    mapped = np.split(to_img(np.concatenate(chunks)), np.cumsum([len(c) for c in chunks])[:-1])

    paths: dict[str, list[np.ndarray]] = {lead: [] for lead in LEADS}
    times: dict[str, list[np.ndarray]] = {lead: [] for lead in LEADS}
    lead_boxes: dict[str, Box] = {}
    label_points: dict[str, tuple[float, float]] = {}
    segments = []
    for k, seg in enumerate(geo.segments):
        trace, outline, label = mapped[3 * k], mapped[3 * k + 1], mapped[3 * k + 2]
        paths[seg.lead].append(trace)
        times[seg.lead].append(seg_t[k])
        box = _bbox(outline)
        segments.append({"lead": seg.lead, "row": seg.row, "col": seg.col,
                         "t0": seg.i0 / fs, "t1": seg.i1 / fs, "box": box,
                         "baseline_mm": seg.baseline_mm, "x0_mm": seg.x0_mm,
                         "x1_mm": seg.x1_mm})
        if seg.lead not in lead_boxes:
            lead_boxes[seg.lead] = box
            label_points[seg.lead] = (float(label[0, 0]), float(label[0, 1]))
    n_seg = 3 * len(geo.segments)
    pulse_boxes = [_bbox(m) for m in mapped[n_seg:n_seg + len(geo.pulse_boxes_mm)]]
    probe = mapped[-1]
    origin = probe[0]
    px_per_mm = float((np.linalg.norm(probe[2] - probe[1]) + np.linalg.norm(probe[3] - probe[1]))
                      / 20.0)
    reference = np.where(printed, full, np.nan)
    meta: dict[str, Any] = {
        "seed": seed,
        "dpi": round(ppm * 25.4, 1),
        "render_px_per_mm": ppm,
        "paper_mm": list(spec.paper_mm),
        "grid_mm": [gx0, gy0, gx1, gy1],
        "trace_x0_mm": geo.trace_x0_mm,
        "baselines_mm": list(geo.baselines_mm),
        "pulse_paths_mm": [p.tolist() for p in geo.pulse_paths_mm()],
        "segments": segments,
        **sig_info,
        **rendered.meta,
        "degradations": deg.meta,
    }
    return SyntheticPage(
        image=deg.image,
        signals=reference,
        fs=fs,
        layout=spec.layout,
        paper_speed_mm_s=spec.paper_speed_mm_s,
        gain_mm_mv=spec.gain_mm_mv,
        px_per_mm=px_per_mm,
        grid_origin_px=(float(origin[0]), float(origin[1])),
        paper_to_image=to_img,
        trace_paths={k: np.concatenate(v) for k, v in paths.items() if v},
        lead_mask=deg.lead_mask,
        lead_boxes=lead_boxes,
        pulse_boxes=pulse_boxes,
        label_points=label_points,
        style=style,
        spec=spec,
        grid_mask=deg.grid_alpha > GRID_MASK_LEVEL,
        trace_times={k: np.concatenate(v) for k, v in times.items() if v},
        meta=meta,
    )
