"""``cardioscan bench``: how well and how fast the digitizer reads a set of ECG pictures.

Sets are the fixed synthetic ones (``synthetic-scan``, ``synthetic-photo``) or any folder
of picture + WFDB record pairs (``<record>-0.jpg`` beside ``<record>.hea/.dat``; a picture
goes with the longest record name its file name starts with). Pictures are digitized in a
child process (:mod:`service.digitize_worker`) that never sees the reference signals;
only this process scores them, with :mod:`pipeline.scoring`. A failed picture counts as a
failure and is scored as an all-NaN prediction, as the Kaggle metric would score an empty
submission.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.leads import LEADS
from pipeline.scoring import ImageScore, SetScore, aggregate, score_image
from service.digitize_worker import DigitizerWorker, Payload, WorkerStartError

SYNTHETIC_SETS = ("synthetic-scan", "synthetic-photo")
SYNTHETIC_DEFAULT_N = 50
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pdf")
TIMEOUT_S = 120.0
"""Per-picture limit; a picture that takes longer is a failure, not a hang."""
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class BenchItem:
    """One picture of a set with its reference; ``reference`` stays in this process."""

    name: str
    payload: Payload
    reference: np.ndarray
    fs: float


@dataclass(frozen=True)
class ImageOutcome:
    name: str
    score: ImageScore
    seconds: float
    error: str | None


@dataclass(frozen=True)
class BenchReport:
    """Every figure the bench prints, as written to ``--json``."""

    set_name: str
    engine: str
    device: str
    batch: int
    score: SetScore
    outcomes: list[ImageOutcome]
    wall_seconds: float
    startup_seconds: float
    peak_memory_bytes: int

    @property
    def failures(self) -> int:
        return sum(1 for o in self.outcomes if o.error is not None)

    @property
    def median_seconds(self) -> float:
        return statistics.median(o.seconds for o in self.outcomes) if self.outcomes else math.nan

    @property
    def images_per_second(self) -> float:
        return len(self.outcomes) / self.wall_seconds if self.wall_seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        def num(value: float) -> float | None:
            return float(value) if math.isfinite(value) else None

        from importlib.metadata import PackageNotFoundError, version

        try:
            software = version("cardioscan")
        except PackageNotFoundError:
            software = None
        return {
            "set": self.set_name,
            "engine": self.engine,
            "device": self.device,
            "batch": self.batch,
            "n_images": len(self.outcomes),
            "failures": self.failures,
            "kaggle_db": num(self.score.kaggle_db),
            "challenge_db": num(self.score.challenge_db),
            "per_lead_db": {lead: num(v) for lead, v in self.score.per_lead_db.items()},
            "median_seconds_per_image": num(self.median_seconds),
            "images_per_second": num(self.images_per_second),
            "peak_memory_mb": self.peak_memory_bytes / 2**20,
            "wall_seconds": self.wall_seconds,
            "startup_seconds": self.startup_seconds,
            "images": [
                {
                    "name": o.name,
                    "ratio": o.score.ratio,
                    "db": num(o.score.db),
                    "seconds": o.seconds,
                    "error": o.error,
                }
                for o in self.outcomes
            ],
            "software": {"cardioscan": software, "python": platform.python_version()},
            "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        }


def pair_folder(folder: Path) -> list[tuple[Path, Path]]:
    """``(picture, record path without extension)`` pairs of a folder, sorted by picture.

    A picture belongs to the longest record name that its stem starts with; pictures
    without a record are left out.
    """
    records = sorted((p.with_suffix("") for p in folder.glob("*.hea")), key=lambda p: -len(p.name))
    pairs = []
    for picture in sorted(folder.iterdir()):
        if picture.suffix.lower() not in IMAGE_SUFFIXES or not picture.is_file():
            continue
        record = next((r for r in records if picture.stem.startswith(r.name)), None)
        if record is not None:
            pairs.append((picture, record))
    return pairs


def iter_set(set_name: str, n: int | None) -> tuple[int, Iterator[BenchItem]]:
    """How many pictures the set holds (up to ``n``), and the pictures one by one."""
    if set_name in SYNTHETIC_SETS:
        from pipeline.synthetic import synthetic_set

        count = n if n is not None else SYNTHETIC_DEFAULT_N

        def synthetic() -> Iterator[BenchItem]:
            for index, page in enumerate(synthetic_set(set_name, count)):
                yield BenchItem(f"{set_name}-{index:03d}", page.image, page.signals, page.fs)

        return count, synthetic()

    folder = Path(set_name)
    if not folder.is_dir():
        raise ValueError(
            f"--set must be {' or '.join(SYNTHETIC_SETS)} or a folder; {set_name!r} is neither"
        )
    pairs = pair_folder(folder)
    if not pairs:
        raise ValueError(f"no picture + WFDB record pairs in {folder}")
    pairs = pairs[:n] if n is not None else pairs

    def from_folder() -> Iterator[BenchItem]:
        from adapters.wfdb_io import read_record

        for picture, record in pairs:
            reference, fs = read_record(record)
            yield BenchItem(picture.name, picture.read_bytes(), reference, fs)

    return len(pairs), from_folder()


def bench(
    set_name: str,
    *,
    n: int | None = None,
    device: str = "cpu",
    engine: str = "auto",
    batch: int = 1,
    target: str | None = None,
    timeout_s: float = TIMEOUT_S,
    show_progress: bool | None = None,
) -> BenchReport:
    """Digitize and score a set.

    Raises ValueError for a set that does not exist and WorkerStartError when the
    digitizer cannot be loaded.

    The progress bar goes to stderr, by default only when that is a terminal.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total, items = iter_set(set_name, n)
    outcomes: list[ImageOutcome] = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
        disable=not (sys.stderr.isatty() if show_progress is None else show_progress),
    )
    with DigitizerWorker(engine=engine, device=device, target=target) as worker, progress:
        task = progress.add_task(f"bench {Path(set_name).name}", total=total)
        worker.start()  # a digitizer that cannot load fails the bench, not every picture
        if device != "cpu" and worker.info and not worker.info.get("accepts_device"):
            progress.console.print(f"note: the digitizer takes no device option; {device} ignored")
        wall = 0.0
        pending: list[BenchItem] = []
        for item in _then_flush(items):
            if item is not None:
                pending.append(item)
            if pending and (item is None or len(pending) >= batch):
                started = time.perf_counter()
                results = _run(worker, pending, timeout_s)
                wall += time.perf_counter() - started
                for job, (prediction, seconds, error) in zip(pending, results, strict=True):
                    score = score_image(prediction, job.reference, job.fs)
                    outcomes.append(ImageOutcome(job.name, score, seconds, error))
                    progress.advance(task)
                pending = []
    return BenchReport(
        set_name=set_name,
        engine=engine,
        device=device,
        batch=batch,
        score=aggregate([o.score for o in outcomes]),
        outcomes=outcomes,
        wall_seconds=wall,
        startup_seconds=worker.startup_seconds,
        peak_memory_bytes=worker.peak_rss_bytes,
    )


def _then_flush(items: Iterator[BenchItem]) -> Iterator[BenchItem | None]:
    yield from items
    yield None


def _run(
    worker: DigitizerWorker, jobs: list[BenchItem], timeout_s: float
) -> list[tuple[np.ndarray, float, str | None]]:
    """Digitize a batch (same rate each); the prediction is all-NaN for a failed picture."""
    results: list[tuple[np.ndarray, float, str | None]] = []
    by_rate: dict[float, list[int]] = {}
    for index, job in enumerate(jobs):
        by_rate.setdefault(job.fs, []).append(index)
    answers: dict[int, tuple[np.ndarray, float, str | None]] = {}
    for fs, indices in by_rate.items():
        try:
            work = worker.run_batch([jobs[i].payload for i in indices], fs=fs, timeout_s=timeout_s)
        except WorkerStartError as exc:
            for i in indices:
                answers[i] = (np.full_like(jobs[i].reference, np.nan), 0.0, str(exc))
            continue
        for i, done in zip(indices, work, strict=True):
            if done.digitization is not None:
                answers[i] = (np.asarray(done.digitization.signals), done.seconds, None)
            else:
                answers[i] = (np.full_like(jobs[i].reference, np.nan), done.seconds, done.error)
    for index in range(len(jobs)):
        results.append(answers[index])
    return results


def _db(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else ("inf" if value > 0 else "n/a")


def render(report: BenchReport) -> list[Any]:
    """The rich tables that ``cardioscan bench`` prints."""
    from rich.table import Table

    summary = Table(title="CardioScan bench", show_header=True)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    rows = [
        ("set", report.set_name),
        ("images", str(len(report.outcomes))),
        ("failures", str(report.failures)),
        ("Kaggle dB", _db(report.score.kaggle_db)),
        ("Challenge dB", _db(report.score.challenge_db)),
        ("median s / image", f"{report.median_seconds:.3f}"),
        ("images / s", f"{report.images_per_second:.3f}"),
        ("peak memory MB", f"{report.peak_memory_bytes / 2**20:.0f}"),
        ("engine / device / batch", f"{report.engine} / {report.device} / {report.batch}"),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    per_lead = Table(title="dB per lead", show_header=True)
    half = len(LEADS) // 2
    for _ in range(2):
        per_lead.add_column("lead")
        per_lead.add_column("dB", justify="right")
    for limb, chest in zip(LEADS[:half], LEADS[half:], strict=True):
        per_lead.add_row(limb, _db(report.score.per_lead_db[limb]),
                         chest, _db(report.score.per_lead_db[chest]))
    tables: list[Any] = [summary, per_lead]
    failed = [o for o in report.outcomes if o.error is not None]
    if failed:
        failures = Table(title="failures", show_header=True)
        failures.add_column("image")
        failures.add_column("reason")
        for outcome in failed:
            failures.add_row(outcome.name, outcome.error)
        tables.append(failures)
    return tables


def run_bench(
    set_: str,
    *,
    n: int | None = None,
    device: str = "cpu",
    engine: str = "auto",
    batch: int = 1,
    json_path: Path | None = None,
    target: str | None = None,
) -> int:
    """Run the bench, print its tables and write ``json_path``; returns the exit status."""
    from rich.console import Console

    if n is not None and n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if batch < 1:
        print("error: --batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = bench(set_, n=n, device=device, engine=engine, batch=batch, target=target)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    console = Console()
    for table in render(report):
        console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return EXIT_OK
