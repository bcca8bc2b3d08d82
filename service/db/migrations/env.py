"""Alembic environment: runs on the connection :func:`service.db.migrate.upgrade` passes in."""

from __future__ import annotations

from alembic import context

from service.db.engine import make_engine
from service.db.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # e.g. `alembic revision --autogenerate` by a developer
    url = config.get_main_option("sqlalchemy.url") or "sqlite:///var/cardioscan.db"
    with make_engine(url).begin() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
