"""structlog, configured once at start: JSON lines when stderr is no terminal, colours when it is.

Events are snake_case (`job_succeeded`); per-lane fields are bound on the lane's logger; values
that could hold secrets (headers, payloads, credentials) are never passed to a log call.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
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
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
            _masker(secrets),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _masker(secrets: Iterable[str]) -> Any:
    """The last processor: the rendered line with every configured secret replaced by ***."""
    scrub = Scrubber(secrets)

    def mask(_logger: Any, _method: str, rendered: Any) -> Any:
        return scrub(rendered) if isinstance(rendered, str) else rendered

    return mask


def get_logger(**initial: Any) -> Any:
    """A logger with `initial` fields bound."""
    return structlog.get_logger("linkworker").bind(**initial)
