"""structlog set-up: one event per line, JSON or console, to stderr.

A processor drops any value that looks like key material (bytes, or fields
named like keys) so nothing secret can reach a log by accident.  Tracebacks
are always plain: structlog's console default (rich or better-exceptions,
when installed) prints every frame's local variables, keys included, past
that processor.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_WORDS = ("key", "secret", "token", "nonce", "private", "seed", "plaintext")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event):
        v = event[k]
        if isinstance(v, (bytes, bytearray, memoryview)) or any(w in k.lower() for w in _SECRET_WORDS):
            event[k] = "<redacted>"
    return event


class _Stderr:
    """Whatever sys.stderr is when a line is written (tests capture it after configuring)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: str = "console", level: str = "info") -> None:
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    json_out = fmt == "json"
    renderer: Any = (structlog.processors.JSONRenderer() if json_out
                     else structlog.dev.ConsoleRenderer(colors=False, repr_native_str=True,  # quoted: no injection
                                                        exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            # JSON: the traceback as one plain string field (no locals).
            *([structlog.processors.ExceptionRenderer()] if json_out else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
