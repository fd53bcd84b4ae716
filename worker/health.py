"""The worker's HTTP side door: /metrics for Prometheus, /healthz and /readyz for orchestrators.

    GET /metrics  the worker's registry in Prometheus text format
    GET /healthz  200 {"status": "alive", "uptime_s": ...}: alive means the event loop turns,
                  and this handler answering is the proof (a stuck loop answers nothing)
    GET /readyz   200 {"status": "ready", "checks": {...}} when `readiness()` says ready,
                  503 {"status": "not ready", "checks": {...}} naming what is wrong otherwise,
                  e.g. {"database": "unreachable", "listen": "down", "draining": "yes"}

`readiness` is the runner's: it must answer from state the worker already holds (connection
flags, the stop event) rather than query Postgres, since orchestrators probe every few seconds.
One that raises, or takes longer than READINESS_TIMEOUT_S, makes /readyz answer 503 saying so.
Scrapes and probes are not access-logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from worker.errors import ConfigError
from worker.logs import get_logger
from worker.metrics import CONTENT_TYPE, Metrics

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]

READINESS_TIMEOUT_S = 2.0


class HealthServer(web.AppRunner):
    """The running endpoint; `port` is the one bound (useful when asked for port 0)."""

    @property
    def port(self) -> int:
        return int(self.addresses[0][1])


class _Handlers:
    def __init__(self, metrics: Metrics, readiness: Readiness, readiness_timeout_s: float) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.readiness_timeout_s = readiness_timeout_s
        self.started = time.monotonic()
        self.log = get_logger()

    async def metrics_text(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def alive(self, _request: web.Request) -> web.Response:
        uptime_s = round(time.monotonic() - self.started, 3)
        return web.json_response({"status": "alive", "uptime_s": uptime_s})

    async def ready(self, _request: web.Request) -> web.Response:
        ready, checks = await self._check()
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return web.json_response(body, status=200 if ready else 503)

    async def _check(self) -> tuple[bool, dict[str, str]]:
        try:
            async with asyncio.timeout(self.readiness_timeout_s):
                return await self.readiness()
        except TimeoutError:
            return False, {"readiness": f"no answer within {self.readiness_timeout_s} s"}
        except Exception as exc:
            self.log.exception("readiness_check_crashed")
            return False, {"readiness": f"error: {type(exc).__name__}"}


def create_app(
    metrics: Metrics,
    readiness: Readiness,
    *,
    readiness_timeout_s: float = READINESS_TIMEOUT_S,
) -> web.Application:
    """The aiohttp application serving /metrics, /healthz and /readyz (GET and HEAD)."""
    handlers = _Handlers(metrics, readiness, readiness_timeout_s)
    app = web.Application()
    app.router.add_get("/metrics", handlers.metrics_text)
    app.router.add_get("/healthz", handlers.alive)
    app.router.add_get("/readyz", handlers.ready)
    return app


async def serve_health(
    port: int,
    host: str,
    metrics: Metrics,
    readiness: Readiness,
    *,
    readiness_timeout_s: float = READINESS_TIMEOUT_S,
) -> HealthServer:
    """Serve the endpoints on `host`:`port` (0: any free port, see `.port`) until `.cleanup()`.

    Raises ConfigError naming metrics_port/metrics_host when the address cannot be bound.
    """
    app = create_app(metrics, readiness, readiness_timeout_s=readiness_timeout_s)
    runner = HealthServer(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): choose another "
            "metrics_port (LINKWORKER_METRICS_PORT) or metrics_host (LINKWORKER_METRICS_HOST)"
        ) from None
    return runner
