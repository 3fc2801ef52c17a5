"""Engines and sessions. One engine per URL, created on first use (never at import time)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, Select, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
T = TypeVar("T", bound=tuple)


def get_engine(url: str) -> Engine:
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _make_engine(url)
            _engines[url] = engine
            _factories[url] = sessionmaker(engine, expire_on_commit=False)
        return engine


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    from service.settings import get_settings

    settings = get_settings()  # pool sizes come from VITQ_DB_POOL_SIZE / VITQ_DB_MAX_OVERFLOW
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        connect_args=postgres_socket_limits(settings.db_connect_timeout_s),
    )


def postgres_socket_limits(connect_timeout_s: int) -> dict[str, int]:
    """libpq options that bound how long a dead or silent database can hold a request or a job.

    Why: a restarted server refuses connections at once, but one behind a lost network path or a hung
    host drops packets or never answers; without these, opening a connection waits for ever (libpq's
    default) and a pooled connection to a vanished host is noticed only when TCP gives up (15 min or
    more), while the threadpool fills with blocked requests. Keepalives find a dead peer of an idle
    pooled connection within about a minute; ``tcp_user_timeout`` fails a write that goes unacknowledged.
    """
    return {
        "connect_timeout": connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }


def hold_write_lock(session: Session) -> None:
    """On SQLite, take the database's write lock now, for the rest of the caller's transaction.

    Why: ``SELECT … FOR UPDATE`` / ``FOR SHARE`` is a row lock on PostgreSQL and compiles to a plain
    SELECT on SQLite, where the driver opens a (deferred) transaction only at the first INSERT, UPDATE or
    DELETE. A check-then-insert (a quota count, "is this dataset in use?") therefore read outside any
    lock there: eight concurrent submits against ``max_active_jobs = 3`` all got 202. ``BEGIN IMMEDIATE``
    makes the check and its write one serial transaction (writers wait ``busy_timeout`` for it; WAL
    readers are not blocked). A transaction already open has written, so it holds the lock already.
    No-op on PostgreSQL, where the caller's row lock does the job."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return
    if not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def for_update(session: Session, statement: Select[T], *, read: bool = False) -> Select[T]:
    """``statement`` with ``FOR UPDATE`` (``FOR SHARE`` when ``read``) that holds on both databases: a
    row lock on PostgreSQL, the write lock (:func:`hold_write_lock`) on SQLite, taken before it runs."""
    hold_write_lock(session)
    return statement.with_for_update(read=read)


def session_factory(url: str) -> sessionmaker[Session]:
    get_engine(url)
    return _factories[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


def dispose_all() -> None:
    """Drop pooled connections (after a fork, or when a test database goes away)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
