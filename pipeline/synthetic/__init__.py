"""Synthetic ECG pages with exact ground truth, for tests, benchmarks and training.

``generate_page(seed, style)`` draws a page (layout, speed, gain, grid, fonts, signals)
from the seed, prints it, and degrades it as a scan or phone photo; every geometric change
is applied to the ground truth through the same mapping as the pixels.
"""

from pipeline.synthetic.page import PaperToImage, SyntheticPage, generate_page
from pipeline.synthetic.rate import (
    TRAIN_STYLE_MIX,
    TRAIN_WIDTH_PX,
    TRAIN_WIDTHS_PX,
    GenerationRate,
    generation_rate,
)
from pipeline.synthetic.sets import SET_NAMES, contact_sheet, synthetic_set
from pipeline.synthetic.spec import STYLES, PageSpec, random_spec

__all__ = [
    "SET_NAMES",
    "STYLES",
    "TRAIN_STYLE_MIX",
    "TRAIN_WIDTHS_PX",
    "TRAIN_WIDTH_PX",
    "GenerationRate",
    "PageSpec",
    "PaperToImage",
    "SyntheticPage",
    "contact_sheet",
    "generate_page",
    "generation_rate",
    "random_spec",
    "synthetic_set",
]
