"""Numbered plain-SQL migrations (`sql/NNNN_name.sql`), applied by `linkworker migrate`.

Each file runs once, in its own transaction, and is recorded in `linkworker_migrations`. A
session advisory lock makes two `migrate` processes at once safe: the second waits, then finds
nothing left to do. The worker itself never runs DDL; it refuses to start on an old schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from worker.errors import ConfigError

# any constant works; it only has to be the same for every migrate process
MIGRATION_LOCK_KEY = 7_336_201_455
FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    """`worker/sql` inside an installed wheel, `sql/` beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "sql", package.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"no migrations found beside {package} (looked for sql/)")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file, in version order."""
    found = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if match is None:
            raise ConfigError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    return found


def latest_version() -> int:
    return max(m.version for m in load_migrations())


CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS linkworker_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
APPLIED_VERSIONS = "SELECT version FROM linkworker_migrations"
RECORD_MIGRATION = "INSERT INTO linkworker_migrations (version, name) VALUES ($1, $2)"


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet recorded; returns the ones applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        applied = {row["version"] for row in await conn.fetch(APPLIED_VERSIONS)}
        pending = [m for m in load_migrations() if m.version not in applied]
        for migration in pending:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(RECORD_MIGRATION, migration.version, migration.name)
        return pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


SCHEMA_VERSION = """
SELECT max(version) FROM linkworker_migrations
"""


async def schema_version(conn: asyncpg.Connection) -> int | None:
    """The highest applied migration, or None when `linkworker migrate` never ran here."""
    exists = await conn.fetchval("SELECT to_regclass('linkworker_migrations') IS NOT NULL")
    if not exists:
        return None
    version: int | None = await conn.fetchval(SCHEMA_VERSION)
    return version


async def require_current_schema(conn: asyncpg.Connection) -> None:
    """Refuse to work on a database whose schema is missing or older than this code."""
    version, latest = await schema_version(conn), latest_version()
    if version is None or version < latest:
        found = "no linkworker schema" if version is None else f"schema version {version}"
        raise ConfigError(
            f"the database has {found}, this worker needs version {latest}: "
            "run `linkworker migrate` first"
        )
