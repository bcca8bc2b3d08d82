"""How fast pages are generated: the figure that decides how many CPU cores training needs.

Each worker process runs OpenCV on one thread (:func:`init_generator_worker`, which the
training data loader's workers call too), so the rate scales with processes rather than
fighting over cores.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.synthetic.page import generate_page
from pipeline.synthetic.spec import STYLES

TRAIN_STYLE_MIX: tuple[tuple[str, float], ...] = (("photo", 0.6), ("scan", 0.3), ("clean", 0.1))
"""Share of each style in the learned engine's training pages."""
TRAIN_WIDTHS_PX = (1600, 2600)
"""Range of the training pictures' width (photos) or page width (scans, clean pages)."""
TRAIN_WIDTH_PX = sum(TRAIN_WIDTHS_PX) // 2
"""The middle of that range: the width at which the generation rate is stated."""
MIN_WIDTH_PX = 64
"""Narrowest page the rate is measured at."""
RATE_SEED_BASE = 4_000_000
"""Seeds of the pages timed; apart from the bench (1e6, 2e6), validation (3e6) and training."""


@dataclass(frozen=True)
class GenerationRate:
    """Pages per second for each style, and for the training mix."""

    width_px: int
    workers: int
    pages_per_style: int
    per_style: dict[str, float]

    @property
    def training_mix(self) -> float:
        """Pages/s of the training style mix (each style's time, weighted by its share)."""
        share = dict(TRAIN_STYLE_MIX)
        return 1.0 / sum(share[s] / r for s, r in self.per_style.items() if s in share)


def init_generator_worker() -> None:
    """Run OpenCV on one thread in a page-generating worker process (one core each)."""
    import cv2

    cv2.setNumThreads(1)


def _generate(job: tuple[int, str, int]) -> None:
    seed, style, width = job
    generate_page(seed, style, width_px=width)


def generation_rate(width_px: int = TRAIN_WIDTH_PX, workers: int = 2, n: int = 60,
                    progress: Callable[[str], None] | None = None) -> GenerationRate:
    """Time ``n`` pages of each style at ``width_px`` on ``workers`` processes."""
    if n < 1 or workers < 1 or width_px < MIN_WIDTH_PX:
        raise ValueError(f"need n >= 1, workers >= 1 and width_px >= {MIN_WIDTH_PX}")
    rates: dict[str, float] = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_generator_worker) as pool:
        pool.map(_generate, [(RATE_SEED_BASE - 1, "photo", width_px)] * workers)  # warm up
        for k, style in enumerate(STYLES):
            jobs = [(RATE_SEED_BASE + k * n + i, style, width_px) for i in range(n)]
            t0 = time.perf_counter()
            pool.map(_generate, jobs, chunksize=1)
            rates[style] = n / (time.perf_counter() - t0)
            if progress is not None:
                progress(style)
    return GenerationRate(width_px, workers, n, rates)
