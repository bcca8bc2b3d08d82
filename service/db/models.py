"""The job store's tables (SQLAlchemy 2 declarative models).

Every time is UTC. ``received_objects.source_meta`` holds PHI (patient and study attributes):
it stays in the database and is never logged; ``source_id`` (a SOP Instance UID or a
``sha256:`` digest) and the row ids are safe to log.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql import Select


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigId = BigInteger().with_variant(Integer, "sqlite")
"""An autoincrementing 64-bit key (SQLite only autoincrements INTEGER PRIMARY KEY)."""


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """Permanent failure with a reason (e.g. no ECG in the picture); not retried."""
    DEAD = "dead"
    """Transient failures exhausted the attempts; an operator may retry."""
    ALL = (QUEUED, RUNNING, DONE, FAILED, DEAD)
    TERMINAL = (DONE, FAILED, DEAD)


class DeliveryState:
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    """The last attempt failed; another is due at ``next_try_at``."""
    DEAD = "dead"
    ALL = (PENDING, SENDING, DONE, FAILED, DEAD)
    TERMINAL = (DONE, DEAD)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class ReceivedObject(Base):
    """One object as it arrived, durably in the spool."""

    __tablename__ = "received_objects"
    __table_args__ = (Index("ix_received_objects_received_at", "received_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    source_id: Mapped[str] = mapped_column(String(128), unique=True)
    route: Mapped[str] = mapped_column(String(16))
    media_type: Mapped[str] = mapped_column(String(127))
    caller: Mapped[str | None] = mapped_column(String(255))
    spool_path: Mapped[str] = mapped_column(String(512))
    """Relative to the spool directory."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    source_meta: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]
    purged_at: Mapped[datetime | None]


class Job(Base):
    """The digitization of one received object."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_next_try_at", "state", "next_try_at"),
        Index("ix_jobs_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    received_id: Mapped[str] = mapped_column(ForeignKey("received_objects.id"), unique=True)
    route: Mapped[str] = mapped_column(String(16))
    source_id: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    outputs: Mapped[list[Any]]
    pages: Mapped[int | None] = mapped_column(Integer)
    engine: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]

    received: Mapped[ReceivedObject] = relationship()
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="job", order_by="Delivery.destination", lazy="selectin"
    )


class Delivery(Base):
    """The outbox: one row per destination per finished job."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", name="uq_deliveries_job_destination"),
        Index("ix_deliveries_state_next_try_at", "state", "next_try_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    remote_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    """Who sent what and when, what was produced and where it went."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_recorded_at", "recorded_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(255))
    route: Mapped[str | None] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    source_id: Mapped[str | None] = mapped_column(String(128))
    destination: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]]


class Purge(Base):
    """One retention run: what it removed."""

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    cutoff: Mapped[datetime]
    jobs: Mapped[int] = mapped_column(Integer)
    spool_files: Mapped[int] = mapped_column(Integer)
    result_dirs: Mapped[int] = mapped_column(Integer)
    bytes_freed: Mapped[int] = mapped_column(BigInteger)


_Query = TypeVar("_Query", bound=Select[Any])


def where_given(query: _Query, **columns: Any) -> _Query:
    """``query`` narrowed to the rows whose named columns equal the given values; a value
    left empty (None, "") does not narrow it. The API's and the CLI's optional filters."""
    given = {name: value for name, value in columns.items() if value}
    return query.filter_by(**given) if given else query
