"""Bulk enqueue: `linkworker enqueue FILE` (CSV or JSON Lines) and `enqueue_many` for Python.

    FILE ──pass 1: read, check every row──▶ any problem: print them all, exit 2, insert nothing
         ──pass 2: read again──▶ COPY into a temp table ──INSERT ... ON CONFLICT DO NOTHING──▶
           link_jobs, in one transaction: every row or none

Neither pass holds more than one row (and the COPY buffer) in memory, so a file of a million
rows costs what a file of ten does. A row is checked as the worker would check it: the job's
own fields (provider, account, priority, ...) and its payload against the provider adapter's
own pydantic model, so a payload the worker would fail fails here, naming the line and field.
Fields the worker fills in (Kushki `publicMerchantId`, Billpocket `url_path`, Cheqpay
`reference`) may be left out.

Idempotent with `idempotency_key`: a row whose (provider, account, key) is already queued is
skipped and counted as already present, so a producer can run the same file again.
`enqueue_many` takes any iterable in one pass: it checks while it copies, and rolls the whole
transaction back if any job was bad.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import secrets
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import (
    ErrorDetails,
    PydanticCustomError,
    PydanticSerializationError,
    from_json,
    to_json,
)

from worker.arguments import CONFIG_HELP, positive_int
from worker.errors import ConfigError, LinkworkerError
from worker.migrations import require_current_schema
from worker.providers import PROVIDER_NAMES, billpocket, cheqpay, common, kushki
from worker.settings import DEFAULT_ACCOUNT

FIELDS = (
    "provider",
    "account",
    "payload",
    "idempotency_key",
    "batch_id",
    "priority",
    "run_at",
    "max_attempts",
)
PROBLEM_LIMIT = 50
INT4_MIN, INT4_MAX = -(2**31), 2**31 - 1

# The models the worker validates each provider's payload with (see worker/providers/).
PAYLOAD_MODELS: Mapping[str, type[BaseModel]] = {
    billpocket.NAME: billpocket.BillpocketLink,
    cheqpay.NAME: cheqpay.CheqpayPaymentLink,
    kushki.NAME: kushki.KushkiSmartlink,
}

Format = Literal["csv", "jsonl"]
# a file's suffix, or --format with a dot in front
SUFFIXES: Mapping[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class EnqueueError(LinkworkerError):
    """The jobs were refused and nothing was inserted; `problems` are 'line N: field: message'."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems)

    def report(self) -> str:
        return "\n".join([self.message, *self.problems])


def load_json(text: str) -> object:
    """Strict JSON: NaN and Infinity are refused, as PostgreSQL's jsonb refuses them."""
    return from_json(text, allow_inf_nan=False)


class JobFields(BaseModel):
    """A job's columns other than its payload (CSV text such as "5" is converted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    account: str = Field(default=DEFAULT_ACCOUNT, min_length=1)
    idempotency_key: str | None = Field(default=None, min_length=1)
    batch_id: str | None = Field(default=None, min_length=1)
    priority: int = Field(default=0, ge=INT4_MIN, le=INT4_MAX)
    run_at: AwareDatetime | None = None
    max_attempts: int = Field(default=5, ge=1, le=100)

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise PydanticCustomError(
                "unknown_provider",
                f"unknown provider {value!r} (expected one of {', '.join(PROVIDER_NAMES)})",
            )
        return value


class JobSpec(JobFields):
    """One job for `enqueue_many`: the producer columns of `link_jobs` (see the README).

    `payload` is the provider's own request body.
    """

    payload: dict[str, Any]


def payload_text(value: object) -> str:
    """A payload as JSON text: text is taken as given (a CSV cell), an object is encoded.

    Raises ValueError saying what is wrong with it.
    """
    if value is None:
        raise ValueError("missing")
    if isinstance(value, Mapping):
        try:
            value = to_json(value, inf_nan_mode="constants").decode()
        except PydanticSerializationError as exc:
            raise ValueError(f"not encodable as JSON ({exc})") from None
    if not isinstance(value, str):
        raise ValueError("should be a JSON object")
    if "NaN" in value or "Infinity" in value:  # the one thing the payload models let by
        try:
            load_json(value)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
    return value


def payload_problems(provider: str, text: str) -> list[str]:
    """What the worker would say about this payload: 'payload.<field>: message' each."""
    try:
        PAYLOAD_MODELS[provider].model_validate_json(text)
    except ValidationError as exc:
        return [_payload_problem(item) for item in exc.errors(include_input=False)]
    return []


def _payload_problem(item: ErrorDetails) -> str:
    path = common.field_path(item["loc"])
    if item["type"] == "json_invalid":
        message = f"not valid JSON ({item['msg'].removeprefix('Invalid JSON: ')})"
    elif item["type"] == "model_type" and not path:
        message = "should be a JSON object"
    elif item["type"] == "extra_forbidden":
        message = "unknown field"  # the worker's word for it
    else:
        message = item["msg"]
    return f"payload.{path}: {message}" if path else f"payload: {message}"


def _field_problems(exc: ValidationError, unknown: str, provider_hint: str) -> list[str]:
    problems = []
    for item in exc.errors(include_input=False, include_url=False):
        if item["type"] == "missing":
            message = "missing" + (provider_hint if item["loc"] == ("provider",) else "")
        elif item["type"] == "extra_forbidden":
            message = f"{unknown} (expected {', '.join(FIELDS)})"
        else:
            message = item["msg"]
        problems.append(f"{common.field_path(item['loc'])}: {message}")
    return problems


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What an enqueue did: rows inserted, rows skipped as already queued, and their batches."""

    inserted: int
    already_present: int
    batch_ids: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.inserted + self.already_present

    def line(self) -> str:
        """'enqueued 99 jobs (1 already present) in batch invoices-2026-11'."""
        shown = ", ".join(self.batch_ids[:5])
        more = f" and {len(self.batch_ids) - 5} more" if len(self.batch_ids) > 5 else ""
        batches = f"batch {shown}" if len(self.batch_ids) == 1 else f"batches {shown}{more}"
        return (
            f"enqueued {self.inserted} jobs ({self.already_present} already present) in {batches}"
        )


def new_batch_id(now: datetime | None = None) -> str:
    """'batch-20261101-060000-3f9a': sortable by time, unique enough for one producer."""
    when = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"batch-{when}-{secrets.token_hex(2)}"


# --- checking rows ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One row as read: its line (or position) and values, or why it could not even be read."""

    line: int
    values: Mapping[str, object]
    problem: str | None = None


# A COPY record: line, provider, account, payload (JSON text), idempotency_key, batch_id,
# priority, run_at, max_attempts.
CopyRecord = tuple[int, str, str, str, str | None, str, int, datetime | None, int]


@dataclass(slots=True)
class Collector:
    """Turns rows into COPY records, keeping a note of every bad row instead (the first
    PROBLEM_LIMIT in full), and which batches the good ones go to.

    `defaults` fill what a row leaves out (the command's flags); `batch_id` is the batch of
    rows that name none. `where` names a row's position in messages ("line", "job"),
    `unknown` an unknown field ("unknown key", "unknown column"); `provider_hint` follows
    "provider: missing". Pass 2 of a file needs no `check_payload`: pass 1 did it.
    """

    defaults: Mapping[str, object]
    batch_id: str
    check_payload: bool = True
    where: str = "line"
    unknown: str = "unknown key"
    provider_hint: str = ""
    rows: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    batch_ids: dict[str, None] = field(default_factory=dict)  # distinct, in first-seen order

    def records(self, rows: Iterable[SourceRow]) -> Iterator[CopyRecord]:
        """The good rows' records; bad rows are noted and left out."""
        for row in rows:
            self.rows += 1
            record = self.record(row)
            if record is not None:
                yield record

    def record(self, row: SourceRow) -> CopyRecord | None:
        """The row's COPY record, or None with its problems noted (all of them)."""
        if row.problem is not None:
            self._note(row.line, [row.problem])
            return None
        values = {**self.defaults, **row.values}
        payload = values.pop("payload", None)
        problems: list[str] = []
        fields = self._fields(values, problems)
        text = self._payload(values.get("provider"), payload, problems)
        if fields is None or text is None or problems:
            self._note(row.line, problems)
            return None
        batch_id = fields.batch_id or self.batch_id
        self.batch_ids.setdefault(batch_id, None)
        return (
            row.line,
            fields.provider,
            fields.account,
            text,
            fields.idempotency_key,
            batch_id,
            fields.priority,
            fields.run_at,
            fields.max_attempts,
        )

    def _fields(self, values: Mapping[str, object], problems: list[str]) -> JobFields | None:
        try:
            return JobFields.model_validate(values)
        except ValidationError as exc:
            problems.extend(_field_problems(exc, self.unknown, self.provider_hint))
            return None

    def _payload(self, provider: object, payload: object, problems: list[str]) -> str | None:
        try:
            text = payload_text(payload)
        except ValueError as exc:
            problems.append(f"payload: {exc}")
            return None
        if self.check_payload and provider in PROVIDER_NAMES:
            problems.extend(payload_problems(str(provider), text))
        return text

    def _note(self, line: int, problems: list[str]) -> None:
        self.problem_count += len(problems)
        room = max(PROBLEM_LIMIT - len(self.problems), 0)
        self.problems.extend(f"{self.where} {line}: {problem}" for problem in problems[:room])

    def error(self, headline: str) -> EnqueueError:
        """The refusal, listing the problems kept and counting the rest."""
        hidden = self.problem_count - len(self.problems)
        tail = [f"and {hidden} more problem(s)"] if hidden > 0 else []
        return EnqueueError(headline, [*self.problems, *tail])


# --- reading files ----------------------------------------------------------------------------


def file_format(path: Path, given: str | None) -> Format:
    """The format named by --format, else by the file's suffix."""
    found = SUFFIXES.get(f".{given}" if given else path.suffix.lower())
    if found is None:
        raise EnqueueError(
            f"cannot tell the format of {path} from its name: pass --format csv or --format jsonl"
        )
    return found


def read_rows(handle: TextIO, fmt: Format, defaults: Mapping[str, object]) -> Iterator[SourceRow]:
    """The rows of an open file, one at a time."""
    if fmt == "csv":
        return csv_rows(handle, defaults)
    return jsonl_rows(handle)


def jsonl_rows(handle: TextIO) -> Iterator[SourceRow]:
    """One JSON object per line; blank lines are skipped."""
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            value = load_json(text)
        except (ValueError, RecursionError) as exc:
            yield SourceRow(line, {}, f"not valid JSON ({exc})")
            continue
        if not isinstance(value, dict):
            yield SourceRow(line, {}, "should be a JSON object (one job per line)")
            continue
        yield SourceRow(line, _given(value))


def _given(values: Mapping[str, object]) -> dict[str, object]:
    """The values set: a null means "not given", so the default applies."""
    return {name: value for name, value in values.items() if value is not None}


def csv_rows(handle: TextIO, defaults: Mapping[str, object]) -> Iterator[SourceRow]:
    """A header line naming the columns, then one job per line; empty cells take the default.

    Quoting must be well formed (a stray quote stops the read: the rest cannot be trusted).
    """
    reader = csv.reader(handle, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns = check_header(header, defaults)
        start = reader.line_num + 1
        for fields in reader:
            line, start = start, reader.line_num + 1
            if fields:  # the csv module reads a blank line as []
                yield _csv_row(line, columns, fields)
    except csv.Error as exc:
        raise EnqueueError(
            f"malformed CSV, nothing was enqueued: line {reader.line_num}: {exc}"
        ) from None


def _csv_row(line: int, columns: list[str], fields: list[str]) -> SourceRow:
    if len(fields) != len(columns):
        return SourceRow(line, {}, f"expected {len(columns)} fields, found {len(fields)}")
    values = zip(columns, fields, strict=True)
    return SourceRow(line, {name: value for name, value in values if value != ""})


def check_header(header: list[str], defaults: Mapping[str, object]) -> list[str]:
    """The column names; unknown, repeated or missing columns refuse the whole file."""
    columns = [name.strip() for name in header]
    problems = [
        f"line 1: {name or '(blank)'}: unknown column (expected {', '.join(FIELDS)})"
        for name in columns
        if name not in FIELDS
    ]
    problems += [
        f"line 1: {name}: column appears twice"
        for name in sorted(set(columns))
        if columns.count(name) > 1
    ]
    if "payload" not in columns:
        problems.append("line 1: payload: no such column (every job needs one)")
    if "provider" not in columns and "provider" not in defaults:
        problems.append("line 1: provider: no such column, and no --provider given")
    if problems:
        raise EnqueueError("the CSV header is not usable, nothing was enqueued:", problems)
    return columns


@dataclass(frozen=True, slots=True)
class Source:
    """A file to enqueue and how to read it."""

    path: Path
    fmt: Format
    defaults: Mapping[str, object]

    def check(self, batch_id: str) -> Collector:
        """Pass 1: read and check every row; the collector holds the problems and batches."""
        collector = Collector(
            self.defaults,
            batch_id,
            unknown=self._unknown(),
            provider_hint=" (name it in the row, or pass --provider)",
        )
        with self._open() as handle:
            for _ in collector.records(read_rows(handle, self.fmt, self.defaults)):
                pass
        return collector

    def copy(self, collector: Collector) -> Iterator[CopyRecord]:
        """Pass 2: the records again, streamed into COPY (payloads were checked in pass 1)."""
        with self._open() as handle:
            yield from collector.records(read_rows(handle, self.fmt, self.defaults))

    def _unknown(self) -> str:
        return "unknown column" if self.fmt == "csv" else "unknown key"

    def _open(self) -> TextIO:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        try:
            return self.path.open(encoding="utf-8-sig", newline="" if self.fmt == "csv" else None)
        except FileNotFoundError:
            raise EnqueueError(f"{self.path}: no such file") from None
        except OSError as exc:
            raise EnqueueError(f"{self.path}: cannot read it ({exc.strerror})") from None


def check_source(source: Source, batch_id: str) -> Collector:
    """Pass 1 with its refusals: bad rows, no rows, or text that is not UTF-8."""
    try:
        collector = source.check(batch_id)
    except UnicodeDecodeError as exc:
        raise EnqueueError(f"{source.path} is not UTF-8 text ({exc.reason})") from None
    if collector.problem_count:
        raise collector.error(
            f"{source.path}: {collector.problem_count} problem(s) in {collector.rows} row(s), "
            "nothing was enqueued:"
        )
    if collector.rows == 0:
        raise EnqueueError(f"{source.path} holds no jobs, nothing was enqueued")
    return collector


# --- writing ----------------------------------------------------------------------------------

# A session's scratch table for the COPY (COPY has no ON CONFLICT); it lives until the end of the
# transaction at most, and is dropped as soon as its rows are in.
CREATE_INCOMING = """
-- the COPY's landing place: COPY cannot skip rows whose idempotency key is taken, an INSERT can
CREATE TEMP TABLE linkworker_incoming (
    line            integer     NOT NULL,
    provider        text        NOT NULL,
    account         text        NOT NULL,
    payload         jsonb       NOT NULL,
    idempotency_key text,
    batch_id        text        NOT NULL,
    priority        integer     NOT NULL,
    run_at          timestamptz,
    max_attempts    integer     NOT NULL
) ON COMMIT DROP
"""
INCOMING_COLUMNS = [
    "line",
    "provider",
    "account",
    "payload",
    "idempotency_key",
    "batch_id",
    "priority",
    "run_at",
    "max_attempts",
]

INSERT_INCOMING = """
-- the copied rows into the queue in file order; a row whose idempotency key is already queued
-- for its provider and account is skipped (counted by the caller as already present)
INSERT INTO link_jobs (provider, account, payload, idempotency_key, batch_id, priority, run_at,
                       max_attempts)
SELECT provider, account, payload, idempotency_key, batch_id, priority, coalesce(run_at, now()),
       max_attempts
  FROM linkworker_incoming
 ORDER BY line
    ON CONFLICT ON CONSTRAINT link_jobs_idempotency_key_unique DO NOTHING
"""

DROP_INCOMING = """
-- gone now, not at commit: a caller's transaction may enqueue again
DROP TABLE linkworker_incoming
"""


async def insert_records(conn: asyncpg.Connection, records: Iterable[CopyRecord]) -> int:
    """COPY the records and move them into link_jobs; returns how many were new.

    Call inside a transaction: the caller decides whether the rows stay.
    """
    await conn.execute(CREATE_INCOMING)
    try:
        await conn.copy_records_to_table(
            "linkworker_incoming", records=records, columns=INCOMING_COLUMNS
        )
    except asyncpg.DataError as exc:  # e.g. \u0000, which jsonb and text columns refuse
        raise EnqueueError(f"PostgreSQL refused a value ({exc}); nothing was enqueued") from None
    status = await conn.execute(INSERT_INCOMING)
    await conn.execute(DROP_INCOMING)
    return int(status.split()[-1])


@asynccontextmanager
async def connected(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database migrated for this code; ConfigError (exit 2) otherwise."""
    try:
        conn = await asyncpg.connect(database_url, timeout=15)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot connect to database_url: {type(exc).__name__}: {exc}") from None
    try:
        await require_current_schema(conn)
        yield conn
    finally:
        await conn.close()


async def enqueue_source(conn: asyncpg.Connection, source: Source, collector: Collector) -> int:
    """Pass 2 of a checked file, in one transaction; returns how many rows were new."""
    copying = Collector(source.defaults, collector.batch_id, check_payload=False)
    async with conn.transaction():
        inserted = await insert_records(conn, source.copy(copying))
        if copying.problem_count or copying.rows != collector.rows:
            raise EnqueueError(f"{source.path} changed while it was enqueued; nothing was")
    return inserted


async def enqueue_many(
    conn_or_dsn: asyncpg.Connection | str,
    jobs: Iterable[JobSpec | Mapping[str, object]],
    *,
    batch_id: str | None = None,
) -> EnqueueResult:
    """Enqueue jobs with COPY, in one transaction; the Python producer's API.

    `jobs` is read once, lazily (a generator of a million jobs is fine). Each is checked as the
    worker would check it; if any is bad, nothing is inserted and EnqueueError lists them
    ('job N: field: message', N counting from 1). Jobs with no batch_id join `batch_id`, or a
    new batch. Jobs whose idempotency_key is already queued are skipped (`already_present`).
    On a connection already in a transaction, the rows commit or roll back with it.
    """
    if isinstance(conn_or_dsn, str):
        async with connected(conn_or_dsn) as conn:
            return await enqueue_many(conn, jobs, batch_id=batch_id)
    collector = Collector({}, batch_id or new_batch_id(), where="job")
    async with conn_or_dsn.transaction():
        inserted = await insert_records(conn_or_dsn, collector.records(_spec_rows(jobs)))
        if collector.problem_count:
            raise collector.error(
                f"{collector.problem_count} problem(s) in {collector.rows} job(s), "
                "nothing was enqueued:"
            )
    return EnqueueResult(inserted, collector.rows - inserted, tuple(collector.batch_ids))


def _spec_rows(jobs: Iterable[JobSpec | Mapping[str, object]]) -> Iterator[SourceRow]:
    for position, job in enumerate(jobs, start=1):
        values = job.model_dump(exclude_unset=True) if isinstance(job, JobSpec) else job
        yield SourceRow(position, _given(values))


# --- the command ------------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`linkworker enqueue FILE [...]`."""

    cmd = commands.add_parser(
        "enqueue",
        help="check a CSV or JSON Lines file of jobs and enqueue all of them (or none)",
        description=(
            "Check every row (the job's fields and its payload, as the worker would), then "
            "insert them all with COPY in one transaction, or none if any row is bad. CSV has a "
            f"header naming some of: {', '.join(FIELDS)} (payload as JSON text); JSON Lines has "
            "one object per line with those keys (payload an object). Flags fill what rows "
            "leave out. Rows whose idempotency_key is already queued are skipped."
        ),
    )
    cmd.add_argument("file", metavar="FILE", help="the jobs, .csv or .jsonl")
    cmd.add_argument("--format", choices=["csv", "jsonl"], help="default: from FILE's suffix")
    cmd.add_argument("--provider", help="for rows that name none: billpocket, cheqpay or kushki")
    cmd.add_argument("--account", help="for rows that name none (default: default)")
    cmd.add_argument("--batch", metavar="ID", help="for rows that name none (default: a new id)")
    cmd.add_argument("--max-attempts", type=positive_int, help="for rows that set none (5)")
    cmd.add_argument("--priority", type=int, help="for rows that set none (0; higher first)")
    cmd.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    cmd.set_defaults(handler=_enqueue_command)


def flag_defaults(args: argparse.Namespace) -> dict[str, object]:
    """The flags given, as the values rows that leave them out take."""
    given = {
        "provider": args.provider,
        "account": args.account,
        "max_attempts": args.max_attempts,
        "priority": args.priority,
    }
    return {name: value for name, value in given.items() if value is not None}


def _enqueue_command(args: argparse.Namespace) -> int:
    from worker.cli import load_for_command

    path = Path(args.file)
    try:
        source = Source(path, file_format(path, args.format), flag_defaults(args))
        collector = check_source(source, args.batch or new_batch_id())
        settings = load_for_command(args)
        inserted = asyncio.run(_enqueue(settings.database_url, source, collector))
    except EnqueueError as exc:
        print(f"linkworker: {exc.report()}", file=sys.stderr)
        return 2
    result = EnqueueResult(inserted, collector.rows - inserted, tuple(collector.batch_ids))
    print(result.line())
    return 0


async def _enqueue(database_url: str, source: Source, collector: Collector) -> int:
    async with connected(database_url) as conn:
        return await enqueue_source(conn, source, collector)
