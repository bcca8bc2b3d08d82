"""Training data and the training loop on CPU: tiny pages, two steps, resume, export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import WAVEFORM_MODEL
from pipeline.models.dataset import DataConfig, make_samples
from pipeline.models.engine import Frame
from pipeline.models.train import TrainConfig, train
from pipeline.models.unet import UNet, UNetConfig
from pipeline.models.weights import load

TINY = DataConfig(canvas=(64, 128), frame=Frame(px_per_mm_x=0.45, px_per_mm_y=0.3),
                  sigma_px=0.8, width_px=(300, 360), views_per_page=2)


def test_targets_lie_on_the_printed_ink() -> None:
    """The target (trace and pulse centre lines) sits on dark ink, not on grid or text."""
    cfg = DataConfig(canvas=(448, 896), frame=Frame(px_per_mm_x=3.0, px_per_mm_y=2.0),
                     styles=(("clean", 1.0),), width_px=(1400, 1500), augment=False,
                     views_per_page=1)
    sample = make_samples(12345, cfg)[0]
    assert sample.image.shape == (448, 896, 3) and sample.target.shape == (448, 896)
    dark = 255.0 - sample.image.max(axis=2).astype(np.float64)
    on = sample.target > 0.6
    assert on.sum() > 2000
    assert dark[on].mean() > 4 * dark[sample.target == 0].mean()
    # The calibration pulses are part of the target: a tall vertical stroke near the left.
    left = sample.target[:, : int(0.1 * 896)]
    assert (left > 0.6).any(axis=1).sum() > 20
    assert len(sample.segments) >= 12
    assert all(s.x1 > s.x0 for s in sample.segments)


def test_two_cpu_steps_train_resume_and_export(tmp_path: Path) -> None:
    small = UNetConfig(arch="resnet10t", decoder_dims=(32, 16, 16, 8, 8))
    cfg = TrainConfig(steps=2, batch=2, workers=0, val_every=1000, ckpt_every=1000, val_n=1,
                      val_full_n=0, warmup=1, data=TINY, net=small)
    state = train(cfg, tmp_path, device="cpu", resume=True)
    assert state.step == 2
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    assert losses and all(np.isfinite(losses))
    vals = [r for r in records if r.get("event") == "val"]
    assert vals and "proxy_db" in vals[-1]

    torch.manual_seed(cfg.seed)
    initial = UNet(cfg.net).state_dict()
    trained = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["model"]
    changed = [k for k, v in initial.items()
               if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert len(changed) > 0.5 * sum(v.is_floating_point() for v in initial.values())

    _, config, meta = load(tmp_path / "export" / "manifest.json", WAVEFORM_MODEL)
    assert config == cfg.net and meta["steps"] == 2
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "{{" not in card and "Steps: 2" in card

    # A fresh machine: only the portable resume/ folder was carried over.
    (tmp_path / "last.pt").unlink()
    (tmp_path / "best.pt").unlink()
    _, _, last_meta = load(tmp_path / "resume" / "manifest.json", "last")
    assert last_meta["train_state"]["step"] == 2
    state = train(replace(cfg, steps=3), tmp_path, device="cpu", resume=True)
    assert state.step == 3
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["from"] == "resume/" and r["step"] == 2
               for r in records)


def test_schedule_warms_up_decays_and_follows_a_time_budget() -> None:
    from pipeline.models.train import TrainState, lr_factor, progress

    assert lr_factor(0, 0.0, warmup=10) < lr_factor(9, 0.0, warmup=10) == 1.0
    assert lr_factor(50, 0.5, warmup=10) == pytest.approx(0.51)
    assert lr_factor(99, 1.0, warmup=10) == pytest.approx(0.02)
    # A fresh optimizer after a portable resume is warmed up again.
    assert lr_factor(500, 0.5, warmup=10, restart=500) < 0.05
    cfg = TrainConfig(steps=100_000, budget_s=600.0)
    assert progress(cfg, TrainState(step=10, seconds=300.0)) == pytest.approx(0.5)
    assert progress(TrainConfig(steps=100), TrainState(step=25, seconds=1e6)) == 0.25
