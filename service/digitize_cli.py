"""``cardioscan digitize``: pictures in, WFDB / JSON / CSV records out.

Scripts depend on its contract: one ``IMAGE: reason`` line on stderr per failed picture,
the other pictures still processed, exit status 1 if any failed (2 for bad options).
Each picture is decoded and digitized in a killable child process with a time limit.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.result_json import to_response
from adapters.wfdb_io import record_stem, write_csv, write_record
from pipeline.result import Digitization
from service.digitize_worker import DigitizerWorker, WorkerStartError

FORMATS = ("wfdb", "json", "csv")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_formats(text: str) -> list[str]:
    """``"wfdb,json"`` -> ``["wfdb", "json"]``; raises ValueError naming an unknown one."""
    chosen: list[str] = []
    for item in text.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in FORMATS:
            raise ValueError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no output format given (choose from {', '.join(FORMATS)})")
    return chosen


def _write_json(document: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def write_outputs(dig: Digitization, out: Path, stem: str, formats: Sequence[str]) -> None:
    """Write ``out/<stem>.*`` in each of ``formats``."""
    if "wfdb" in formats:
        write_record(dig, out, stem)
    if "json" in formats:
        _write_json(to_response(dig, include_images=False), out / f"{stem}.json")
    if "csv" in formats:
        write_csv(dig, out / f"{stem}.csv")


class _Reporter:
    """Failure lines on stderr; a rich progress bar too when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self._progress = None
        self._task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )
            self._task = self._progress.add_task("digitizing", total=total)

    def __enter__(self) -> _Reporter:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def working_on(self, name: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=name)

    def done(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def failed(self, image: Path, reason: str) -> None:
        line = f"{image}: {reason}"
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr, flush=True)


def run_digitize(
    images: Sequence[Path],
    out: Path,
    *,
    fs: int = 500,
    formats: str = "wfdb,json",
    engine: str = "auto",
    timeout_s: float = 60.0,
    target: str | None = None,
) -> int:
    """Digitize each picture into ``out``; returns the process exit status."""
    try:
        chosen = parse_formats(formats)
        if fs <= 0:
            raise ValueError("--fs must be a positive number of Hz")
        if timeout_s <= 0:
            raise ValueError("--timeout must be positive")
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    failures = 0
    used_stems: dict[str, Path] = {}
    with DigitizerWorker(engine=engine, target=target) as worker, _Reporter(len(images)) as report:
        for image in images:
            report.working_on(image.name)
            reason = _digitize_one(image, out, fs, timeout_s, chosen, worker, used_stems)
            if reason is not None:
                failures += 1
                report.failed(image, reason)
            report.done()
    return EXIT_FAILED if failures else EXIT_OK


def _digitize_one(
    image: Path,
    out: Path,
    fs: int,
    timeout_s: float,
    formats: Sequence[str],
    worker: DigitizerWorker,
    used_stems: dict[str, Path],
) -> str | None:
    """Digitize and write one picture; the one-line reason if that failed."""
    stem = record_stem(image.stem)
    if stem in used_stems:
        return f"output name {stem!r} is already taken by {used_stems[stem]}"
    try:
        data = image.read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    try:
        result = worker.run(data, fs=fs, timeout_s=timeout_s)
    except WorkerStartError as exc:
        return str(exc)
    if result.digitization is None:
        return result.error or "digitization failed"
    try:
        write_outputs(result.digitization, out, stem, formats)
    except (OSError, ValueError) as exc:
        return f"cannot write output: {exc}"
    used_stems[stem] = image
    return None
