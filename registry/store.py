"""Storage of the registry: SQLite (embedded default) or PostgreSQL (``DATABASE_URL``).

Writes run in one transaction each and are serialised (SQLite ``BEGIN IMMEDIATE``;
PostgreSQL a transaction-scoped advisory lock), so log indices are dense, a report is
appended exactly once, and a crash mid-write leaves nothing half-written: what was
acknowledged was committed (SQLite runs in WAL mode with ``synchronous=FULL``).

SQL is written with ``?`` placeholders and translated for psycopg.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LOCK_KEY = 0x64737634  # "dsv4": advisory lock that serialises registry writes on PostgreSQL

_DDL = [
    """CREATE TABLE IF NOT EXISTS auditors (
        fingerprint TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        identity_json TEXT NOT NULL,
        registered_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS releases (
        fingerprint TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        weight_files_json TEXT NOT NULL,
        registered_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS reports (
        id TEXT PRIMARY KEY,
        log_index BIGINT NOT NULL UNIQUE,
        leaf_hash TEXT NOT NULL,
        leaf_data TEXT NOT NULL,
        signer TEXT NOT NULL REFERENCES auditors(fingerprint),
        auditor_name TEXT NOT NULL,
        model_id TEXT NOT NULL,
        model_fingerprint TEXT NOT NULL,
        release_name TEXT,
        created_at TEXT NOT NULL,
        submitted_at TEXT NOT NULL,
        suites TEXT NOT NULL,
        n_metrics INTEGER NOT NULL,
        n_records INTEGER NOT NULL,
        report_json TEXT NOT NULL,
        signature_json TEXT NOT NULL,
        samples {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS metrics (
        report_id TEXT NOT NULL REFERENCES reports(id),
        task TEXT NOT NULL,
        metric TEXT NOT NULL,
        grp TEXT NOT NULL,
        value {real},
        ci_low {real},
        ci_high {real},
        n INTEGER NOT NULL,
        higher_is_better INTEGER,
        PRIMARY KEY (report_id, task, metric, grp))""",
    "CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (task, metric, grp)",
]


class Tx:
    """A cursor wrapper: ``?`` placeholders, rows as dicts."""

    def __init__(self, conn, dialect: str):
        self.conn = conn
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        return self.conn.execute(self._sql(sql), tuple(params))

    def one(self, sql: str, params: tuple | list = ()) -> dict | None:
        row = self.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, params: tuple | list = ()) -> list[dict]:
        return [dict(r) for r in self.execute(sql, params).fetchall()]

    def blob(self, value: Any) -> bytes:
        return bytes(value) if value is not None else b""


class Database:
    """``url``: ``sqlite:///PATH`` / a plain file path, or ``postgresql://...``."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith(("postgres://", "postgresql://")):
            self.dialect = "postgres"
            import psycopg  # noqa: F401  (fail early with a clear ImportError)
        else:
            self.dialect = "sqlite"
            path = url.removeprefix("sqlite:///")
            self.path = str(Path(path).expanduser())
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._init_schema()

    @property
    def display_url(self) -> str:
        if self.dialect == "sqlite":
            return f"sqlite:///{self.path}"
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        host = u.hostname or "localhost"
        return f"postgresql://{host}:{u.port or 5432}{u.path}"

    # -- connections ----------------------------------------------------------------------------

    def _sqlite_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _pg_conn(self):
        import psycopg
        from psycopg.rows import dict_row

        return psycopg.connect(self.url, row_factory=dict_row, autocommit=True, connect_timeout=30)

    def _init_schema(self) -> None:
        blob, real = ("BLOB", "REAL") if self.dialect == "sqlite" else ("BYTEA", "DOUBLE PRECISION")
        if self.dialect == "sqlite":
            conn = self._sqlite_conn()
            conn.execute("PRAGMA journal_mode = WAL")
        with self.write() as tx:
            for stmt in _DDL:
                tx.execute(stmt.format(blob=blob, real=real))

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """One serialised read-write transaction; committed on success, rolled back on error."""
        if self.dialect == "sqlite":
            conn = self._sqlite_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(conn, "sqlite")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        else:
            with self._pg_conn() as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    yield Tx(conn, "postgres")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only snapshot (one transaction)."""
        if self.dialect == "sqlite":
            conn = self._sqlite_conn()
            conn.execute("BEGIN")
            try:
                yield Tx(conn, "sqlite")
            finally:
                conn.execute("ROLLBACK")
        else:
            with self._pg_conn() as conn:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield Tx(conn, "postgres")
