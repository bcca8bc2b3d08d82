"""The U-Net layouts, and loading the seed's checkpoints by their state-dict key names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import models
from pipeline.models.unet import SEED_STAGE0, SEED_STAGE1, SEED_STAGE2, WAVEFORM, UNet
from pipeline.models.weights import SEED_FILES, WeightsError, load_into, read_seed_checkpoint


def seed_style_checkpoint(net: UNet, path: Path, *, wrap: bool = True) -> dict[str, torch.Tensor]:
    """Save ``net`` the way the seed's training script did: buffers D/mean/std included,
    under 'state_dict' next to other bookkeeping."""
    state = dict(net.state_dict())
    state["D"] = torch.tensor(0)
    state["mean"] = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    state["std"] = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.save({"state_dict": state, "iteration": 5810, "epoch": 12.5} if wrap else state, path)
    return state


def test_waveform_net_output_is_full_resolution() -> None:
    net = UNet(WAVEFORM).eval()
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 64, 96))
    assert out["pixel"].shape == (1, 1, 64, 96)
    assert net.output_stride == 1


def test_seed_stage2_layout_matches_the_reference() -> None:
    sd = UNet(SEED_STAGE2).state_dict()
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "pixel"}
    # MyCoordDecoderBlock: in + skip + 2 coordinate channels; head sees 32 + 1 (y).
    assert sd["decoder.block.0.conv1.0.weight"].shape == (256, 512 + 256 + 2, 3, 3)
    assert sd["decoder.block.3.conv1.0.weight"].shape == (32, 64 + 0 + 2, 3, 3)
    assert sd["pixel.weight"].shape == (4, 33, 1, 1)
    assert "encoder.layer4.2.conv2.weight" in sd  # resnet34
    assert not any(k.startswith("encoder.fc") for k in sd)


def test_seed_stage0_and_stage1_layouts() -> None:
    sd0 = UNet(SEED_STAGE0).state_dict()
    assert "encoder.conv1.0.weight" in sd0  # resnet18d deep stem
    assert sd0["marker.weight"].shape == (14, 32, 1, 1)
    assert sd0["orientation.weight"].shape == (8, 512)
    sd1 = UNet(SEED_STAGE1).state_dict()
    assert sd1["gridhline.weight"].shape == (45, 32, 1, 1)
    assert sd1["gridvline.weight"].shape == (58, 32, 1, 1)
    assert sd1["decoder.block.0.conv1.0.weight"].shape == (256, 512 + 256, 3, 3)


def test_seed_checkpoints_load_from_a_weights_dir(tmp_path: Path) -> None:
    torch.manual_seed(1)
    saved = {}
    for stage, config in (("stage0", SEED_STAGE0), ("stage1", SEED_STAGE1),
                          ("stage2", SEED_STAGE2)):
        net = UNet(config)
        with torch.no_grad():  # make it differ from any fresh initialisation
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        saved[stage] = seed_style_checkpoint(net, tmp_path / SEED_FILES[stage],
                                             wrap=stage != "stage1")
    nets = models.load_seed_nets(tmp_path)
    assert set(nets) == {"stage0", "stage1", "stage2"}
    for stage, net in nets.items():
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[stage][k]), (stage, k)

    assert models.available(tmp_path)
    engine = models.load_engine("cpu", weights_dir=tmp_path)
    assert engine.name == "seed-stage2"
    for k, v in engine.net.state_dict().items():
        assert torch.equal(v, saved["stage2"][k])
    models.clear_cache()


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    net = UNet(SEED_STAGE2)
    state = seed_style_checkpoint(UNet(SEED_STAGE0), tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        load_into(net, read_seed_checkpoint(tmp_path / "wrong.pth"))
    assert "marker.weight" in state
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        read_seed_checkpoint(tmp_path / "junk.pth")


def test_empty_weights_dir_is_not_available(tmp_path: Path) -> None:
    assert not models.available(tmp_path)
    with pytest.raises(WeightsError):
        models.load_engine("cpu", weights_dir=tmp_path)
