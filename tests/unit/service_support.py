"""Test kit for the service tests: a stand-in digitizer, marked pictures, settings, databases,
and ``cardioscan serve`` as a child process.

The stand-in runs where the real one would — inside the worker's digitizer child process,
named by ``CARDIOSCAN_ENGINE=service_support:digitize`` (this folder on ``PYTHONPATH``). The
real digitizer stays the default; this one only answers fast and predictably. Pixel (0, 0)
of a picture holds ``[id // 256, id % 256, behaviour]`` (see :func:`marked`).
``CARDIOSCAN_FAKE_LOG`` names a file that gets ``start <id>`` and ``end <id>`` lines
(O_APPEND, so processes do not interleave), and ``CARDIOSCAN_FAKE_SLEEP`` delays behaviour
SLOW pages, so tests can see how often each picture was digitized and kill a worker mid-job.
With ``CARDIOSCAN_FAKE_TRUTH`` set, the signals are ``<dir>/<id>.npy`` delayed by
``CARDIOSCAN_FAKE_SHIFT`` samples (the bench test's "truth, shifted"); that file is test
scaffolding playing a perfect reader, not ground truth fed to a real digitizer.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from pipeline.errors import DigitizationError, DigitizationTimeout, NoGridError, NotAnECGError
from pipeline.leads import LEADS
from pipeline.result import Box, Digitization, Metrics

if TYPE_CHECKING:
    from service.store import JobStore

OK, NO_GRID, HANG, CRASH, SLOW = 0, 1, 2, 3, 4
WRAPPED_BUG, TIMEOUT, NOT_ECG_ODD_TEXT = 5, 6, 7
"""Failures whose text says the opposite of their type: a bug wrapped the way the real
digitizer wraps one, a time limit, and a final "not an ECG" worded like a timeout."""
UNPICKLABLE = 8
"""A result that cannot be passed back from the digitizer child process."""
SECONDS = 2.5
"""Length of the stand-in's record (one column of a 3x4 page): small results, fast tests."""
ENGINE = "service_support:digitize"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PG_ADMIN_URL = os.environ.get("CARDIOSCAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _log(event: str, ident: int) -> None:
    path = os.environ.get("CARDIOSCAN_FAKE_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {ident} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def marked(image: np.ndarray, ident: int, behaviour: int = OK) -> np.ndarray:
    """``image`` (RGB uint8) with the stand-in's instruction pixel set."""
    image = image.copy()
    image[0, 0] = (ident // 256, ident % 256, behaviour)
    return image


def shifted(signals: np.ndarray, shift: int) -> np.ndarray:
    """Delay every lead by ``shift`` samples; samples shifted in are NaN."""
    out = np.full_like(signals, np.nan)
    if shift >= 0:
        out[shift:] = signals[: signals.shape[0] - shift]
    else:
        out[:shift] = signals[-shift:]
    return out


def digitize(image_rgb: np.ndarray, *, fs: int = 500, engine: str = "auto",
             qa: bool = True) -> Digitization:
    """A fast, predictable digitizer: a sine whose amplitude encodes the picture's id."""
    ident = int(image_rgb[0, 0, 0]) * 256 + int(image_rgb[0, 0, 1])
    behaviour = int(image_rgb[0, 0, 2])
    _log("start", ident)
    if behaviour == NO_GRID:
        raise NoGridError()
    if behaviour == HANG:
        time.sleep(3600)
    if behaviour == CRASH:
        os._exit(3)
    if behaviour == SLOW:
        time.sleep(float(os.environ.get("CARDIOSCAN_FAKE_SLEEP", "2")))
    if behaviour == WRAPPED_BUG:
        try:
            _ = 1 / 0
        except ZeroDivisionError as exc:
            raise DigitizationError("no lead could be read from the traces") from exc
    if behaviour == TIMEOUT:
        raise DigitizationTimeout("no ECG grid found before the time limit")
    if behaviour == NOT_ECG_ODD_TEXT:
        raise NotAnECGError("timed out after looking: internal error: not an ECG")
    truth_dir = os.environ.get("CARDIOSCAN_FAKE_TRUTH")
    if truth_dir:
        signals = shifted(np.load(Path(truth_dir) / f"{ident}.npy"),
                          int(os.environ.get("CARDIOSCAN_FAKE_SHIFT", "0")))
    else:
        n = int(SECONDS * fs)
        t = np.arange(n) / fs
        signals = np.repeat((0.001 * (ident + 1) * np.sin(2 * np.pi * 1.2 * t))[:, None],
                            len(LEADS), axis=1)
        signals[: n // 4, 6:] = np.nan
    dig = Digitization(
        signals=signals, fs=fs, layout="3x4+1", paper_speed_mm_s=25.0, gain_mm_mv=10.0,
        px_per_mm=8.0, grid_confidence=0.9, confidence={lead: 0.8 for lead in LEADS},
        lead_boxes={lead: Box(0.1, 0.05 * i, 0.3, 0.05 * i + 0.05)
                    for i, lead in enumerate(LEADS)},
        metrics=Metrics(hr_bpm=72.0, rr_ms=833.3), engine=f"fake-{engine}",
        qa_images={"overlay": image_rgb.copy()} if qa else {},
        stage_seconds={"fake": 0.001},
    )
    if behaviour == UNPICKLABLE:
        dig.stage_seconds = {"fake": lambda: 0.0}  # type: ignore[dict-item]
    _log("end", ident)
    return dig


def page_png(ident: int, behaviour: int = OK, size: int = 24) -> bytes:
    """A small PNG the stand-in digitizer reads its instructions from."""
    from PIL import Image

    rgb = np.full((size, size, 3), 255, np.uint8)
    rgb[size // 2, :] = 0
    buf = io.BytesIO()
    Image.fromarray(marked(rgb, ident, behaviour)).save(buf, format="PNG")
    return buf.getvalue()


def log_counts(path: Path, event: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            kind, ident, _pid = line.split()
            if kind == event:
                counts[int(ident)] = counts.get(int(ident), 0) + 1
    return counts


def settings_env(data_dir: Path, *, engine: str | None = ENGINE, **extra: Any) -> dict[str, str]:
    """Environment for a ``cardioscan`` subprocess: embedded store in ``data_dir``, the
    stand-in digitizer (``engine=None``: the real one, or the one ``$CARDIOSCAN_ENGINE``
    names), fast polling, no free-space floor; ``extra`` as ``CARDIOSCAN_<KEY>`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDIOSCAN_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "CARDIOSCAN_DATA_DIR": str(data_dir),
        "CARDIOSCAN_POLL_SECONDS": "0.1",
        "CARDIOSCAN_SPOOL_MIN_FREE_BYTES": "0",
        "CARDIOSCAN_BACKOFF_BASE_SECONDS": "0.1",
        "CARDIOSCAN_LOG_JSON": "true",
    })
    engine = engine or os.environ.get("CARDIOSCAN_ENGINE")
    if engine:
        env["CARDIOSCAN_ENGINE"] = engine
    env.update({f"CARDIOSCAN_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def cardioscan(*args: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``cardioscan ARGS`` in its own process group (so a test can kill all of it)."""
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1, *, context: Callable[[], str] | None = None) -> Any:
    """``predicate()``'s first truthy value; after ``timeout`` s an AssertionError naming
    ``what`` (followed by ``context()``, e.g. the tail of a service's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = f"\n{context()}" if context is not None else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")


class ServeProcess:
    """``cardioscan serve`` as a hospital runs it: a child process group on free ports with a
    fresh data directory under ``root``, configured by ``settings`` (``CARDIOSCAN_<KEY>``
    variables, see :func:`settings_env`) and, if given, a YAML ``config`` file."""

    def __init__(self, root: Path, *, engine: str | None = ENGINE, config: Path | None = None,
                 dicom_port: int | None = None, **settings: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.data_dir = root / "var"
        self.log = root / "serve.log"
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.env = settings_env(self.data_dir, engine=engine, http__port=self.http_port,
                                dicom__port=self.dicom_port, **settings)
        self.args = ["serve", *(["--config", str(config)] if config is not None else [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, ready: Callable[[], bool] | None = None) -> None:
        """Start it; return once ``/readyz`` answers 200 (and ``ready()`` holds)."""
        self.proc = cardioscan(*self.args, env=self.env, log_path=self.log)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
            return ready is None or ready()

        try:
            wait_for(up, timeout, "cardioscan serve to be ready", interval=0.2,
                     context=self.output)
        except BaseException:
            self.kill()
            raise

    def output(self, chars: int = 6000) -> str:
        """The tail of the service's log (for assertion messages)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to every process, as an init system stops it; SIGKILL after ``timeout``.
        The main process's exit status, or None when it had to be killed."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """``kill -9`` of every process of the service (whatever is left of it)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def group_gone(self) -> bool:
        """Whether every process of the service has exited."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def store(self) -> JobStore:
        """The service's job store, opened from the test (close it after use)."""
        from service.config import load_settings
        from service.store import JobStore

        return JobStore(load_settings(data_dir=self.data_dir, spool_min_free_bytes=0),
                        migrate=False)


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database on loopback for one test; dropped afterwards."""
    import psycopg

    name = f"cardioscan_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
