"""The control API's client (proto/PROTOCOL.md 9), beside its server (palm_net.agent.control).

Blocking on purpose: the `palm` command, the launcher of test and drill
agents, and scripts call it from plain threads.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from palm_net.jsonlines import JsonLines, LineError

CONTROL_VERSION = 1
# The one wording of a migration the operator cancelled (Ctrl-C, --cancel, a client gone), in its
# result's error, `palm migrations` and the command's own line.
CANCELLED = "cancelled by the operator"
MAX_ANSWER_LINE = 16 << 20


class ControlError(Exception):
    """The agent refused the request, or could not be reached (one line)."""


def control_request(path: str, op: str, args: dict[str, Any],
                    on_event: Callable[[dict[str, Any]], None] | None = None, timeout: float = 3600) -> Any:
    """One request; ``on_event`` sees the progress lines before the answer."""
    try:
        present = Path(path).exists()
    except PermissionError:  # a directory of another user's (root's agent) on the way
        raise ControlError(_denied(path)) from None
    if not present:
        raise ControlError(f"no agent at {path} (is `palm agent` running with --control {path}?)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except PermissionError:
        s.close()
        raise ControlError(_denied(path)) from None
    except OSError as exc:
        s.close()
        raise ControlError(f"no agent at {path} ({exc.strerror or exc})") from None
    try:
        s.sendall(json.dumps({"v": CONTROL_VERSION, "op": op, "args": args}).encode() + b"\n")
        for obj in _lines(s):
            if "event" in obj:
                if on_event:
                    on_event(obj)
                continue
            if not obj.get("ok"):
                raise ControlError(str(obj.get("error", "agent refused the request")))
            return obj.get("result")
    except TimeoutError:
        raise ControlError(f"agent at {path} did not answer in time") from None
    except OSError as exc:
        raise ControlError(f"lost the agent at {path} ({exc.strerror or exc})") from None
    finally:
        s.close()
    raise ControlError(f"agent at {path} closed the connection without an answer")


def _denied(path: str) -> str:
    owner = "it runs as root: use sudo" if os.geteuid() != 0 else "the socket is another user's"
    return f"cannot reach the agent at {path}: permission denied ({owner})"


def _lines(s: socket.socket) -> Iterator[dict[str, Any]]:
    lines = JsonLines(MAX_ANSWER_LINE)
    while True:
        data = s.recv(65536)
        if not data:
            return
        lines.feed(data)
        try:
            while (obj := lines.next()) is not None:
                yield obj
        except LineError as exc:
            raise ControlError(f"agent sent a malformed answer: {exc}") from None
