"""The learned trace stage: rectified page in, trace-probability map out.

It plugs into the seam of :mod:`pipeline.traces`: the classic engine computes an ink map
from colour; this one predicts it with a U-Net, and everything downstream (layout,
pulses, path search, calibration) reads the map either way.

The network works in a fixed physical frame, not a fixed pixel size: the page is resized
to ``Frame.px_per_mm_x`` by ``Frame.px_per_mm_y`` (8 x 4 px/mm by default, so a 10 s row
at 25 mm/s is 2000 columns, 200 per second, and 1 mV at 10 mm/mV is 40 px) and padded
white to a multiple of 32. Time resolution matters more than amplitude resolution:
columns are where QRS slopes are sampled, while heights are read sub-pixel. From a
perfect map the sub-pixel series reach 23.7 dB (Kaggle) at 6 px/mm, 24.8 at 8 and 25.5
at 10 on synthetic photos; 8 keeps the CPU budget (about 1 s in bf16, 2.5 s in fp32 on
two cores for a whole A4 grid).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.models.unet import UNet

PAD_VALUE = 255
"""Padding is blank white paper, in training and at inference alike."""
CPU_BF16_ENV = "CARDIOSCAN_CPU_BF16"
"""``0`` turns off bf16 inference on CPUs that have native bf16 (AVX512-BF16 / AMX)."""


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions, where bf16 inference is about twice as fast."""
    if os.environ.get(CPU_BF16_ENV, "1") == "0":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Frame:
    """Where the network looks: physical scale of its input and the padding rule."""

    px_per_mm_x: float = 8.0
    px_per_mm_y: float = 4.0
    multiple: int = 32
    max_width: int = 2560
    max_height: int = 1536

    def size_for(self, shape_hw: tuple[int, int], px_per_mm: float) -> tuple[int, int]:
        """Working (width, height) for a page of ``shape_hw`` at ``px_per_mm``."""
        h, w = shape_hw
        ww = w * self.px_per_mm_x / px_per_mm
        hh = h * self.px_per_mm_y / px_per_mm
        s = min(1.0, self.max_width / ww, self.max_height / hh)
        return max(8, round(ww * s)), max(8, round(hh * s))

    def padded(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple


@dataclass(frozen=True)
class WorkMap:
    """A trace-probability map in the working frame and how it sits on the page.

    ``prob[y, x]`` covers page pixel ``((x + 0.5) / scale_x - 0.5, (y + 0.5) / scale_y
    - 0.5)``; ``page_shape`` is the page's (H, W).
    """

    prob: np.ndarray
    scale_x: float
    scale_y: float
    page_shape: tuple[int, int]

    def to_page(self) -> np.ndarray:
        """The map resampled onto the page's pixels, float32 in [0, 1]."""
        h, w = self.page_shape
        prob = np.ascontiguousarray(self.prob, dtype=np.float32)
        return np.clip(cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def to_working(image_rgb: np.ndarray, px_per_mm: float, frame: Frame
               ) -> tuple[np.ndarray, float, float]:
    """Resize a page into the working frame; returns the image and its x, y scales."""
    h, w = image_rgb.shape[:2]
    ww, wh = frame.size_for((h, w), px_per_mm)
    shrink = ww < w or wh < h
    img = cv2.resize(image_rgb, (ww, wh),
                     interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return img, ww / w, wh / h


def pad_batch(images: Sequence[np.ndarray], multiple: int) -> np.ndarray:
    """Stack RGB images top-left aligned on white canvases sized to the largest."""
    hh = -(-max(i.shape[0] for i in images) // multiple) * multiple
    ww = -(-max(i.shape[1] for i in images) // multiple) * multiple
    out = np.full((len(images), hh, ww, 3), PAD_VALUE, dtype=np.uint8)
    for k, img in enumerate(images):
        out[k, :img.shape[0], :img.shape[1]] = img
    return out


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present; a CUDA request without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available")
    return dev


@dataclass
class LearnedEngine:
    """A trained net plus the frame it was trained in; predicts trace-probability maps."""

    net: UNet
    name: str
    frame: Frame = field(default_factory=Frame)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sigma_px: float = 1.0
    """Half-width of the line in the map (the training targets' Gaussian sigma)."""
    head: str = "pixel"
    meta: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    bf16: bool | None = None
    """bf16 autocast: always on CUDA; on CPU where native (see :func:`cpu_has_bf16`)."""

    def __post_init__(self) -> None:
        self.net = self.net.to(self.device).eval()
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.bf16 is None:
            self.bf16 = self.device.type == "cuda" or cpu_has_bf16()

    @torch.inference_mode()
    def forward_uint8(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H', W') float32 probabilities (max over channels)."""
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(self.bf16)):
            logits = self.net(x)[self.head]
        prob = torch.sigmoid(logits.float()).amax(dim=1)
        s = self.net.output_stride
        if s > 1:
            prob = torch.nn.functional.interpolate(prob[:, None], scale_factor=s,
                                                   mode="bilinear", align_corners=False)[:, 0]
        return prob.cpu().numpy()

    def work_maps(self, images: Sequence[np.ndarray], px_per_mm: Sequence[float]
                  ) -> list[WorkMap]:
        """Working-frame maps for several pages, run ``batch_size`` at a time."""
        if len(images) != len(px_per_mm):
            raise ValueError("one px_per_mm per image is needed")
        out: list[WorkMap] = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            work = [to_working(img, ppm, self.frame)
                    for img, ppm in zip(chunk, px_per_mm[i:i + self.batch_size], strict=True)]
            probs = self.forward_uint8(pad_batch([w[0] for w in work], self.frame.multiple))
            for (img_w, sx, sy), prob, page in zip(work, probs, chunk, strict=True):
                out.append(WorkMap(prob[:img_w.shape[0], :img_w.shape[1]], sx, sy,
                                   (page.shape[0], page.shape[1])))
        return out

    def predict(self, image_rgb: np.ndarray, px_per_mm: float) -> np.ndarray:
        """Trace-probability map (H, W) float32 over the rectified page: the traces seam."""
        return self.work_maps([image_rgb], [px_per_mm])[0].to_page()

    def predict_batch(self, images: Sequence[np.ndarray], px_per_mm: Sequence[float]
                      ) -> list[np.ndarray]:
        """:meth:`predict` for several pages in batches (the GPU path)."""
        return [m.to_page() for m in self.work_maps(images, px_per_mm)]
