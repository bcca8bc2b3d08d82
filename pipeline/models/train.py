"""Train the waveform net from nothing on synthetic pages; resumable, time-boxed, self-checking.

One call does everything: stream pages from parallel workers, train with AdamW and a
warm-up + cosine schedule (bf16 autocast on CUDA), checkpoint every ``ckpt_every`` steps,
validate every ``val_every`` steps, stop early when the validation dB stops improving,
and export the best weights as fp16 safetensors with a manifest and a model card.

Validation has two figures:

* ``proxy`` -- the net plus :mod:`pipeline.models.series` on exactly rectified
  synthetic photos with the true row baselines: what the learned stage alone can reach.
* ``full`` -- the whole digitizer (``pipeline.digitizer.digitize(engine="learned")``) on
  the fixed ``synthetic-photo`` set and, when given, the real photos of ``photos-dev``.
  Early stopping follows this one when the digitizer is importable, else the proxy.

Two checkpoints are kept in ``out``: ``last.pt`` (everything: weights, optimizer,
scheduler, step, RNG, best figure) for resuming on the same machine, and ``resume/`` (the
last and the best weights as fp16 safetensors shards under 15 MB, the state in the
manifest) small enough to carry between machines; resuming from it starts the optimizer
afresh with a short warm-up. ``time_limit_s`` makes a run stop, checkpoint and export in
time for a hard wall-clock limit.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

from pipeline.leads import LEADS
from pipeline.models import WAVEFORM_MODEL, override_engine
from pipeline.models.dataset import DataConfig, Sample, WaveformPages, validation_sample
from pipeline.models.engine import LearnedEngine, resolve_device
from pipeline.models.series import track_rows
from pipeline.models.unet import WAVEFORM, UNet, UNetConfig
from pipeline.models.weights import config_to_dict, export, load, load_into, remove
from pipeline.scoring import ImageScore, aggregate, score_image
from pipeline.synthetic.rate import init_generator_worker

Log = Callable[[dict[str, Any]], None]
CARD_TEMPLATE = Path(__file__).resolve().parent / "MODEL_CARD.md"
RESUME_WARMUP = 100
"""Warm-up steps for a fresh optimizer after resuming from the portable checkpoint."""
LAST_MODEL = "last"
"""Name of the latest weights in ``resume/manifest.json`` (``waveform`` holds the best)."""
ROW_MERGE_PX = 3.0
"""Segments whose baselines lie closer than this share a printed row."""


@dataclass
class TrainConfig:
    """Every knob of a training run; written into the checkpoints and the model card."""

    steps: int = 6000
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 300
    pos_weight: float = 5.0
    dice_weight: float = 0.5
    workers: int | None = None
    """DataLoader worker processes; None = one per CPU core but two; 0 = in-process."""
    val_every: int = 500
    ckpt_every: int = 250
    val_n: int = 12
    """Synthetic photos for the proxy figure."""
    val_full_n: int = 8
    """Pictures of the fixed ``synthetic-photo`` set for the full figure (0 = skip)."""
    photos_dev: str | None = None
    """Folder of picture + WFDB pairs for the real-photo figure."""
    patience: int = 4
    """Validation rounds without improvement before stopping."""
    time_limit_s: float | None = None
    """Wall-clock limit of this run (s): stop, checkpoint and export before it."""
    budget_s: float | None = None
    """Training seconds over all runs: the schedule decays over them, then training ends."""
    seed: int = 0
    net: UNetConfig = WAVEFORM
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainState:
    step: int = 0
    best_db: float = -math.inf
    best_step: int = 0
    bad_rounds: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""


# --------------------------------------------------------------------------------------
# Loss and schedule.


def loss_fn(logits: torch.Tensor, target: torch.Tensor, pos_weight: float,
            dice_weight: float) -> torch.Tensor:
    """BCE on the soft Gaussian targets (positives up-weighted) plus a soft Dice term."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return bce + dice_weight * dice.mean()


def lr_factor(step: int, progress: float, warmup: int, restart: int = 0) -> float:
    """Linear warm-up, then cosine to 2 % at ``progress`` 1; ``restart`` re-warms after a
    resume that starts a fresh optimizer."""
    f = 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    if step < warmup:
        f *= (step + 1) / warmup
    if restart and step < restart + RESUME_WARMUP:
        f *= (step - restart + 1) / RESUME_WARMUP
    return f


def progress(cfg: TrainConfig, state: TrainState) -> float:
    """How far through the run's schedule: steps, or training time when budgeted."""
    p = state.step / max(1, cfg.steps)
    if cfg.budget_s:
        p = max(p, state.seconds / cfg.budget_s)
    return p


# --------------------------------------------------------------------------------------
# Validation.


def _rows(sample: Sample) -> list[float]:
    rows: list[float] = []
    for b in sorted(s.baseline for s in sample.segments):
        if not rows or b - rows[-1] > ROW_MERGE_PX:
            rows.append(b)
    return rows


def proxy_prediction(prob: np.ndarray, sample: Sample, sigma_px: float) -> np.ndarray:
    """(n, 12) mV read from ``prob`` with the sample's true rows and segment extents."""
    rows = _rows(sample)
    traces = track_rows(prob, rows, sigma_px=sigma_px)
    pred = np.full(sample.signals.shape, np.nan)
    for seg in sample.segments:
        r = int(np.argmin([abs(seg.baseline - b) for b in rows]))
        n = seg.i1 - seg.i0
        xs = np.linspace(seg.x0, seg.x1, n)
        tr = traces[r]
        ok = np.isfinite(tr.y)
        if ok.sum() < 2:
            continue
        y = np.interp(xs, tr.x[ok], tr.y[ok])
        gap = np.interp(xs, tr.x, (~ok).astype(np.float64))
        y[gap > 0.99] = np.nan
        pred[seg.i0:seg.i1, LEADS.index(seg.lead)] = (seg.baseline - y) / sample.px_per_mv
    return pred


def _val_sample(args: tuple[int, DataConfig]) -> Sample | None:
    try:
        return validation_sample(*args)
    except Exception:  # a page this machine cannot draw (e.g. a signal source missing)
        return None


def validation_samples(cfg: TrainConfig) -> list[Sample]:
    """The proxy set, made in parallel (each page takes about a second)."""
    jobs = [(i, cfg.data) for i in range(cfg.val_n + 4)]
    n_proc = min(8, len(jobs), max(1, (os.cpu_count() or 1) - 1))
    if n_proc <= 1 or cfg.val_n <= 1:
        made = [_val_sample(j) for j in jobs[:cfg.val_n + 1]]
    else:
        with ProcessPoolExecutor(n_proc, mp_context=multiprocessing.get_context("spawn")) as pool:
            made = list(pool.map(_val_sample, jobs))
    return [s for s in made if s is not None][:cfg.val_n]


def _engine(net: UNet, cfg: TrainConfig, device: torch.device) -> LearnedEngine:
    return LearnedEngine(net, "cardioscan-waveform (training)", cfg.data.frame, device,
                         sigma_px=cfg.data.sigma_px)


def proxy_score(engine: LearnedEngine, samples: Sequence[Sample]) -> dict[str, float]:
    scores: list[ImageScore] = []
    for i in range(0, len(samples), engine.batch_size):
        chunk = samples[i:i + engine.batch_size]
        probs = engine.forward_uint8(np.stack([s.image for s in chunk]))
        for s, prob in zip(chunk, probs, strict=True):
            scores.append(score_image(proxy_prediction(prob, s, engine.sigma_px), s.signals,
                                      s.fs))
    agg = aggregate(scores)
    return {"proxy_db": agg.kaggle_db, "proxy_challenge_db": agg.challenge_db}


def photo_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(picture, record header) pairs: ``<record>-0.jpg`` beside ``<record>.hea``."""
    pairs = []
    headers = sorted(folder.glob("*.hea"), key=lambda p: -len(p.stem))
    for pic in sorted(folder.iterdir()):
        if pic.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"):
            continue
        hea = next((h for h in headers if pic.stem.startswith(h.stem)), None)
        if hea is not None:
            pairs.append((pic, hea))
    return pairs


def read_reference(header: Path) -> tuple[np.ndarray, float]:
    """A WFDB record as (n, 12) mV in LEADS order (NaN for absent leads) and its fs."""
    import wfdb

    rec = wfdb.rdrecord(str(header.with_suffix("")))
    out = np.full((rec.sig_len, len(LEADS)), np.nan)
    names = {n.upper(): i for i, n in enumerate(rec.sig_name)}
    for j, lead in enumerate(LEADS):
        if lead.upper() in names:
            out[:, j] = rec.p_signal[:, names[lead.upper()]]
    return out, float(rec.fs)


def full_items(cfg: TrainConfig) -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """Pictures and references for the full-digitizer figures (loaded once)."""
    import cv2

    from pipeline.synthetic import synthetic_set

    sets: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    if cfg.val_full_n:
        try:
            sets["synthetic-photo"] = [(p.image, p.signals, float(p.fs))
                                       for p in synthetic_set("synthetic-photo", cfg.val_full_n)]
        except Exception:  # the generator needs a signal source this machine lacks
            sets["synthetic-photo"] = []
    if cfg.photos_dev and Path(cfg.photos_dev).is_dir():
        items = []
        for pic, hea in photo_pairs(Path(cfg.photos_dev)):
            bgr = cv2.imread(str(pic), cv2.IMREAD_COLOR)
            if bgr is None:
                continue
            ref, fs = read_reference(hea)
            items.append((cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), ref, fs))
        sets["photos-dev"] = items
    return sets


def full_score(engine: LearnedEngine,
               sets: dict[str, list[tuple[np.ndarray, np.ndarray, float]]]) -> dict[str, float]:
    """Kaggle dB of the whole digitizer with this engine; {} if there is no digitizer yet."""
    try:
        from pipeline.digitizer import digitize
    except ImportError:
        return {}

    def one(item: tuple[np.ndarray, np.ndarray, float]) -> ImageScore:
        image, ref, fs = item
        try:
            pred = digitize(image, fs=round(fs), engine="learned", qa=False).signals
        except Exception:  # a failed picture scores as an empty prediction
            pred = np.full(ref.shape, np.nan)
        n = min(len(pred), len(ref))
        if n < len(ref):
            pred = np.vstack([pred[:n], np.full((len(ref) - n, ref.shape[1]), np.nan)])
        return score_image(pred[:len(ref)], ref, fs)

    out: dict[str, float] = {}
    with override_engine(engine), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)
                                                     ) as pool:
        for name, items in sets.items():
            if items:
                out[f"{name}_db"] = aggregate(list(pool.map(one, items))).kaggle_db
    return out


# --------------------------------------------------------------------------------------
# Checkpoints.


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _card_meta(cfg: TrainConfig, state: TrainState, device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "name": "cardioscan-waveform", "px_per_mm_x": cfg.data.frame.px_per_mm_x,
        "px_per_mm_y": cfg.data.frame.px_per_mm_y, "sigma_px": cfg.data.sigma_px,
        "steps": state.step, "best_step": state.best_step, "seconds": round(state.seconds, 1),
        "device": gpu, "batch": cfg.batch, "seed": cfg.seed,
        "history": state.history[-12:], "torch": torch.__version__,
    }


def save_checkpoint(out: Path, net: UNet, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig,
                    state: TrainState, device: torch.device) -> None:
    """``last.pt`` (full) and ``resume/`` (portable: model ``last``, plus ``waveform`` =
    the best weights when they differ from the last)."""
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "state": asdict(state), "rng": _rng_state(),
                  "net": config_to_dict(cfg.net)}, out / "last.pt")
    meta = _card_meta(cfg, state, device)
    meta["train_state"] = asdict(state)
    portable = out / "resume"
    export(net.state_dict(), portable, name=LAST_MODEL, config=cfg.net, meta=meta)
    best = out / "best.pt"
    if state.best_step == state.step:
        remove(portable / "manifest.json", WAVEFORM_MODEL)  # best is the last
    elif best.is_file():
        export(torch.load(best, map_location="cpu", weights_only=True), portable,
               name=WAVEFORM_MODEL, config=cfg.net, meta=_card_meta(cfg, state, device))
    # else: resumed on a new machine without a better figure yet; keep the carried best


def _load_state(d: dict[str, Any]) -> TrainState:
    return TrainState(**{k: v for k, v in d.items() if k in TrainState.__dataclass_fields__})


# --------------------------------------------------------------------------------------
# The loop.


def _worker_init(_: int) -> None:
    init_generator_worker()
    torch.set_num_threads(1)


def _batches(cfg: TrainConfig, start_pages: int, device: torch.device
             ) -> Iterator[dict[str, torch.Tensor]]:
    workers = cfg.workers if cfg.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    loader = DataLoader(
        WaveformPages(cfg.data, start=start_pages), batch_size=cfg.batch,
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        prefetch_factor=2 if workers else None, persistent_workers=workers > 0,
        # spawn, not fork: a forked child of a process that already ran OpenCV's or
        # OpenMP's thread pools can hang on its first parallel call.
        multiprocessing_context="spawn" if workers else None,
    )
    yield from loader


def train(cfg: TrainConfig, out: Path, *, device: str = "cuda", resume: bool = True,
          log: Log | None = None) -> TrainState:
    """Run (or resume) training into ``out``; returns the final state."""
    t_start = time.monotonic()
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"

    def emit(rec: dict[str, Any]) -> None:
        rec = {"time": round(time.time(), 1), **rec}
        with log_path.open("a") as f:
            f.write(json.dumps(rec, default=float) + "\n")
        if log is not None:
            log(rec)

    # Validation pictures first, in worker processes.
    val_samples = validation_samples(cfg)
    full_sets = full_items(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    net = UNet(cfg.net).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    restart = 0
    if resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", map_location=dev, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = _load_state(ck["state"])
        _set_rng_state(ck["rng"])
        emit({"event": "resumed", "from": "last.pt", "step": state.step})
    elif resume and (out / "resume" / "manifest.json").is_file():
        weights, _, meta = load(out / "resume" / "manifest.json", LAST_MODEL)
        load_into(net, weights, ignore=frozenset())
        state = _load_state(meta.get("train_state", {}))
        restart = state.step
        emit({"event": "resumed", "from": "resume/", "step": state.step})
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda _: lr_factor(state.step, progress(cfg, state), cfg.warmup, restart))

    emit({"event": "start", "device": str(dev), "config": _jsonable(cfg),
          "val_n": len(val_samples), "full_sets": {k: len(v) for k, v in full_sets.items()}})

    def validate() -> None:
        net.eval()
        engine = _engine(net, cfg, dev)
        rec: dict[str, Any] = {"event": "val", "step": state.step}
        rec.update(proxy_score(engine, val_samples))
        rec.update(full_score(engine, full_sets))
        net.train()
        key = "synthetic-photo_db" if "synthetic-photo_db" in rec else "proxy_db"
        if "photos-dev_db" in rec and "synthetic-photo_db" in rec:
            figure = 0.5 * (rec["synthetic-photo_db"] + rec["photos-dev_db"])
        else:
            figure = rec[key]
        rec["figure"] = figure
        if figure > state.best_db + 0.05:
            state.best_db, state.best_step, state.bad_rounds = figure, state.step, 0
            _atomic_save(net.state_dict(), out / "best.pt")
            rec["best"] = True
        else:
            state.bad_rounds += 1
        state.history.append({k: v for k, v in rec.items() if k != "event"})
        emit(rec)

    net.train()
    margin = 90.0  # seconds kept for the last checkpoint, validation and export
    t_loop = time.monotonic()
    seconds_before = state.seconds
    seen, t_seen, loss_sum, n_loss = 0, time.monotonic(), 0.0, 0
    start_pages = state.step * cfg.batch // max(1, cfg.data.views_per_page)
    batches = _batches(cfg, start_pages, dev)
    while progress(cfg, state) < 1.0:
        if cfg.time_limit_s and time.monotonic() - t_start > cfg.time_limit_s - margin:
            state.stopped = "time limit"
            break
        batch = next(batches)
        x = batch["image"].to(dev, non_blocking=True).float().div_(255.0)
        y = batch["target"].to(dev, non_blocking=True).float().div_(255.0)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = net(x)["pixel"]
        loss = loss_fn(logits, y, cfg.pos_weight, cfg.dice_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {state.step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        state.step += 1
        sched.step()
        loss_sum += float(loss.detach())
        n_loss += 1
        seen += x.shape[0]
        state.seconds = seconds_before + time.monotonic() - t_loop
        if state.step % 25 == 0 or state.step == cfg.steps:
            now = time.monotonic()
            emit({"event": "train", "step": state.step, "loss": loss_sum / n_loss,
                  "lr": opt.param_groups[0]["lr"], "img_s": seen / max(now - t_seen, 1e-6)})
            seen, t_seen, loss_sum, n_loss = 0, now, 0.0, 0
        if state.step % cfg.val_every == 0:
            validate()
            if state.bad_rounds >= cfg.patience:
                state.stopped = "early stop"
                break
        if state.step % cfg.ckpt_every == 0:
            save_checkpoint(out, net, opt, sched, cfg, state, dev)
    if not state.stopped:
        state.stopped = "schedule done"
    if not state.history or state.history[-1].get("step") != state.step:
        validate()
    save_checkpoint(out, net, opt, sched, cfg, state, dev)
    export_best(out, cfg, state, dev)
    emit({"event": "end", "step": state.step, "stopped": state.stopped,
          "best_db": state.best_db, "best_step": state.best_step,
          "seconds": round(time.monotonic() - t_start, 1)})
    return state


def _best_weights(out: Path, state: TrainState) -> dict[str, torch.Tensor]:
    """The best weights this run or a carried ``resume/`` knows, else the last ones."""
    if (out / "best.pt").is_file():
        return dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
    manifest = out / "resume" / "manifest.json"
    if manifest.is_file():
        models = json.loads(manifest.read_text()).get("models", {})
        name = WAVEFORM_MODEL if WAVEFORM_MODEL in models else LAST_MODEL
        return load(manifest, name)[0]
    return dict(torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"])


def export_best(out: Path, cfg: TrainConfig, state: TrainState, device: torch.device) -> Path:
    """Write the best weights to ``out/export`` (safetensors + manifest + model card)."""
    net_state = _best_weights(out, state)
    dest = out / "export"
    if dest.exists():
        shutil.rmtree(dest)
    meta = _card_meta(cfg, state, device)
    manifest = export(net_state, dest, name=WAVEFORM_MODEL, config=cfg.net, meta=meta)
    write_model_card(dest / "MODEL_CARD.md", cfg, state, meta)
    return manifest


def write_model_card(path: Path, cfg: TrainConfig, state: TrainState, meta: dict[str, Any]
                     ) -> None:
    """Fill the model-card template with this run's data, seed, time, GPU and figures."""
    best = next((h for h in state.history if h.get("step") == state.best_step), {})

    def fig(key: str) -> str:
        v = best.get(key)
        return f"{v:.2f} dB" if isinstance(v, (int, float)) and math.isfinite(v) else "not measured"

    text = re.sub(r"<!--.*?-->\n*", "", CARD_TEMPLATE.read_text(), flags=re.S)
    values = {
        "steps": str(state.step), "best_step": str(state.best_step),
        "minutes": f"{state.seconds / 60:.1f}", "device": str(meta["device"]),
        "batch": str(cfg.batch), "seed": str(cfg.seed),
        "pages": str(state.step * cfg.batch // max(1, cfg.data.views_per_page)),
        "canvas": f"{cfg.data.canvas[1]}x{cfg.data.canvas[0]}",
        "frame": f"{cfg.data.frame.px_per_mm_x:g} x {cfg.data.frame.px_per_mm_y:g}",
        "sigma": f"{cfg.data.sigma_px:g}", "arch": cfg.net.arch,
        "decoder": ", ".join(str(d) for d in cfg.net.decoder_dims),
        "proxy": fig("proxy_db"), "synthetic_photo": fig("synthetic-photo_db"),
        "photos_dev": fig("photos-dev_db"), "stopped": state.stopped,
        "torch": str(meta["torch"]),
        "precision": "bf16 autocast" if "cpu" not in str(meta["device"]) else "fp32",
    }
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    path.write_text(text)


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["net"] = config_to_dict(cfg.net)
    return json.loads(json.dumps(d, default=str))
