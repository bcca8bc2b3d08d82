"""Shipped-weights format: fp16 safetensors shards, SHA-256 manifest, refusal of tampering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import models
from pipeline.models.unet import WAVEFORM, UNet
from pipeline.models.weights import (
    MAX_FILE_BYTES,
    WeightsError,
    export,
    load,
    sha256_file,
)


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    return UNet(WAVEFORM).eval()


@pytest.fixture()
def exported(tmp_path: Path, net: UNet) -> Path:
    return export(net.state_dict(), tmp_path, name=models.WAVEFORM_MODEL, config=WAVEFORM,
                  meta={"sigma_px": 1.0, "steps": 0})


def test_round_trip_is_fp16_sharded_and_checksummed(exported: Path, net: UNet) -> None:
    manifest = json.loads(exported.read_text())
    files = manifest["models"]["waveform"]["files"]
    assert len(files) >= 2  # ~28 MB of fp16 does not fit one shard
    for f in files:
        path = exported.parent / f["path"]
        assert path.stat().st_size == f["bytes"] <= MAX_FILE_BYTES
        assert sha256_file(path) == f["sha256"]
    state, config, meta = load(exported, "waveform")
    assert config == WAVEFORM and meta["sigma_px"] == 1.0
    for k, v in net.state_dict().items():
        if v.is_floating_point():
            assert state[k].dtype == torch.float16
            assert torch.equal(state[k], v.half())
        else:
            assert torch.equal(state[k], v)


def test_a_tampered_shard_is_refused(exported: Path) -> None:
    manifest = json.loads(exported.read_text())
    shard = exported.parent / manifest["models"]["waveform"]["files"][-1]["path"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one bit pattern in the tensor data, header intact
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        load(exported, "waveform")
    models.clear_cache()
    with pytest.raises(WeightsError, match="checksum"):
        models.load_engine("cpu", weights_dir=exported.parent)


def test_a_missing_shard_is_refused(exported: Path) -> None:
    manifest = json.loads(exported.read_text())
    (exported.parent / manifest["models"]["waveform"]["files"][0]["path"]).unlink()
    with pytest.raises(WeightsError, match="missing"):
        load(exported, "waveform")


def test_engine_from_exported_weights_predicts_a_page_map(exported: Path) -> None:
    assert models.available(exported.parent)
    models.clear_cache()
    engine = models.load_engine("cpu", weights_dir=exported.parent)
    page = np.full((90, 170, 3), 250, np.uint8)
    page[40:43, 10:160] = 20  # a dark horizontal stroke
    prob = engine.predict(page, px_per_mm=8.0)
    assert prob.shape == (90, 170) and prob.dtype == np.float32
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    maps = engine.predict_batch([page, page[:, :100]], [8.0, 8.0])
    assert [m.shape for m in maps] == [(90, 170), (90, 100)]
    np.testing.assert_allclose(maps[0], prob, atol=1e-5)
    models.clear_cache()
