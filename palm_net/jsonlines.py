"""Newline-delimited JSON objects, bounded (sans-IO): what the control socket, its
client and QMP speak.  Bytes go in as they arrive; whole lines come out as dicts.
A line longer than the bound is refused before it is all buffered, and so is one
that is not a JSON object.  Imports nothing of palm_net: every layer may use it."""

from __future__ import annotations

import json
from typing import Any


class LineError(ValueError):
    """A line that is too long, not JSON, or not an object (the message says which)."""


class JsonLines:
    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def __len__(self) -> int:
        """Bytes held, not yet taken as a line."""
        return len(self._buf)

    def next(self) -> dict[str, Any] | None:
        """The next whole line's object (blank lines are skipped), or None until one is whole."""
        while True:
            end = self._buf.find(b"\n")
            if (end < 0 and len(self._buf) > self.max_line) or end > self.max_line:
                raise LineError(f"a line over the limit of {self.max_line} bytes")
            if end < 0:
                return None
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if line.strip():
                return _object(line)

    def finish(self) -> dict[str, Any] | None:
        """At the stream's end: what its last line holds if it lacks its newline."""
        rest, self._buf = bytes(self._buf), bytearray()
        return _object(rest) if rest.strip() else None


def _object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # (a deeply nested line)
        raise LineError("a line that is not JSON") from None
    if not isinstance(obj, dict):
        raise LineError("a line that is not a JSON object")
    return obj
