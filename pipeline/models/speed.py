"""How fast the learned trace stage alone runs: rectified pages per second, batched.

``python -m pipeline.models.speed --device cuda --batch 16 --n 96 [--weights-dir DIR]``
prints one JSON line (and writes it to ``--json``). Without weights it times a randomly
initialised net of the shipped layout, which costs exactly the same. The whole digitizer's
figure comes from ``cardioscan bench``; this one isolates the network's share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.models.engine import Frame, LearnedEngine, resolve_device
from pipeline.models.unet import WAVEFORM, UNet

A4_GRID_PAGE = (1720, 2340)
"""A rectified A4 grid (plus margins) at 8 px/mm, as ``pipeline.grid.rectify`` returns it."""


def fake_page(rng: np.random.Generator, shape: tuple[int, int] = A4_GRID_PAGE) -> np.ndarray:
    """Paper with a grid and wiggly dark lines: content does not change the cost."""
    h, w = shape
    page = np.full((h, w, 3), 250, np.uint8)
    page[::8] = (240, 180, 180)
    page[:, ::8] = (240, 180, 180)
    xs = np.arange(w)
    for r in range(4):
        ys = (h * (r + 0.6) / 4.5 + 30 * np.sin(xs / 37.0 + r)).astype(int)
        for dy in range(3):
            page[np.clip(ys + dy, 0, h - 1), xs] = 20
    return page + rng.integers(0, 4, page.shape, dtype=np.uint8)


def measure(engine: LearnedEngine, n: int, batch: int, px_per_mm: float = 8.0
            ) -> dict[str, Any]:
    """Pages per second through ``predict_batch`` (resize, network, map back to the page)."""
    rng = np.random.default_rng(0)
    pages = [fake_page(rng) for _ in range(min(n, batch * 2))]
    engine.batch_size = batch
    engine.predict_batch(pages[:batch], [px_per_mm] * batch)  # warm-up, cudnn autotune
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    done = 0
    t0 = time.perf_counter()
    while done < n:
        chunk = [pages[(done + i) % len(pages)] for i in range(min(batch, n - done))]
        engine.predict_batch(chunk, [px_per_mm] * len(chunk))
        done += len(chunk)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"device": str(engine.device), "gpu": (torch.cuda.get_device_name(engine.device)
                                                  if engine.device.type == "cuda" else None),
            "batch": batch, "pages": n, "page_px": list(A4_GRID_PAGE), "bf16": engine.bf16,
            "seconds": round(seconds, 3), "pages_per_s": round(n / seconds, 2),
            "ms_per_page": round(1000 * seconds / n, 2), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--weights-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    if args.weights_dir is not None:
        from pipeline.models import load_engine

        engine = load_engine(str(dev), weights_dir=args.weights_dir)
    else:
        engine = LearnedEngine(UNet(WAVEFORM), "random (timing only)", Frame(), dev)
    result = measure(engine, args.n, args.batch)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
