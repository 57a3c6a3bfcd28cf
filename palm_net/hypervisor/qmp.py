"""A small QMP client (QEMU Machine Protocol) over a Unix socket.

Ours rather than qemu.qmp: it is some 100 lines, and it is blocking on
purpose.  The migration engines call the hypervisor from worker threads (the
source's producer, the destination's pipeline), and qemu.qmp is asyncio while
the agent is trio.  A lock makes one client safe to share between threads;
asynchronous events are kept as they arrive and can be waited for.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from palm_net.hypervisor.backend import HypervisorError
from palm_net.jsonlines import JsonLines, LineError

MAX_LINE = 1 << 20
MAX_EVENTS = 256


class QmpError(HypervisorError):
    pass


Event = dict[str, Any]


class QmpClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lines = JsonLines(MAX_LINE)
        self._lock = threading.Lock()
        self.events: list[Event] = []

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> QmpClient:
        """Connects and negotiates capabilities.  QEMU creates its socket while
        starting, so a missing socket is retried until ``timeout`` (or until
        ``alive`` says the process is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(path)
                break
            except OSError as exc:
                sock.close()
                if alive is not None and not alive():
                    raise QmpError("QEMU exited while starting") from None
                if time.monotonic() >= deadline:
                    raise QmpError(f"no QMP socket at {path} ({exc.strerror or exc})") from None
                time.sleep(0.02)  # QEMU has not created its socket yet
        client = cls(sock)
        try:
            greeting = client._read(deadline)
            if "QMP" not in greeting:
                raise QmpError("not a QMP greeting")
            client.execute("qmp_capabilities", timeout=max(0.1, deadline - time.monotonic()))
        except BaseException:
            client.close()
            raise
        return client

    def _read(self, deadline: float) -> dict[str, Any]:
        while True:
            try:
                obj = self._lines.next()
            except LineError as exc:
                raise QmpError(f"QMP sent {exc}") from None
            if obj is not None:
                return obj
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP timeout")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError("QMP timeout") from None
            except OSError as exc:
                raise QmpError(f"QMP socket: {exc.strerror or exc}") from None
            if not data:
                raise QmpError("QEMU closed the QMP socket")
            self._lines.feed(data)

    @contextlib.contextmanager
    def _locked(self, timeout: float) -> Iterator[None]:
        # Another thread may be waiting for an event: a caller on the agent's
        # event loop must not hang behind it for long.
        if not self._lock.acquire(timeout=timeout):
            raise QmpError("QMP busy (another command or wait in progress)")
        try:
            yield
        finally:
            self._lock.release()

    def _keep(self, event: Event) -> None:
        self.events.append(event)
        del self.events[:-MAX_EVENTS]

    def execute(self, command: str, timeout: float = 30.0, pass_fd: int | None = None, **arguments: Any) -> Any:
        """Runs one command; ``pass_fd`` goes along with it (SCM_RIGHTS), as ``getfd`` needs."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            try:
                self.sock.settimeout(timeout)
                data = json.dumps(msg).encode() + b"\n"
                if pass_fd is None:
                    self.sock.sendall(data)
                else:  # the descriptor rides on the first byte; the rest follows as usual
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", [pass_fd]))])
                    self.sock.sendall(data[sent:])
            except OSError as exc:
                raise QmpError(f"QMP socket: {exc.strerror or exc}") from None
            while True:
                obj = self._read(deadline)
                if "event" in obj:
                    self._keep(obj)
                    continue
                if "error" in obj:
                    err = obj["error"]
                    raise QmpError(f"{command}: {err.get('desc', err) if isinstance(err, dict) else err}")
                return obj.get("return")

    def wait_event(self, match: Callable[[Event], bool], timeout: float) -> Event:
        """The first kept or arriving event that ``match``es (it is consumed)."""
        deadline = time.monotonic() + timeout
        with self._locked(timeout):
            while True:
                for i, ev in enumerate(self.events):
                    if match(ev):
                        return self.events.pop(i)
                obj = self._read(deadline)
                if "event" in obj:
                    self._keep(obj)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
