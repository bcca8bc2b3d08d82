"""``cardioscan serve`` and ``cardioscan worker``: processes, signals, graceful shutdown.

``serve`` runs, in one process group: the HTTP API (uvicorn: REST, FHIR, viewer, health,
metrics) and the DICOM listener in the main process, and ``workers`` worker processes
under a supervisor that restarts any that die. ``worker`` runs only the supervised worker
processes (scale-out nodes), with /metrics on ``metrics_port`` if set.

Shutdown on SIGTERM or SIGINT: stop accepting (HTTP and DICOM close first), then each
worker finishes the jobs in hand (up to ``shutdown_grace_seconds``) and gives back what it
has not started; a worker still busy after the grace period is killed and its leases are
released at once. Anything accepted is already durable, so even ``kill -9`` loses nothing:
the jobs are claimed again when their leases expire.

This module imports only the standard library and the configuration at load time, so that
``PROMETHEUS_MULTIPROC_DIR`` is set before anything imports prometheus_client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from service.config import Settings, load_settings_or_report

if TYPE_CHECKING:
    from service.store import JobStore

log = logging.getLogger("service.runtime")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_BACKOFF_MAX_S = 60.0
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILURE = 1


class _StartupError(Exception):
    """The node cannot start; the reason is already said, ``code`` is the exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _prepare_metrics_dir(settings: Settings) -> None:
    """A fresh multi-process metrics directory for this node (before prometheus import)."""
    if os.environ.get(MULTIPROC_ENV):
        Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)
        return
    path = settings.data_dir.resolve() / "run" / f"metrics-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)


def _cleanup_metrics_dir() -> None:
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).name == f"metrics-{os.getpid()}":
        shutil.rmtree(path, ignore_errors=True)


class _Stop:
    """SIGTERM/SIGINT set an event instead of raising."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.event.is_set():
            log.info("received %s; shutting down", signal.Signals(signum).name)
        self.event.set()


# Worker processes ---------------------------------------------------------------------------

def worker_process_main(settings: Settings, index: int) -> None:
    """Entry point of one worker process (spawned by the supervisor)."""
    from service.observability import configure_logging
    from service.workers import Worker

    configure_logging(settings)
    stop = _Stop()
    stop.install()
    Worker(settings, index=index).run(stop.event)


class WorkerSupervisor:
    """Starts ``count`` worker processes, restarts those that die, stops them gracefully."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._failures: dict[int, int] = {}

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        self._thread.start()

    def _spawn(self, index: int) -> None:
        p = self._ctx.Process(target=worker_process_main, args=(self.settings, index),
                              name=f"cardioscan-worker-{index}", daemon=False)
        p.start()
        self._procs[index] = p
        log.info("worker process %d started (pid %s)", index, p.pid)

    def _owner(self, index: int, pid: int | None) -> str:
        import socket

        return f"{socket.gethostname()}:{pid}:{index}"

    def _after_exit(self, index: int, proc: Any) -> None:
        """A worker process is gone: free its leases now rather than at lease expiry."""
        from service.observability import mark_process_dead
        from service.store import JobStore

        with contextlib.suppress(Exception):
            mark_process_dead(proc.pid)
        try:
            store = JobStore(self.settings, migrate=False)
            try:
                n = store.release_owner(self._owner(index, proc.pid))
            finally:
                store.close()
            if n:
                log.warning("released %d leases of worker process %d", n, index)
        except Exception:
            log.exception("could not release the leases of worker process %d", index)

    def _watch(self) -> None:
        next_start: dict[int, float] = {}
        while not self._stopping.wait(1.0):
            for index, proc in list(self._procs.items()):
                if proc is None:
                    if time.monotonic() >= next_start.get(index, 0.0):
                        self._spawn(index)
                    continue
                if proc.is_alive():
                    continue
                if self._stopping.is_set():
                    return
                log.error("worker process %d exited with code %s; restarting", index,
                          proc.exitcode)
                self._after_exit(index, proc)
                self._failures[index] = self._failures.get(index, 0) + 1
                delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** (self._failures[index] - 1))
                next_start[index] = time.monotonic() + delay
                self._procs[index] = None

    def stop(self) -> None:
        """SIGTERM every worker, wait the grace period, kill stragglers, free their leases."""
        self._stopping.set()
        procs = {i: p for i, p in self._procs.items() if p is not None}
        for p in procs.values():
            if p.is_alive() and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        for index, p in procs.items():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker process %d did not stop in time; killing it", index)
                p.kill()
                p.join(5)
            self._after_exit(index, p)


# Commands -------------------------------------------------------------------------------------

def run_serve(config_path: Path | None) -> int:
    """``cardioscan serve``: HTTP + FHIR + DICOM listener + workers on this node."""
    try:
        settings = _configure(config_path)
        _warn_if_open(settings)
        store = _open_store(settings)
    except _StartupError as exc:
        return exc.code

    import uvicorn

    from service.api.app import create_app

    stop = _Stop()
    stop.install()
    supervisor = WorkerSupervisor(settings, settings.workers)
    listener = None
    code = 0
    try:
        try:  # take both ports before anything starts, and say plainly when one is taken
            http_socket = bind_http(settings)
            listener = _start_listener(settings, store)
        except OSError as exc:
            log.error("%s", exc.strerror or exc)
            return EXIT_STARTUP_FAILURE
        supervisor.start()
        tls = settings.http.tls
        config = uvicorn.Config(
            create_app(settings, store), host=settings.http.host, port=settings.http.port,
            log_config=None, access_log=False, lifespan="on",
            ssl_certfile=str(tls.cert_file) if tls.enabled else None,
            ssl_keyfile=str(tls.key_file) if tls.enabled else None,
            ssl_ca_certs=str(tls.ca_file) if tls.enabled and tls.ca_file else None,
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        )
        server = uvicorn.Server(config)
        log.info("HTTP on %s", settings.http.base_url)
        if not stop.event.is_set():
            server.run(sockets=[http_socket])  # returns on SIGTERM/SIGINT (re-raised to _Stop)
        if not server.started:
            code = 1
    except SystemExit as exc:  # uvicorn exits when it cannot start
        code = int(exc.code or 1) if not isinstance(exc.code, str) else 1
    finally:
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.shutdown()
                log.info("DICOM listener stopped")
        _shut_down(supervisor, store)
    return code


def _configure(config_path: Path | None) -> Settings:
    """Settings, this node's metrics directory and logging; :class:`_StartupError` after
    saying why when the configuration is bad or ``data_dir`` cannot be written."""
    settings = load_settings_or_report(config_path)
    if settings is None:
        raise _StartupError(EXIT_CONFIG_ERROR)
    try:
        _prepare_metrics_dir(settings)
    except OSError as exc:  # data_dir missing or not writable: nothing can be kept
        print(f"cardioscan: cannot write under data_dir {settings.data_dir}: "
              f"{exc.strerror or exc} ({exc.filename})", file=sys.stderr)
        raise _StartupError(EXIT_STARTUP_FAILURE) from exc

    from service.observability import configure_logging

    configure_logging(settings)
    return settings


def _open_store(settings: Settings) -> JobStore:
    """The job store, migrated (once, before any worker starts); :class:`_StartupError`
    after one clear log line when it cannot be opened."""
    from service.db.engine import error_reason, shown_url
    from service.store import JobStore

    try:
        return JobStore(settings)
    except Exception as exc:  # database down, bad URL, spool not writable
        log.error("cannot open the job store (%s, spool %s): %s", shown_url(settings.db_url),
                  settings.spool_path, error_reason(exc))
        raise _StartupError(EXIT_STARTUP_FAILURE) from exc


def _shut_down(supervisor: WorkerSupervisor, store: JobStore) -> None:
    """Stop this node's workers gracefully, then close the store and the metrics files."""
    supervisor.stop()
    store.close()
    _cleanup_metrics_dir()
    log.info("stopped")


def port_problem(what: str, host: str, port: int, key: str, exc: OSError) -> OSError:
    """``exc`` reworded for an operator: which port, why, and which setting changes it."""
    if exc.errno == errno.EADDRINUSE:
        why = (f"{what} port {port} on {host} is already in use (another CardioScan, a PACS "
               f"or an old process?); stop it, or choose another port with {key}")
    elif exc.errno == errno.EACCES:
        why = (f"no permission to listen on {what} port {port} (ports below 1024 need "
               f"privileges); choose another port with {key}")
    elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        why = f"cannot listen on {host}:{port}: {host} is not an address of this machine"
    else:
        why = f"cannot listen on {what} port {host}:{port}: {exc.strerror or exc}"
    return OSError(exc.errno, why)


def bind_http(settings: Settings) -> socket.socket:
    """The HTTP listening socket, bound (uvicorn listens on it); raises a clear OSError."""
    host, port = settings.http.host, settings.http.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise port_problem("HTTP", host, port, "http.port (CARDIOSCAN_HTTP__PORT)", exc) from exc
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0])).is_loopback for i in infos)


def _warn_if_open(settings: Settings) -> None:
    """Say loudly when the API is reachable from the network by anyone."""
    if settings.http.auth == "none" and not is_loopback(settings.http.host):
        log.warning(
            "HTTP API on %s:%d has NO authentication: anyone who can reach it can send ECGs "
            "and read results (PHI). Configure http.api_keys (e.g. CARDIOSCAN_HTTP__API_KEYS="
            "'[{\"name\": \"mirth\", \"key\": \"<32+ random chars>\"}]') or bind "
            "http.host to 127.0.0.1 behind an authenticating proxy.",
            settings.http.host, settings.http.port)


def _start_listener(settings: Settings, store: Any) -> Any:
    if not settings.dicom.enabled:
        return None
    try:
        from service.dicom_listener import start_listener
    except ModuleNotFoundError as exc:
        if exc.name and "service.dicom_listener".startswith(exc.name):
            log.warning("DICOM listener not installed; serving HTTP only")
            return None
        raise
    try:
        return start_listener(settings, store)
    except OSError as exc:
        raise port_problem("DICOM", settings.dicom.host, settings.dicom.port,
                           "dicom.port (CARDIOSCAN_DICOM__PORT), or dicom.enabled: false",
                           exc) from exc


def run_worker(config_path: Path | None) -> int:
    """``cardioscan worker``: worker processes only, for scale-out."""
    try:
        settings = _configure(config_path)
        store = _open_store(settings)
    except _StartupError as exc:
        return exc.code
    stop = _Stop()
    stop.install()
    if settings.metrics_port:
        _serve_metrics(settings, store)
    supervisor = WorkerSupervisor(settings, max(1, settings.workers))
    try:
        supervisor.start()
        stop.event.wait()
    finally:
        _shut_down(supervisor, store)
    return 0


def _serve_metrics(settings: Settings, store: Any) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    from service.observability import GpuCollector, QueueCollector

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueCollector(store))
    registry.register(GpuCollector())
    start_http_server(settings.metrics_port or 0, addr=settings.http.host, registry=registry)
    log.info("metrics on %s:%s/metrics", settings.http.host, settings.metrics_port)
