"""``cardioscan train``: train a learned stage from nothing, resumably, and export its weights.

Progress goes to stdout one line per event (the same records as ``OUT/log.jsonl``); the
exported weights land in ``OUT/export`` (copy them to ``pipeline/models/weights`` to ship).
A run stopped by ``--time-limit`` exits 0: it checkpointed and exported, and the same
command resumes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

STAGES = ("waveform",)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _line(rec: dict[str, Any]) -> None:
    event = rec.get("event")
    if event == "train":
        msg = (f"step {rec['step']:>6}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
               f"{rec['img_s']:.1f} img/s")
    elif event == "val":
        figs = "  ".join(f"{k.removesuffix('_db')} {v:.2f} dB" for k, v in rec.items()
                         if k.endswith("_db") and isinstance(v, float))
        msg = f"val  {rec['step']:>6}  {figs}{'  (best)' if rec.get('best') else ''}"
    elif event == "start":
        msg = f"start on {rec['device']}; validation sets {rec['full_sets']}, proxy {rec['val_n']}"
    else:
        msg = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("time", "config"))
    print(msg, flush=True)


def run_train(stage: str, out: Path, steps: int, batch: int, device: str, resume: bool,
              time_limit_s: float | None = None, workers: int | None = None,
              photos_dev: Path | None = None, val_every: int | None = None,
              budget_s: float | None = None) -> int:
    """Train ``stage`` into ``out``; returns the process exit code."""
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; expected one of {', '.join(STAGES)}",
              file=sys.stderr)
        return EXIT_USAGE
    if steps < 1 or batch < 1:
        print("error: --steps and --batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from pipeline.models.train import TrainConfig, train

    cfg = TrainConfig(steps=steps, batch=batch, time_limit_s=time_limit_s, budget_s=budget_s,
                      workers=workers, photos_dev=str(photos_dev) if photos_dev else None)
    if val_every:
        cfg.val_every = val_every
        cfg.ckpt_every = min(cfg.ckpt_every, val_every)
    try:
        state = train(cfg, out, device=device, resume=resume, log=_line)
    except (RuntimeError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"stopped ({state.stopped}) at step {state.step}; best {state.best_db:.2f} dB at "
          f"step {state.best_step}; weights in {out / 'export'}", flush=True)
    return EXIT_OK
