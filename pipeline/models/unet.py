"""A timm ResNet encoder with a U-Net decoder whose blocks see where they are (CoordConv).

The module and parameter names follow the seed's networks (hengck23's PhysioNet
solution, see ``/work/shared/reference``): ``encoder.*`` is a plain timm ResNet,
``decoder.center`` / ``decoder.block.<i>.conv1.{0,1}`` / ``conv2.{0,1}`` the decoder, and
the 1x1 heads sit at the top level under their own names (``pixel``, ``marker``,
``gridpoint`` ...). One class with a :class:`UNetConfig` therefore builds CardioScan's
own waveform net and the seed's three architectures, so that a user's seed checkpoints
load by name.

Why CoordConv: a translation-invariant convolution cannot tell the rows of a page apart;
two channels of normalised x and y (``linspace(-2, 2)``, the seed's choice) concatenated
before each decoder block's first convolution give it the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import timm
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COORD_RANGE = 2.0
"""Decoder coordinate maps run from ``-COORD_RANGE`` to ``+COORD_RANGE`` (the seed's)."""
SEED_BUFFERS = frozenset({"D", "mean", "std"})
"""Top-level buffers in the seed's checkpoints that carry no learned state."""


@dataclass(frozen=True)
class UNetConfig:
    """Everything that decides the state-dict layout and the output of a :class:`UNet`."""

    arch: str = "resnet18"
    """A timm ResNet name; never downloaded (``pretrained=False``)."""
    maxpool: bool = True
    """Keep the ResNet's stem max-pool; the seed drops it (costlier, finer features)."""
    decoder_dims: tuple[int, ...] = (128, 64, 32, 16, 16)
    heads: tuple[tuple[str, int], ...] = (("pixel", 1),)
    """Per-pixel 1x1 heads, ``(attribute name, channels)``."""
    coord_decoder: bool = True
    """Concatenate x, y coordinate maps before each decoder block (CoordConv)."""
    head_coord: bool = True
    """Concatenate a y map in ``[-1, 1]`` before the heads (the seed's stage 2)."""
    orientation_classes: int = 0
    """Image-level classes from the pooled deepest feature (seed stage 0: 8)."""


WAVEFORM = UNetConfig()
"""CardioScan's waveform net: ResNet18 with its max-pool, a slim 5-block decoder back to
full resolution, one trace-probability channel. A whole A4 grid
in the 8 x 4 px/mm frame (2272 x 800): 200 GFLOP, against 6.3 TFLOP for the seed's Net3
at its 4352 x 1696 input."""

SEED_STAGE0 = UNetConfig(
    arch="resnet18d", maxpool=False, decoder_dims=(256, 128, 64, 32),
    heads=(("marker", 14),), coord_decoder=False, head_coord=False, orientation_classes=8,
)
SEED_STAGE1 = UNetConfig(
    arch="resnet34", maxpool=False, decoder_dims=(256, 128, 64, 32),
    heads=(("gridpoint", 1), ("gridhline", 45), ("gridvline", 58), ("marker", 14)),
    coord_decoder=False, head_coord=False,
)
SEED_STAGE2 = UNetConfig(
    arch="resnet34", maxpool=False, decoder_dims=(256, 128, 64, 32),
    heads=(("pixel", 4),), coord_decoder=True, head_coord=True,
)
"""The seed's Net3: 4 row-probability maps at the input resolution."""


def coord_maps(b: int, h: int, w: int, like: torch.Tensor, span: float) -> torch.Tensor:
    """``(b, 2, h, w)``: x then y, each ``linspace(-span, span)``."""
    xs = torch.linspace(-span, span, w, dtype=like.dtype, device=like.device)
    ys = torch.linspace(-span, span, h, dtype=like.dtype, device=like.device)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return grid.unsqueeze(0).expand(b, 2, h, w)


class DecoderBlock(nn.Module):
    """Upsample, join the skip, add coordinates, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, *, coord: bool,
                 scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.coord = coord
        extra = 2 if coord else 0
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_ch + skip_ch + extra, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self.attention1 = nn.Identity()
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self.attention2 = nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = self.attention1(torch.cat([x, skip], dim=1))
        else:
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        if self.coord:
            b, _, h, w = x.shape
            x = torch.cat([x, coord_maps(b, h, w, x, COORD_RANGE)], dim=1)
        return self.attention2(self.conv2(self.conv1(x)))


class UNetDecoder(nn.Module):
    """The seed's ``MyCoordUnetDecoder`` layout: ``center`` then ``block.<i>``."""

    def __init__(self, in_ch: int, skip_chs: list[int], out_chs: tuple[int, ...], *,
                 coord: bool) -> None:
        super().__init__()
        self.center = nn.Identity()
        ins = [in_ch, *out_chs[:-1]]
        self.block = nn.ModuleList(
            DecoderBlock(i, s, o, coord=coord) for i, s, o in zip(ins, skip_chs, out_chs,
                                                                   strict=True)
        )

    def forward(self, feature: torch.Tensor,
                skips: list[torch.Tensor | None]) -> torch.Tensor:
        d = self.center(feature)
        for block, skip in zip(self.block, skips, strict=True):
            d = block(d, skip)
        return d


class UNet(nn.Module):
    """Encoder-decoder returning ``{head name: logits}`` (and ``orientation`` logits).

    Input: RGB float in ``[0, 1]``, ``(B, 3, H, W)``, H and W multiples of
    :attr:`input_multiple`. Output maps have size ``(H, W) // output_stride``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: UNetConfig = WAVEFORM) -> None:
        super().__init__()
        self.config = config
        self.encoder = timm.create_model(
            config.arch, pretrained=False, in_chans=3, num_classes=0, global_pool=""
        )
        info = cast(list[dict[str, Any]], self.encoder.feature_info)  # act1, layer1..4
        chans = [int(f["num_chs"]) for f in info]
        reductions = [int(f["reduction"]) for f in info]
        if config.maxpool:
            self._taps = ["act1", "layer1", "layer2", "layer3", "layer4"]
            tap_chs = chans
            deepest = reductions[-1]
        else:
            self._taps = ["layer1", "layer2", "layer3", "layer4"]
            tap_chs = chans[1:]
            deepest = reductions[-1] // 2
        n_blocks = len(config.decoder_dims)
        skip_chs = (tap_chs[:-1][::-1] + [0] * n_blocks)[:n_blocks]
        self.decoder = UNetDecoder(tap_chs[-1], skip_chs, config.decoder_dims,
                                   coord=config.coord_decoder)
        self.output_stride = max(1, deepest // 2**n_blocks)
        self.input_multiple = deepest
        head_in = config.decoder_dims[-1] + (1 if config.head_coord else 0)
        for name, ch in config.heads:
            self.add_module(name, nn.Conv2d(head_in, ch, 1))
        if config.orientation_classes:
            self.orientation = nn.Linear(tap_chs[-1], config.orientation_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = cast(Any, self.encoder)
        x = e.act1(e.bn1(e.conv1(x)))
        feats = [x] if self.config.maxpool else []
        if self.config.maxpool:
            x = e.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(e, name)(x)
            feats.append(x)
        return feats

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (image - self.mean) / self.std
        feats = self.encode(x)
        n_blocks = len(self.config.decoder_dims)
        skips: list[torch.Tensor | None] = list(feats[:-1][::-1])
        skips = (skips + [None] * n_blocks)[:n_blocks]
        last = self.decoder(feats[-1], skips)
        if self.config.head_coord:
            b, _, h, w = last.shape
            y = torch.linspace(-1.0, 1.0, h, dtype=last.dtype, device=last.device)
            last = torch.cat([last, y.view(1, 1, h, 1).expand(b, 1, h, w)], dim=1)
        out = {name: getattr(self, name)(last) for name, _ in self.config.heads}
        if self.config.orientation_classes:
            pooled = F.adaptive_avg_pool2d(feats[-1], 1).flatten(1)
            out["orientation"] = self.orientation(pooled)
        return out


def build(config: UNetConfig = WAVEFORM) -> UNet:
    """A randomly initialised net of this layout (no download, ever)."""
    return UNet(config)
