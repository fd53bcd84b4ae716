"""The one HTTP boundary: a long-lived aiohttp session, and aiohttp's errors in our own terms.

    could not connect (refused, DNS, TLS, connect timeout)  -> RetryableError: nothing was sent
    timeout, reset or disconnect after the request left      -> UnknownOutcomeError: may exist

Bodies are read up to `MAX_BODY_BYTES`; a larger answer is cut there (it is no link response).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from worker.errors import RetryableError, UnknownOutcomeError
from worker.jobs import ProviderRequest

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def create_session(max_connections: int) -> aiohttp.ClientSession:
    """The process's one ClientSession; timeouts are given per request (per lane)."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=60),
        headers={"User-Agent": "linkworker/0.1"},
        raise_for_status=False,
    )


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    request: ProviderRequest,
    limits: aiohttp.ClientTimeout,
) -> Answer:
    """Send one request and read its answer, translating transport failures."""
    url = base_url.rstrip("/") + request.path
    try:
        async with session.request(
            request.method,
            url,
            data=request.body,
            headers=request.headers,
            timeout=limits,
            # a redirect would repeat the POST with its credentials to another host, unmetered
            allow_redirects=False,
        ) as response:
            body = await _read_bounded(response)
            return Answer(response.status, response.headers, body)
    except aiohttp.ConnectionTimeoutError as exc:
        raise RetryableError(f"could not connect to {base_url} in time: nothing was sent") from exc
    except aiohttp.ClientConnectorError as exc:
        raise RetryableError(f"could not connect to {base_url}: {exc.os_error}") from exc
    except TimeoutError as exc:
        raise UnknownOutcomeError(
            f"no answer from {base_url} within {limits.total} s after sending; "
            "the link may have been created"
        ) from exc
    except aiohttp.ClientError as exc:
        raise UnknownOutcomeError(
            f"the connection to {base_url} failed after sending ({type(exc).__name__}); "
            "the link may have been created"
        ) from exc


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    length = response.content_length
    if length is not None and length <= MAX_BODY_BYTES:
        return await response.read()  # the usual answer: small, its length announced
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY_BYTES:
            break
    return b"".join(chunks)[:MAX_BODY_BYTES]
