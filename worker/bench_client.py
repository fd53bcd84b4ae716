"""The bare HTTP client: the HTTP ceiling the worker's throughput is measured against.

    python -m worker.bench_client URL REQUESTS CONCURRENCY

sends REQUESTS Cheqpay creates (a real body, the worker's headers, a distinct API key so the
simulator counts them apart) over one `ClientSession` with CONCURRENCY senders, reads every
answer, and prints one JSON line: requests, ok (201s), elapsed_s, requests_per_s and cpu_s.
It does nothing else: no queue, no validation, no bookkeeping, no logging; what it reaches is
what one Python process on this machine can push through aiohttp to this simulator.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator

import aiohttp

from worker.samples import cheqpay_payload

API_KEY = "bench-bare-client"
PATH = "/lps/payment-links"
USAGE = "usage: python -m worker.bench_client URL REQUESTS CONCURRENCY"


def request_body() -> bytes:
    """One Cheqpay create body, as the worker would send it (reference and isDraft filled)."""
    payload = {**cheqpay_payload(1), "reference": "bench-bare-client", "isDraft": False}
    return json.dumps(payload, separators=(",", ":")).encode()


async def send_all(url: str, requests: int, concurrency: int) -> dict[str, float]:
    """Send `requests` creates with `concurrency` senders; the figures of the run."""
    body = request_body()
    target = url.rstrip("/") + PATH
    numbers: Iterator[int] = iter(range(requests))  # shared: each number is taken once
    ok = 0

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for number in numbers:
            headers = {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "x-api-key": API_KEY,
                "Idempotency-Key": f"bench-bare-{number}",
            }
            async with session.post(target, data=body, headers=headers) as response:
                await response.read()
                ok += response.status == 201

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        cpu_started = time.process_time()
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
        elapsed_s = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
    return {
        "requests": requests,
        "ok": ok,
        "elapsed_s": elapsed_s,
        "requests_per_s": requests / elapsed_s,
        "cpu_s": cpu_s,
    }


def main(argv: list[str]) -> int:
    try:
        url, requests, concurrency = argv[0], int(argv[1]), int(argv[2])
    except (IndexError, ValueError):
        print(USAGE, file=sys.stderr)
        return 2
    if len(argv) != 3 or requests < 1 or concurrency < 1:
        print(USAGE, file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(send_all(url, requests, concurrency))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
