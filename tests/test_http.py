"""The HTTP boundary: answers read whole when small, cut at MAX_BODY_BYTES when not."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from worker import http
from worker.jobs import ProviderRequest

BIG = http.MAX_BODY_BYTES + 1000


async def small(request: web.Request) -> web.Response:
    return web.json_response({"url": "https://pay.example/l/1", "echo": await request.text()})


async def big_with_length(_request: web.Request) -> web.Response:
    return web.Response(body=b"x" * BIG)


async def big_chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(BIG // 4096 + 1):
        await response.write(b"y" * 4096)
    await response.write_eof()
    return response


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/small", small)
    app.router.add_post("/big-length", big_with_length)
    app.router.add_post("/big-chunked", big_chunked)
    async with TestServer(app) as test_server:
        yield test_server


async def call(server: TestServer, path: str) -> http.Answer:
    request = ProviderRequest("POST", path, {"Content-Type": "application/json"}, b'{"a":1}')
    async with http.create_session(4) as session:
        return await http.send(
            session, str(server.make_url("/")), request, aiohttp.ClientTimeout(total=10)
        )


async def test_a_small_answer_is_read_whole(server: TestServer) -> None:
    answer = await call(server, "/small")
    assert answer.status == 200
    assert answer.body == b'{"url": "https://pay.example/l/1", "echo": "{\\"a\\":1}"}'


@pytest.mark.parametrize("path", ["/big-length", "/big-chunked"])
async def test_a_large_answer_is_cut_at_the_limit(server: TestServer, path: str) -> None:
    answer = await call(server, path)
    assert answer.status == 200
    assert len(answer.body) == http.MAX_BODY_BYTES
