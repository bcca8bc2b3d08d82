"""Fixtures shared by every test folder (the test kits themselves live in tests/unit)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import ServeProcess


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve_process(timeout=60, ready=None, **settings)``: ``cardioscan serve`` started
    and ready (see :class:`service_support.ServeProcess`); killed after the test."""
    started: list[ServeProcess] = []

    def start(*, timeout: float = 60.0, ready: Callable[[], bool] | None = None,
              **settings: Any) -> ServeProcess:
        service = ServeProcess(tmp_path / f"serve-{len(started)}", **settings)
        started.append(service)
        service.start(timeout, ready)
        return service

    yield start
    for service in started:
        service.kill()
