"""`linkworker enqueue` as a user runs it, `enqueue_many`, and the SQL function
`linkworker_enqueue`, against a real Postgres: good files, bad rows, idempotent re-runs."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ROOT, cli_env, run_cli
from worker.enqueue import PAYLOAD_MODELS, EnqueueError, JobSpec, enqueue_many
from worker.providers import PROVIDER_NAMES
from worker.samples import bad_payload, good_payload

FIXTURES = ROOT / "tests" / "fixtures" / "enqueue"


async def enqueue(database_url: str, *args: str) -> tuple[int, str, str]:
    return await run_cli("enqueue", *args, env=cli_env(LINKWORKER_DATABASE_URL=database_url))


async def count_jobs(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM link_jobs")
    return count


def fixture_rows(name: str) -> list[dict[str, str]]:
    with (FIXTURES / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- files that go in ------------------------------------------------------------------------


async def test_csv_rows_are_enqueued_with_their_columns_in_file_order(
    conn: asyncpg.Connection, database_url: str
) -> None:
    code, out, err = await enqueue(database_url, str(FIXTURES / "invoices.csv"), "--batch", "inv")

    assert code == 0, err
    assert out == "enqueued 4 jobs (0 already present) in batch inv\n"
    rows = await conn.fetch("SELECT * FROM link_jobs ORDER BY id")
    written = fixture_rows("invoices.csv")
    assert [row["idempotency_key"] for row in rows] == [r["idempotency_key"] for r in written]
    for row, line in zip(rows, written, strict=True):
        assert row["provider"] == line["provider"]
        assert row["account"] == (line["account"] or "default")
        assert json.loads(row["payload"]) == json.loads(line["payload"])
        assert row["priority"] == int(line["priority"] or 0)
        assert row["max_attempts"] == int(line["max_attempts"] or 5)
        assert row["batch_id"] == "inv"
        assert row["state"] == "pending"
    # the worker fills Kushki's publicMerchantId from its configuration: not needed here
    assert "publicMerchantId" not in json.loads(rows[2]["payload"])
    assert rows[2]["run_at"] == datetime(2030, 1, 1, 6, tzinfo=UTC)


async def test_running_the_same_file_again_inserts_nothing(
    conn: asyncpg.Connection, database_url: str
) -> None:
    path = str(FIXTURES / "invoices.csv")
    first = await enqueue(database_url, path, "--batch", "inv")
    ids = [row["id"] for row in await conn.fetch("SELECT id FROM link_jobs ORDER BY id")]

    code, out, err = await enqueue(database_url, path, "--batch", "inv")

    assert first[0] == 0 and code == 0, err
    assert out == "enqueued 0 jobs (4 already present) in batch inv\n"
    assert [row["id"] for row in await conn.fetch("SELECT id FROM link_jobs ORDER BY id")] == ids


async def test_flags_fill_what_jsonl_rows_leave_out(
    conn: asyncpg.Connection, database_url: str
) -> None:
    flags = "--provider cheqpay --account acme --batch subs-11 --priority 3 --max-attempts 7"
    code, out, err = await enqueue(
        database_url, str(FIXTURES / "subscriptions.jsonl"), *flags.split()
    )

    assert code == 0, err
    assert out == "enqueued 4 jobs (0 already present) in batch subs-11\n"
    rows = await conn.fetch(
        "SELECT DISTINCT provider, account, batch_id, priority, max_attempts FROM link_jobs"
    )
    assert [tuple(row.values()) for row in rows] == [("cheqpay", "acme", "subs-11", 3, 7)]


async def test_a_row_value_wins_over_a_flag(conn: asyncpg.Connection, database_url: str) -> None:
    code, _, err = await enqueue(database_url, str(FIXTURES / "invoices.csv"), "--priority", "9")

    assert code == 0, err
    priorities = [
        r["priority"] for r in await conn.fetch("SELECT priority FROM link_jobs ORDER BY id")
    ]
    assert priorities == [9, 5, 9, -1]


async def test_a_batch_id_is_made_up_when_none_is_given(
    conn: asyncpg.Connection, database_url: str
) -> None:
    code, out, err = await enqueue(database_url, str(FIXTURES / "invoices.csv"))

    assert code == 0, err
    match = re.fullmatch(r"enqueued 4 jobs \(0 already present\) in batch (\S+)\n", out)
    assert match is not None, out
    assert re.fullmatch(r"batch-\d{8}-\d{6}-[0-9a-f]{4}", match[1])
    assert await conn.fetchval("SELECT DISTINCT batch_id FROM link_jobs") == match[1]


async def test_a_big_file_goes_in_whole_and_in_order(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "many.jsonl"
    with path.open("w") as handle:
        for n in range(5000):
            provider = PROVIDER_NAMES[n % 3]
            job = {"provider": provider, "payload": good_payload(provider, n), "batch_id": "many"}
            handle.write(json.dumps({**job, "idempotency_key": f"k{n}"}) + "\n")

    code, out, err = await enqueue(database_url, str(path))

    assert code == 0, err
    assert out == "enqueued 5000 jobs (0 already present) in batch many\n"
    keys = [r["idempotency_key"] for r in await conn.fetch("SELECT * FROM link_jobs ORDER BY id")]
    assert keys == [f"k{n}" for n in range(5000)]


# --- files that are refused ------------------------------------------------------------------


async def test_every_bad_row_is_named_by_line_and_field_and_nothing_goes_in(
    conn: asyncpg.Connection, database_url: str
) -> None:
    code, out, err = await enqueue(database_url, str(FIXTURES / "bad_rows.csv"))

    assert code == 2
    assert out == ""
    assert "10 problem(s) in 10 row(s), nothing was enqueued" in err
    expected = [
        "line 3: payload.totals.total: Input should be a valid number",
        "line 4: payload.ammount: unknown field",
        "line 5: provider: unknown provider 'stripe' (expected one of billpocket, cheqpay, kushki)",
        "line 6: priority: Input should be a valid integer",
        "line 7: payload: not valid JSON",
        "line 8: payload: should be a JSON object",
        "line 9: payload: missing",
        "line 10: max_attempts: Input should be less than or equal to 100",
        "line 11: expected 4 fields, found 3",
    ]
    for problem in expected:
        assert problem in err
    assert "line 2:" not in err  # the good row
    assert await count_jobs(conn) == 0


async def test_problems_past_the_limit_are_counted(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "typos.jsonl"
    payload, _ = bad_payload("billpocket", 1)
    with path.open("w") as handle:
        for _ in range(60):
            handle.write(json.dumps({"provider": "billpocket", "payload": payload}) + "\n")

    code, _, err = await enqueue(database_url, str(path))

    assert code == 2
    assert "120 problem(s) in 60 row(s)" in err  # amount missing and ammount unknown, per row
    assert len(re.findall(r"^line \d+: ", err, re.MULTILINE)) == 50
    assert err.rstrip().endswith("and 70 more problem(s)")
    assert await count_jobs(conn) == 0


async def test_unknown_columns_refuse_the_file(database_url: str) -> None:
    code, _, err = await enqueue(database_url, str(FIXTURES / "unknown_column.csv"))

    assert code == 2
    assert "line 1: colour: unknown column (expected provider, account, payload," in err
    assert "line 1: batch: unknown column" in err


async def test_unknown_keys_bad_lines_and_wrong_providers_in_jsonl(
    conn: asyncpg.Connection, database_url: str
) -> None:
    code, _, err = await enqueue(database_url, str(FIXTURES / "unknown_key.jsonl"))

    assert code == 2
    assert "line 2: priorty: unknown key" in err
    assert "line 3: not valid JSON" in err
    assert "line 4: should be a JSON object (one job per line)" in err
    assert "line 5: provider: unknown provider 'paypal'" in err
    assert "line 1:" not in err
    assert await count_jobs(conn) == 0


async def test_malformed_csv_names_the_line(conn: asyncpg.Connection, database_url: str) -> None:
    code, _, err = await enqueue(database_url, str(FIXTURES / "malformed.csv"))

    assert code == 2
    assert "malformed CSV, nothing was enqueued: line 3:" in err
    assert await count_jobs(conn) == 0


async def test_a_missing_provider_says_how_to_give_one(database_url: str) -> None:
    code, _, err = await enqueue(database_url, str(FIXTURES / "subscriptions.jsonl"))

    assert code == 2
    assert "line 1: provider: missing (name it in the row, or pass --provider)" in err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope.csv", "nope.csv: no such file"),
        ("empty.csv", "empty.csv holds no jobs, nothing was enqueued"),
        ("header_only.csv", "header_only.csv holds no jobs, nothing was enqueued"),
        ("../../../README.md", "cannot tell the format of"),
    ],
)
async def test_files_with_nothing_to_enqueue_are_refused(
    database_url: str, name: str, message: str
) -> None:
    code, out, err = await enqueue(database_url, str(FIXTURES / name))

    assert code == 2
    assert out == ""
    assert message in err


async def test_a_file_that_is_not_utf8_is_refused(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes('provider,payload\ncheqpay,"{""name"": ""Suscripción""}"\n'.encode("latin-1"))

    code, _, err = await enqueue(database_url, str(path))

    assert code == 2
    assert "is not UTF-8 text" in err


async def test_a_value_postgres_refuses_rolls_the_whole_file_back(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "nul.jsonl"
    good = good_payload("cheqpay", 1)
    nul = {**good, "metadata": {"note": "a\u0000b"}}  # valid JSON; jsonb refuses it
    path.write_text(
        "".join(json.dumps({"provider": "cheqpay", "payload": p}) + "\n" for p in (good, nul))
    )

    code, _, err = await enqueue(database_url, str(path))

    assert code == 2
    assert "PostgreSQL refused a value" in err and "nothing was enqueued" in err
    assert await count_jobs(conn) == 0


async def test_an_unmigrated_database_is_refused(empty_database_url: str) -> None:
    code, _, err = await enqueue(empty_database_url, str(FIXTURES / "invoices.csv"))

    assert code == 2
    assert "run `linkworker migrate` first" in err


# --- the Python API --------------------------------------------------------------------------


def test_every_provider_has_its_payload_model() -> None:
    assert set(PAYLOAD_MODELS) == set(PROVIDER_NAMES)


async def test_enqueue_many_copies_specs_and_dicts_and_is_idempotent(
    conn: asyncpg.Connection,
) -> None:
    jobs: list[JobSpec | dict[str, object]] = [
        JobSpec(provider="cheqpay", payload=good_payload("cheqpay", 1), idempotency_key="a"),
        {"provider": "kushki", "payload": good_payload("kushki", 2), "idempotency_key": "b"},
        {"provider": "billpocket", "payload": good_payload("billpocket", 3), "batch_id": "own"},
    ]

    first = await enqueue_many(conn, jobs, batch_id="nightly")
    again = await enqueue_many(conn, jobs[:2], batch_id="nightly")

    assert (first.inserted, first.already_present, first.batch_ids) == (3, 0, ("nightly", "own"))
    assert (again.inserted, again.already_present) == (0, 2)
    assert await conn.fetchval("SELECT count(*) FROM link_jobs WHERE batch_id = 'nightly'") == 2


async def test_enqueue_many_refuses_a_bad_job_and_inserts_none(conn: asyncpg.Connection) -> None:
    def jobs():  # a generator: read once, checked while it is copied
        yield {"provider": "cheqpay", "payload": good_payload("cheqpay", 1)}
        yield {"provider": "cheqpay", "payload": bad_payload("cheqpay", 2)[0]}
        yield {"provider": "cheqpay", "payload": {"totals": {"total": float("nan")}}}

    with pytest.raises(EnqueueError) as raised:
        await enqueue_many(conn, jobs())

    assert "problem(s) in 3 job(s), nothing was enqueued" in raised.value.message
    assert "job 2: payload.totals.total: Input should be a valid number" in raised.value.problems
    assert any(p.startswith("job 3: payload: not valid JSON") for p in raised.value.problems)
    assert await count_jobs(conn) == 0


async def test_enqueue_many_takes_a_dsn(conn: asyncpg.Connection, database_url: str) -> None:
    result = await enqueue_many(
        database_url, [{"provider": "kushki", "payload": good_payload("kushki", 1)}]
    )

    assert result.inserted == 1
    assert await conn.fetchval("SELECT batch_id FROM link_jobs") == result.batch_ids[0]


async def test_enqueue_many_commits_or_rolls_back_with_the_callers_transaction(
    conn: asyncpg.Connection,
) -> None:
    job = {"provider": "cheqpay", "payload": good_payload("cheqpay", 1)}
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await enqueue_many(conn, [job])
            await enqueue_many(conn, [job])  # twice in one transaction: the scratch table is gone
            raise RuntimeError("the caller changes its mind")

    assert await count_jobs(conn) == 0


# --- the SQL function ------------------------------------------------------------------------

PAYLOAD = json.dumps(good_payload("cheqpay", 1))


async def test_sql_enqueue_returns_the_id_and_the_existing_id_on_a_repeat(
    conn: asyncpg.Connection,
) -> None:
    sql = "SELECT linkworker_enqueue('cheqpay', $1::jsonb, idempotency_key => 'inv-1')"

    first = await conn.fetchval(sql, PAYLOAD)
    second = await conn.fetchval(sql, PAYLOAD)
    other_account = await conn.fetchval(
        "SELECT linkworker_enqueue('cheqpay', $1::jsonb, 'acme', 'inv-1')", PAYLOAD
    )

    assert first == second != other_account
    assert await count_jobs(conn) == 2


async def test_sql_enqueue_fills_the_defaults_also_for_nulls(conn: asyncpg.Connection) -> None:
    plain = await conn.fetchval("SELECT linkworker_enqueue('kushki', '{}')")
    nulls = await conn.fetchval(
        "SELECT linkworker_enqueue('kushki', '{}', NULL, NULL, NULL, NULL, NULL, NULL)"
    )
    named = await conn.fetchval(
        "SELECT linkworker_enqueue(provider => 'billpocket', payload => '{\"amount\": 1}', "
        "batch_id => 'b', priority => 4, max_attempts => 2, run_at => now() + interval '1 day')"
    )

    rows = await conn.fetch(
        "SELECT id, account, priority, max_attempts, state, run_at <= now() AS due "
        "FROM link_jobs ORDER BY id"
    )
    assert [tuple(row.values()) for row in rows] == [
        (plain, "default", 0, 5, "pending", True),
        (nulls, "default", 0, 5, "pending", True),
        (named, "default", 4, 2, "pending", False),
    ]


async def test_sql_enqueue_keeps_the_tables_checks(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.fetchval("SELECT linkworker_enqueue('stripe', '{}')")
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.fetchval("SELECT linkworker_enqueue('cheqpay', '[]')")
