"""Shipped weights: fp16 safetensors shards with a SHA-256 manifest; and the seed's .pth files.

The repository carries the weights, so they must stay small (at most ``MAX_TOTAL_BYTES``,
no file over ``MAX_FILE_BYTES``, split into shards when needed) and they must be exactly
the bytes that were trained: every shard's SHA-256 is in ``manifest.json`` and loading
refuses a file that does not match. Safetensors holds no code, so loading a shipped file
can never run anything.

A user who has the seed's own checkpoints (``stage0-last.checkpoint.pth`` ...) points
``--weights-dir`` at them; those are PyTorch pickles, read with ``weights_only=True`` so
that a hostile file cannot execute code either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.models.unet import SEED_BUFFERS, UNetConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the shipped weights live (inside the package, so they install with it)."""
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cardioscan-weights/1"
MAX_FILE_BYTES = 15_000_000
"""Shard limit; below 16 MB however one counts a megabyte."""
MAX_TOTAL_BYTES = 60_000_000
SEED_FILES: dict[str, str] = {
    "stage0": "stage0-last.checkpoint.pth",
    "stage1": "stage1-last.checkpoint.pth",
    "stage2": "stage2-00005810.checkpoint.pth",
}
"""The seed's checkpoint file names, by stage."""
_HEADER_ALLOWANCE = 64 * 1024
"""Room left in each shard for its safetensors header."""


class WeightsError(RuntimeError):
    """Weights are missing, do not match their checksum, or do not fit the network."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shards(tensors: Mapping[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order so no shard's data exceeds ``limit`` bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if n > limit:
            raise WeightsError(f"tensor {key} alone is {n} bytes, over the {limit} byte limit")
        if size + n > limit and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def to_fp16(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to fp16 (contiguous, detached); integer buffers unchanged."""
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            .cpu() for k, v in state.items()}


def export(state: Mapping[str, torch.Tensor], out_dir: Path, *, name: str, config: UNetConfig,
           meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` as fp16 safetensors shards plus an entry in ``out_dir/manifest.json``.

    Other models already in the manifest are kept. Returns the manifest path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = to_fp16(state)
    files = []
    shards = _shards(tensors, MAX_FILE_BYTES - _HEADER_ALLOWANCE)
    for old in out_dir.glob(f"{name}-*.safetensors"):
        old.unlink()
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"{name}-{i:02d}-of-{len(shards):02d}.safetensors"
        save_file(shard, str(path), metadata={"model": name, "format": MANIFEST_FORMAT})
        path.chmod(0o644)  # readable by the non-root user a container runs as
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise WeightsError(f"{path.name} is {size} bytes, over {MAX_FILE_BYTES}")
        files.append({"path": path.name, "sha256": sha256_file(path), "bytes": size})
    manifest_path = out_dir / MANIFEST_NAME
    manifest: dict[str, Any] = (read_manifest(manifest_path) if manifest_path.exists()
                                else {"format": MANIFEST_FORMAT, "models": {}})
    manifest["models"][name] = {"config": config_to_dict(config), "files": files,
                                "meta": dict(meta or {})}
    total = sum(f["bytes"] for m in manifest["models"].values() for f in m["files"])
    if total > MAX_TOTAL_BYTES:
        raise WeightsError(f"weights total {total} bytes, over {MAX_TOTAL_BYTES}")
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest_path


def remove(manifest_path: Path, name: str) -> None:
    """Drop model ``name`` and its shards from a manifest (nothing if it is not there)."""
    if not manifest_path.is_file():
        return
    manifest = read_manifest(manifest_path)
    entry = manifest["models"].pop(name, None)
    if entry is None:
        return
    for f in entry["files"]:
        (manifest_path.parent / f["path"]).unlink(missing_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def config_to_dict(config: UNetConfig) -> dict[str, Any]:
    d = asdict(config)
    d["decoder_dims"] = list(config.decoder_dims)
    d["heads"] = [list(h) for h in config.heads]
    return d


def config_from_dict(d: Mapping[str, Any]) -> UNetConfig:
    return UNetConfig(
        arch=str(d["arch"]), maxpool=bool(d["maxpool"]),
        decoder_dims=tuple(int(x) for x in d["decoder_dims"]),
        heads=tuple((str(n), int(c)) for n, c in d["heads"]),
        coord_decoder=bool(d["coord_decoder"]), head_coord=bool(d["head_coord"]),
        orientation_classes=int(d.get("orientation_classes", 0)),
    )


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read weights manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise WeightsError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def load(manifest_path: Path, name: str) -> tuple[dict[str, torch.Tensor], UNetConfig,
                                                  dict[str, Any]]:
    """State dict (fp16), config and meta of model ``name``; every shard checksum-verified."""
    manifest = read_manifest(manifest_path)
    entry = manifest["models"].get(name)
    if entry is None:
        raise WeightsError(f"no model {name!r} in {manifest_path}")
    state: dict[str, torch.Tensor] = {}
    for f in entry["files"]:
        path = manifest_path.parent / f["path"]
        if not path.is_file():
            raise WeightsError(f"weights file {path} is missing")
        digest = sha256_file(path)
        if digest != f["sha256"]:
            raise WeightsError(f"weights file {path.name} does not match its checksum "
                               f"(sha256 {digest[:12]}..., manifest {f['sha256'][:12]}...)")
        state.update(load_file(str(path)))
    return state, config_from_dict(entry["config"]), dict(entry.get("meta", {}))


def read_seed_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of one of the seed's ``.pth`` checkpoints (under 'state_dict' or bare)."""
    if not path.is_file():
        raise WeightsError(f"seed checkpoint {path} is missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many classes
        raise WeightsError(f"cannot read seed checkpoint {path.name}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path.name} holds no state dict")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], *,
              ignore: frozenset[str] = SEED_BUFFERS) -> None:
    """Load ``state`` into ``net`` strictly, except for keys in ``ignore``.

    Tensors are cast to each parameter's dtype. A missing or unexpected key, or a shape
    that differs, is a :class:`WeightsError` naming the first few culprits.
    """
    own = net.state_dict()
    given = {k: v for k, v in state.items() if k not in ignore}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if own[k].shape != given[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(
            "weights do not fit the network: "
            + "; ".join(f"{label} {keys[:4]}{'...' if len(keys) > 4 else ''}"
                        for label, keys in (("missing", missing), ("unexpected", unexpected),
                                            ("wrong shape", wrong)) if keys))
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in given.items()}, strict=True)
