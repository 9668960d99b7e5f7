"""Structured logging for every daemon: key=value lines for people, JSON lines for collectors.

Context (request id, volume, session) is bound with `structlog.contextvars.bind_contextvars`
and appears on every line logged while it is bound.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from lunastor.common.config import ConfigError, LogSettings

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def setup_logging(settings: LogSettings, daemon: str, **context: Any) -> structlog.BoundLogger:
    """Configure structlog and the stdlib root logger; return a logger bound to `daemon`."""
    level = LEVELS.get(settings.level.lower())
    if level is None:
        raise ConfigError(f"log.level: expected one of {', '.join(LEVELS)}, got {settings.level!r}")
    if settings.format == "json":
        renderer: Any = structlog.processors.JSONRenderer()
    elif settings.format == "kv":
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["ts", "level", "daemon", "event"], drop_missing=True
        )
    else:
        raise ConfigError(f"log.format: expected kv or json, got {settings.format!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use the standard logging module (aiohttp, grpc) go to the same stream.
    logging.basicConfig(
        level=max(level, logging.WARNING),
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s event=%(message)r",
        force=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(daemon=daemon, **context)
    logger: structlog.BoundLogger = structlog.get_logger()
    return logger


def get_logger(**context: Any) -> Any:
    """A logger carrying `context`, lazy: modules bind theirs at import, before the daemon's
    `setup_logging` runs, and each call must still go through the configured level and
    format (a logger bound eagerly keeps structlog's defaults: console format, every level)."""
    return structlog.get_logger(**context)
