"""Database engine and sessions, with the SQLite settings a durable multi-process queue needs.

SQLite: WAL (readers never block the writer), ``synchronous=FULL`` (a committed accept
survives power loss), a long busy timeout, and every transaction opened with
``BEGIN IMMEDIATE`` so that a read-then-write transaction (a claim) takes the write lock
up front instead of failing to upgrade. Read-only sessions use a plain ``BEGIN``.
PostgreSQL: psycopg 3, pre-ping, default READ COMMITTED; claims use ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BEGIN_OPTION = "cardioscan_sqlite_begin"


def shown_url(url: str) -> str:
    """``url`` as it may appear in logs and messages: the password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def error_reason(exc: BaseException) -> str:
    """One line for a database error: its type and the driver's words, without the SQL
    statement SQLAlchemy appends (it may hold patient data)."""
    text = str(getattr(exc, "orig", None) or exc)
    return f"{type(exc).__name__}: {' '.join(text.split())[:300]}"


def normalize_url(url: str) -> URL:
    """Parse ``url``; a bare ``postgresql://`` means the psycopg 3 driver we ship."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str, **kwargs: Any) -> Engine:
    u = normalize_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, **kwargs)
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        **kwargs,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        _set_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _set_wal(cur: Any) -> None:
    """Switch to WAL (persistent in the file). Two processes creating a new database at once
    can get "locked" here without SQLite's busy handler being called, so retry briefly."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def session_factories(engine: Engine) -> tuple[sessionmaker[Session], sessionmaker[Session]]:
    """(read-write, read-only) session makers; they differ only on SQLite's BEGIN mode."""
    rw = sessionmaker(engine, expire_on_commit=False)
    ro = sessionmaker(engine.execution_options(**{_BEGIN_OPTION: "DEFERRED"}),
                      expire_on_commit=False)
    return rw, ro


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
