"""Run the digitizer in a child process that can be killed: per-image time limits that hold.

A hung OpenCV call or a runaway allocation cannot be interrupted from inside its own
process, so the CLI and the bench hand each picture to a long-lived child (started with
``spawn``, so it shares no locks or threads with the caller) and wait with a deadline.
Past the deadline the child is killed and a fresh one starts for the next picture. The
child also reports its peak resident memory, which is the bench's memory figure. Ground
truth never crosses into the child: it receives picture bytes or pixels, nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.result import Digitization

DEFAULT_TARGET = "pipeline.digitizer:digitize"
"""``module:function`` the child calls; tests point it at a fake."""
STARTUP_TIMEOUT_S = 300.0
"""Importing the digitizer (torch, weights) may take a while on a cold disk; not per image."""

Payload = bytes | np.ndarray
"""An encoded file (decoded in the child, first page of a PDF) or RGB uint8 pixels."""


@dataclass(frozen=True)
class WorkResult:
    """What happened to one picture."""

    digitization: Digitization | None
    error: str | None
    """One-line reason when ``digitization`` is None."""
    seconds: float
    """Decode plus digitize time inside the child (the limit, for a timeout)."""
    retryable: bool = False
    """For a failure: another attempt may succeed (time limit, crash, out of memory, a bug);
    False when the picture is at fault (not an ECG, no grid, unreadable). See
    :func:`service.errors.is_transient`."""


class WorkerStartError(RuntimeError):
    """The digitizer could not be loaded; every picture would fail the same way."""


def _peak_rss_bytes() -> int:
    """Peak resident set of this process: ``VmHWM``, which starts afresh at exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _attempt(work: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", work(...))``, or ``("error" | "transient", one-line reason)`` for a failure
    that is final or that another attempt may get past."""
    from pipeline.errors import DigitizationError
    from service.errors import is_transient

    try:
        return "ok", work(*args, **kwargs)
    except Exception as exc:
        if isinstance(exc, DigitizationError):
            reason = _one_line(str(exc)) or type(exc).__name__
        elif isinstance(exc, MemoryError):
            reason = "out of memory while digitizing"
        else:
            reason = _one_line(f"internal error: {type(exc).__name__}: {exc}")
        return ("transient" if is_transient(exc) else "error"), reason


def _first_page(data: bytes) -> np.ndarray:
    from adapters.images import load_pages

    return load_pages(data, max_pages=1)[0]


def _answer(
    payloads: list[Payload],
    fs: float,
    digitize: Callable[..., Digitization],
    batch_fn: Callable[..., list[Digitization]] | None,
    extra: dict[str, Any],
) -> list[tuple[str, Any]]:
    """Decode and digitize each payload; one ``(kind, value)`` answer per payload."""
    answers = [
        _attempt(_first_page, p) if isinstance(p, bytes) else ("ok", p) for p in payloads
    ]
    ready = [i for i, (kind, _) in enumerate(answers) if kind == "ok"]
    if batch_fn is not None and len(ready) > 1:
        kind, value = _attempt(batch_fn, [answers[i][1] for i in ready], fs=fs, **extra)
        for n, i in enumerate(ready):
            answers[i] = ("ok", value[n]) if kind == "ok" else (kind, value)
    else:
        for i in ready:
            answers[i] = _attempt(digitize, answers[i][1], fs=fs, **extra)
    return answers


def _child_main(conn: Connection, target: str, engine: str, device: str | None, qa: bool) -> None:
    """The child's loop: import the digitizer, then answer one request at a time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        module_name, _, func_name = target.partition(":")
        module = importlib.import_module(module_name)
        digitize = getattr(module, func_name)
        batch_fn = getattr(module, f"{func_name}_batch", None)
        accepts_device = "device" in inspect.signature(digitize).parameters
        import adapters.images  # noqa: F401 - load the decoders before the first picture
    except BaseException as exc:  # report anything, even SystemExit from a bad import
        conn.send(("fatal", _one_line(f"{type(exc).__name__}: {exc}")))
        return
    conn.send(("ready", {"accepts_device": accepts_device, "batch": batch_fn is not None}))
    extra: dict[str, Any] = {"engine": engine, "qa": qa}
    if accepts_device and device is not None:
        extra["device"] = device

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        payloads, fs = request
        started = time.perf_counter()
        answers = _answer(payloads, fs, digitize, batch_fn, extra)
        seconds = (time.perf_counter() - started) / max(len(payloads), 1)
        try:
            conn.send((answers, seconds, _peak_rss_bytes()))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            reason = _one_line(f"internal error: result cannot be passed back: {exc}")
            conn.send(([("transient", reason)] * len(payloads), seconds, _peak_rss_bytes()))


class DigitizerWorker:
    """A killable child process that digitizes pictures one request at a time.

    Use as a context manager; :meth:`run` starts the child on first use and again after a
    timeout or crash.
    """

    def __init__(
        self,
        *,
        engine: str = "auto",
        device: str | None = None,
        qa: bool = False,
        target: str | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self._engine = engine
        self._device = device
        self._qa = qa
        self._target = target or DEFAULT_TARGET
        self._startup_timeout_s = startup_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._peak_rss = 0
        self.info: dict[str, Any] = {}
        """What the child reported at start: ``accepts_device``, ``batch``."""
        self.startup_seconds = 0.0
        """Time spent starting children (imports, weights), over all restarts."""
        self.restarts = 0
        self._start_error: WorkerStartError | None = None

    @property
    def peak_rss_bytes(self) -> int:
        """Largest peak resident memory of any child so far."""
        return self._peak_rss

    def __enter__(self) -> DigitizerWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the child and wait until the digitizer is imported."""
        if self._process is not None:
            return
        if self._start_error is not None:
            raise self._start_error
        try:
            self._start()
        except WorkerStartError as exc:
            self._start_error = exc  # the next picture would fail the same way: fail fast
            raise

    def _start(self) -> None:
        started = time.perf_counter()
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main,
            args=(child_conn, self._target, self._engine, self._device, self._qa),
            name="cardioscan-digitizer",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._process, self._conn = process, parent_conn
        try:
            if not parent_conn.poll(self._startup_timeout_s):
                raise WorkerStartError(
                    f"digitizer did not start within {self._startup_timeout_s:g} s"
                )
            kind, detail = parent_conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise WorkerStartError(f"digitizer process exited while starting ({exc})") from exc
        except WorkerStartError:
            self._kill()
            raise
        finally:
            self.startup_seconds += time.perf_counter() - started
        if kind != "ready":
            self._kill()
            raise WorkerStartError(f"digitizer unavailable: {detail}")
        self.info = detail

    def run(self, payload: Payload, *, fs: float, timeout_s: float) -> WorkResult:
        """Digitize one picture within ``timeout_s`` seconds."""
        return self.run_batch([payload], fs=fs, timeout_s=timeout_s)[0]

    def run_batch(
        self, payloads: list[Payload], *, fs: float, timeout_s: float
    ) -> list[WorkResult]:
        """Digitize pictures together (batched when the digitizer can); ``timeout_s`` each."""
        if self._process is None:
            if self.info:
                self.restarts += 1
            self.start()
        conn = self._conn
        assert conn is not None
        limit = timeout_s * len(payloads)
        try:
            conn.send((payloads, fs))
            if conn.poll(limit):
                answers, seconds, peak = conn.recv()
                self._peak_rss = max(self._peak_rss, int(peak))
                return [
                    WorkResult(value if kind == "ok" else None,
                               None if kind == "ok" else str(value), float(seconds),
                               retryable=kind == "transient")
                    for kind, value in answers
                ]
            reason = f"timed out after {timeout_s:g} s"
            seconds = timeout_s
        except (EOFError, OSError):
            self._process.join(timeout=1)
            reason = f"digitizer process died (exit code {self._process.exitcode})"
            seconds = 0.0
        self._kill()
        return [WorkResult(None, reason, seconds, retryable=True) for _ in payloads]

    def _kill(self) -> None:
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
            with contextlib.suppress(ValueError):
                process.close()

    def close(self) -> None:
        """Ask the child to finish, and kill it if it does not."""
        process, conn = self._process, self._conn
        if process is None:
            return
        if conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
        process.join(timeout=2)
        self._kill()
