"""A TCP proxy in front of Postgres that a test can cut and restore: a network cut, a restart or
a failover as the worker sees it, on the embedded server (Unix socket) and a system one alike."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class PgProxy:
    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.cut_off = False
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, database_url: str) -> str:
        """`database_url` (same server) reached through this proxy over TCP."""
        parts = urlsplit(database_url)
        user = parts.username or "postgres"
        return urlunsplit(("postgresql", f"{user}@127.0.0.1:{self.port}", parts.path, "", ""))

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.server_url)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        if socket_dir.startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{parts.port or 5432}")
        return await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 5432)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        up_reader, up_writer = await self._upstream()
        self.links |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self.links.discard(writer)

    def cut(self) -> None:
        """Drop every connection and refuse new ones, until `restore`."""
        self.cut_off = True
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
