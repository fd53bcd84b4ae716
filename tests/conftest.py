"""Test fixtures: a real Postgres for every test, and helpers to run the real CLI.

The server is an embedded one (pgserver) unless LINKWORKER_TEST_DATABASE_URL names another.
Migrations are applied once to a template database; each test gets its own copy of it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from worker.embedded import embedded_postgres
from worker.migrations import migrate

ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    given = os.environ.get("LINKWORKER_TEST_DATABASE_URL")
    if given:
        yield given
        return
    with embedded_postgres() as url:
        yield url


async def _create_template(server: str, name: str) -> None:
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(server, name))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _drop(server: str, name: str) -> None:
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def template_name(server_url: str) -> Iterator[str]:
    name = f"linkworker_template_{os.getpid()}"
    asyncio.run(_create_template(server_url, name))
    yield name
    asyncio.run(_drop(server_url, name))


async def _fresh_database(server: str, prefix: str, template: str | None) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server)
    try:
        from_template = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{from_template}')
    finally:
        await admin.close()
    return name


@pytest.fixture
async def database_url(server_url: str, template_name: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test."""
    name = await _fresh_database(server_url, "linkworker_test", template_name)
    yield with_database(server_url, name)
    await _drop(server_url, name)


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    name = await _fresh_database(server_url, "linkworker_empty", None)
    yield with_database(server_url, name)
    await _drop(server_url, name)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `linkworker` child process: ours without LINKWORKER_*, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINKWORKER_")}
    env.update(extra)
    return env


async def start_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_cli(*args: str, env: dict[str, str], timeout_s: float = 120) -> tuple[int, str, str]:
    """Run `linkworker ARGS` to completion; returns (exit code, stdout, stderr)."""
    process = await start_cli(*args, env=env)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def write_config(path: Path, database_url: str, sim_url: str, **tuning: object) -> Path:
    """A TOML config with all three providers (and a second cheqpay account) at the simulator."""
    lines = [f'database_url = "{database_url}"']
    lines += [f"{key} = {_toml(value)}" for key, value in tuning.items() if key != "lanes"]
    lanes = tuning.get("lanes", {})
    assert isinstance(lanes, dict)
    common = {"base_url": sim_url, **lanes}
    sections = {
        "providers.billpocket": {"api_key": "bp-key-0001", "user_token": "bp-user-0001"},
        "providers.cheqpay": {"api_key": "cq-key-default"},
        "providers.cheqpay.accounts.acme": {"api_key": "cq-key-acme"},
        "providers.kushki": {
            "private_merchant_id": "ku-private-0001",
            "public_merchant_id": "ku-public-0001",
        },
    }
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        values = {**common, **keys} if name.count(".") == 1 else keys
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value) + '"'


class WorkerProcess:
    """A running `linkworker` process whose log (stderr) is read continuously.

    Reading keeps the pipe from filling up (which would stall the worker), and lets a test wait
    for log events instead of sleeping.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.successes = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> WorkerProcess:
        return cls(await start_cli(*args, env=env))

    async def _read(self) -> None:
        assert self.process.stderr is not None
        try:
            while line := (await self.process.stderr.readline()).decode():
                self.lines.append(line)
                # job_succeeded is logged at debug: a test counting it runs at that level
                self.successes += '"job_succeeded"' in line
                self._changed.set()
        finally:
            self._changed.set()

    def saw(self, marker: str) -> bool:
        return any(marker in line for line in self.lines)

    async def wait_for(
        self, predicate: Callable[[WorkerProcess], bool], timeout_s: float = 60
    ) -> None:
        async def watch() -> None:
            while not predicate(self):
                if self._reader.done():
                    raise AssertionError("the worker exited first:\n" + "".join(self.lines[-20:]))
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout_s)

    async def wait_for_log(self, marker: str, timeout_s: float = 60) -> None:
        await self.wait_for(lambda worker: worker.saw(marker), timeout_s)

    async def finish(self, timeout_s: float = 60) -> int:
        """Wait for the process to exit (after a signal); returns its exit code."""
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll an in-process condition (e.g. the simulator's counters) until it holds."""

    async def watch() -> None:
        # the simulator's counters offer no event to wait on; a bounded poll of memory is exact
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    await asyncio.wait_for(watch(), timeout_s)


async def queue_fault(sim_url: str, provider: str, name: str, count: int = 1) -> None:
    """Make the simulator answer the next `count` creates of `provider` with fault `name`."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            sim_url + "/__faults", json={"provider": provider, "fault": name, "count": count}
        ) as response,
    ):
        assert response.status < 300, await response.text()
