"""Learned stages of the digitizer: networks, weights, training data and training loop.

The registry below is what the digitizer asks: :func:`load_trace_model` returns ``None``
when no learned weights are present (so ``engine="auto"`` stays classic) or a
:class:`~pipeline.models.engine.LearnedEngine` whose ``predict(page_rgb, px_per_mm)``
gives the trace-probability map of :mod:`pipeline.traces`. :func:`available` is the
cheap check (touches no torch); :func:`load_engine` picks a device and caches.

Weights come from, in order: ``weights_dir`` (or the ``CARDIOSCAN_WEIGHTS_DIR``
environment variable), which may hold a CardioScan ``manifest.json`` or the seed's own
``stage2-00005810.checkpoint.pth``; else the weights shipped in ``pipeline/models/weights``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.models.engine import LearnedEngine
    from pipeline.models.unet import UNet

WEIGHTS_ENV = "CARDIOSCAN_WEIGHTS_DIR"
DEVICE_ENV = "CARDIOSCAN_DEVICE"
"""Device for :func:`load_trace_model` (the service setting ``device``); default ``auto``."""
WAVEFORM_MODEL = "waveform"
"""Name of the trace-map model in a manifest."""
_SHIPPED = Path(__file__).resolve().parent / "weights"
_MANIFEST = "manifest.json"
_SEED_STAGE2 = "stage2-00005810.checkpoint.pth"
SEED_FRAME_PX_PER_MM = (2.0 * 2200 / 279.4, 1700 / 215.9)
"""The seed's stage-2 input: a letter page at 200 dpi, stretched twice in x (4352 x 1696)."""

_cache: dict[tuple[str, str], LearnedEngine] = {}
_lock = threading.Lock()
_override: LearnedEngine | None = None


def _configured_dir(weights_dir: Path | str | None) -> Path | None:
    d = weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_ENV) or None
    return Path(d) if d is not None else None


def _has_waveform(manifest: Path) -> bool:
    import json

    try:
        return WAVEFORM_MODEL in json.loads(manifest.read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return False


def available(weights_dir: Path | str | None = None) -> bool:
    """Whether learned weights can be loaded (files present; checksums are checked later)."""
    if _override is not None:
        return True
    d = _configured_dir(weights_dir)
    if d is not None:
        return _has_waveform(d / _MANIFEST) or (d / _SEED_STAGE2).is_file()
    return _has_waveform(_SHIPPED / _MANIFEST)


def load_engine(device: str = "cpu", weights_dir: Path | str | None = None) -> LearnedEngine:
    """The learned trace engine on ``device`` ("cpu", "cuda", "cuda:1", "auto"); cached.

    Raises :class:`~pipeline.models.weights.WeightsError` when no weights are found or a
    file fails its checksum.
    """
    if _override is not None:
        return _override
    from pipeline.models.engine import resolve_device

    dev = resolve_device(device)
    d = _configured_dir(weights_dir)
    key = (str(dev), str(d) if d is not None else "")
    with _lock:
        if key not in _cache:
            _cache[key] = _build(dev, d)
        return _cache[key]


def _build(device: object, d: Path | None) -> LearnedEngine:
    import torch

    from pipeline.models.engine import Frame, LearnedEngine
    from pipeline.models.unet import SEED_STAGE2, UNet
    from pipeline.models.weights import WeightsError, load, load_into, read_seed_checkpoint

    assert isinstance(device, torch.device)
    if d is not None and not (d / _MANIFEST).is_file():
        seed = d / _SEED_STAGE2
        if not seed.is_file():
            raise WeightsError(f"{d} holds neither {_MANIFEST} nor {_SEED_STAGE2}")
        net = UNet(SEED_STAGE2)
        load_into(net, read_seed_checkpoint(seed))
        sx, sy = SEED_FRAME_PX_PER_MM
        frame = Frame(px_per_mm_x=sx, px_per_mm_y=sy, max_width=4352, max_height=1696)
        return LearnedEngine(net, "seed-stage2", frame, device, sigma_px=1.5,
                             meta={"source": str(seed)})
    manifest = (d if d is not None else _SHIPPED) / _MANIFEST
    if not manifest.is_file():
        raise WeightsError(f"no learned weights at {manifest.parent}")
    state, config, meta = load(manifest, WAVEFORM_MODEL)
    net = UNet(config)
    load_into(net, state, ignore=frozenset())
    frame = Frame(px_per_mm_x=float(meta.get("px_per_mm_x", Frame.px_per_mm_x)),
                  px_per_mm_y=float(meta.get("px_per_mm_y", Frame.px_per_mm_y)))
    return LearnedEngine(net, str(meta.get("name", "cardioscan-waveform")), frame, device,
                         sigma_px=float(meta.get("sigma_px", 1.0)), meta=meta)


def load_trace_model(device: str | None = None) -> LearnedEngine | None:
    """What :func:`pipeline.digitizer.digitize` asks for: the engine, or ``None`` when no
    learned weights are installed. Weights that fail their checksum raise."""
    if not available():
        return None
    return load_engine(device or os.environ.get(DEVICE_ENV) or "auto")


def load_seed_nets(weights_dir: Path | str) -> dict[str, UNet]:
    """Whichever of the seed's three checkpoints are in ``weights_dir``, loaded by key name."""
    from pipeline.models.unet import SEED_STAGE0, SEED_STAGE1, SEED_STAGE2, UNet
    from pipeline.models.weights import SEED_FILES, load_into, read_seed_checkpoint

    configs = {"stage0": SEED_STAGE0, "stage1": SEED_STAGE1, "stage2": SEED_STAGE2}
    nets: dict[str, UNet] = {}
    for stage, fname in SEED_FILES.items():
        path = Path(weights_dir) / fname
        if path.is_file():
            net = UNet(configs[stage])
            load_into(net, read_seed_checkpoint(path))
            nets[stage] = net.eval()
    return nets


@contextmanager
def override_engine(engine: LearnedEngine) -> Iterator[None]:
    """Make :func:`load_engine` return ``engine`` (training validates the net it trains)."""
    global _override
    previous, _override = _override, engine
    try:
        yield
    finally:
        _override = previous


def clear_cache() -> None:
    """Forget loaded engines (after new weights were written)."""
    with _lock:
        _cache.clear()
