"""Operator commands: ``cardioscan status``, ``cardioscan retry``, ``cardioscan config show``."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console
from rich.table import Table

from service.config import Settings, load_settings_or_report

if TYPE_CHECKING:
    from service.store import JobStore

DEAD_LETTERS_SHOWN = 20
OPERATOR = "operator:cli"


class _NoStoreError(Exception):
    """The job store cannot be used from here; ``code`` is the exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _open_store(settings: Settings, *, missing_ok: bool) -> JobStore:
    """The job store as it is (never created or migrated from here); raises
    :class:`_NoStoreError` after saying why not: none yet, unreachable, another version's schema.
    ``missing_ok``: no store yet is a normal answer (exit 0), not an error."""
    from sqlalchemy.engine import make_url

    from service.db.engine import error_reason, shown_url
    from service.db.migrate import is_current
    from service.store import JobStore

    url = make_url(settings.db_url)
    shown = shown_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        print(f"no job store at {url.database}: nothing has been received with this "
              "configuration (run from the service's directory, or give --config, "
              "CARDIOSCAN_DATA_DIR or CARDIOSCAN_DATABASE_URL)",
              file=sys.stdout if missing_ok else sys.stderr)
        raise _NoStoreError(0 if missing_ok else 1)
    try:
        store = JobStore(settings, migrate=False)
        current = is_current(store.engine)
    except Exception as exc:  # database down, wrong credentials, spool not writable
        print(f"cardioscan: cannot open the job store ({shown}): {error_reason(exc)}",
              file=sys.stderr)
        raise _NoStoreError(1) from exc
    if not current:
        store.close()
        print(f"cardioscan: the job store ({shown}) is not at this version's schema; "
              "`cardioscan serve` or `cardioscan worker` of this version migrates it",
              file=sys.stderr)
        raise _NoStoreError(1)
    return store


def _store_error(exc: BaseException) -> int:
    """Say that the database went away mid-way; the exit status."""
    from service.db.engine import error_reason

    print(f"cardioscan: job store error: {error_reason(exc)}", file=sys.stderr)
    return 1


def _age(t: datetime | None) -> str:
    if t is None:
        return "-"
    s = (datetime.now(UTC) - t).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def run_status(config_path: Path | None) -> int:
    """Print the queue by state, the deliveries by destination, and the dead letters."""
    settings = load_settings_or_report(config_path)
    if settings is None:
        return 2
    try:
        store = _open_store(settings, missing_ok=True)
    except _NoStoreError as none:
        return none.code
    try:
        _print_status(store)
    except Exception as exc:  # the database went away mid-way
        return _store_error(exc)
    finally:
        store.close()
    return 0


def _print_status(store: JobStore) -> None:
    from service.db.models import DeliveryState, JobState

    console = Console()
    stats = store.queue_stats()
    routes = sorted({r for r, _ in stats.jobs})
    queue = Table(title="Jobs")
    queue.add_column("route")
    for state in JobState.ALL:
        queue.add_column(state, justify="right")
    for route in routes:
        queue.add_row(route, *(str(stats.jobs.get((route, s), 0)) for s in JobState.ALL))
    queue.add_row("[b]all[/b]", *(f"[b]{stats.count(s)}[/b]" for s in JobState.ALL))
    console.print(queue)
    console.print(f"oldest queued or running job: {_age(stats.oldest_pending_at)}")

    dests = sorted({(d, k) for d, k, _ in stats.deliveries})
    if dests:
        out = Table(title="Deliveries")
        out.add_column("destination")
        out.add_column("kind")
        for state in DeliveryState.ALL:
            out.add_column(state, justify="right")
        for d, k in dests:
            out.add_row(d, k, *(str(stats.deliveries.get((d, k, s), 0))
                                for s in DeliveryState.ALL))
        console.print(out)

    dead = Table(title="Dead letters")
    dead.add_column("job", no_wrap=True)
    for col in ("what", "route", "attempts", "when", "error"):
        dead.add_column(col)
    n = 0
    for state in (JobState.DEAD, JobState.FAILED):
        for job in store.list_jobs(state=state, limit=DEAD_LETTERS_SHOWN):
            dead.add_row(job.id, f"job {state}", job.route, str(job.attempts),
                         _age(job.finished_at), (job.error or "")[:120])
            n += 1
    for job in store.list_jobs(state=JobState.DONE, limit=500):
        for dl in job.deliveries:
            if dl.state == DeliveryState.DEAD and n < 2 * DEAD_LETTERS_SHOWN:
                dead.add_row(job.id, f"delivery to {dl.destination}", job.route,
                             str(dl.attempts), _age(dl.updated_at),
                             (dl.last_error or "")[:120])
                n += 1
    if n:
        console.print(dead)
        console.print("retry with: cardioscan retry JOB  or  cardioscan retry --all-dead")
    else:
        console.print("no dead letters")


def run_retry(job: str | None, *, all_dead: bool, config_path: Path | None) -> int:
    """Re-queue one job (or its dead deliveries), or every dead job and delivery."""
    if (job is None) == (not all_dead):
        print("cardioscan retry: give a JOB id or --all-dead (not both)", file=sys.stderr)
        return 2
    settings = load_settings_or_report(config_path)
    if settings is None:
        return 2
    from service.errors import JobNotFoundError, JobStateError

    try:
        store = _open_store(settings, missing_ok=False)
    except _NoStoreError as none:
        return none.code
    try:
        if all_dead:
            jobs, deliveries = store.retry_all_dead(actor=OPERATOR)
            print(f"re-queued {jobs} dead jobs and {deliveries} dead deliveries")
            return 0
        assert job is not None
        try:
            info = store.retry_job(job, actor=OPERATOR)
        except JobNotFoundError:
            print(f"cardioscan retry: no job {job}", file=sys.stderr)
            return 1
        except JobStateError as exc:
            print(f"cardioscan retry: {exc}", file=sys.stderr)
            return 1
        print(f"job {info.id}: {info.state}")
        return 0
    except Exception as exc:  # the database went away mid-way
        return _store_error(exc)
    finally:
        store.close()


def run_config_show(config_path: Path | None) -> int:
    """Print the effective configuration as YAML, secrets masked."""
    settings = load_settings_or_report(config_path)
    if settings is None:
        return 2
    print(yaml.safe_dump(settings.masked(), sort_keys=False), end="")
    return 0
