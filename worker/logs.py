"""structlog, configured once at start: JSON lines when stderr is no terminal, colours when it is.

Events are snake_case (`job_failed`); per-lane fields are bound on the lane's logger; values
that could hold secrets (headers, payloads, credentials) are never passed to a log call.

The JSON chain can be on a hot path (at debug, a line per job, thousands a second), so its two
costly steps are done by hand: the timestamp reuses the formatted second and adds the
microseconds, and the line is encoded by one JSONEncoder built once (structlog's JSONRenderer
passes keyword arguments to json.dumps, which builds a new encoder for every line).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal

import structlog

from worker.redaction import Scrubber

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info",
    log_format: Literal["auto", "json", "console"] = "auto",
    secrets: Iterable[str] = (),
) -> None:
    """Set up structlog for the whole process; `secrets` are masked in every rendered line,
    tracebacks included (a last line of defence: no log call is given one on purpose)."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        render_json if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            UtcTimestamper(),
            structlog.processors.format_exc_info,
            renderer,
            _masker(secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class UtcTimestamper:
    """Adds `timestamp`, ISO 8601 in UTC with microseconds: 2026-11-23T16:31:05.637574Z.

    The date and time of day are formatted once per second; each line adds its microseconds.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


def _json_fallback(value: object) -> Any:
    """What structlog's JSONRenderer does with a value JSON cannot hold: its repr."""
    structlog_form = getattr(value, "__structlog__", None)
    return structlog_form() if callable(structlog_form) else repr(value)


_ENCODER = json.JSONEncoder(default=_json_fallback)


def render_json(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """The event as one JSON object, keys in the order they were added."""
    return _ENCODER.encode(event_dict)


def _masker(secrets: Iterable[str]) -> Any:
    """The last processor: the rendered line with every configured secret replaced by ***."""
    scrub = Scrubber(secrets)

    def mask(_logger: Any, _method: str, rendered: Any) -> Any:
        return scrub(rendered) if isinstance(rendered, str) else rendered

    return mask


def get_logger(**initial: Any) -> Any:
    """A logger with `initial` fields bound."""
    return structlog.get_logger("linkworker").bind(**initial)
