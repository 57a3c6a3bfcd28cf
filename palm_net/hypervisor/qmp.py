"""A small async QMP client (QEMU Machine Protocol) on trio, and a QEMU process wrapper.

Ours rather than qemu.qmp: it is some 100 lines, runs on trio like the rest of
the agent (qemu.qmp is asyncio), and needs only execute/events.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import trio

MAX_LINE = 1 << 20


class QmpError(Exception):
    pass


class QmpClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str, timeout: float = 10) -> QmpClient:
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(path)
                    break
                except OSError:
                    await trio.sleep(0.05)  # QEMU still starting: poll its socket
            client = cls(stream)
            greeting = await client._read()
            if "QMP" not in greeting:
                raise QmpError("not a QMP greeting")
            await client.execute("qmp_capabilities")
        return client

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise QmpError("QEMU closed the QMP socket")
            self._buf += data
            if len(self._buf) > MAX_LINE:
                raise QmpError("QMP line too long")
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        obj: dict[str, Any] = json.loads(line)
        return obj

    async def execute(self, command: str, timeout: float = 30, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        with trio.fail_after(timeout):
            await self.stream.send_all(json.dumps(msg).encode() + b"\n")
            while True:
                obj = await self._read()
                if "event" in obj:
                    self.events.append(obj)
                    continue
                if "error" in obj:
                    raise QmpError(f"{command}: {obj['error'].get('desc', obj['error'])}")
                return obj.get("return")

    async def aclose(self) -> None:
        await self.stream.aclose()


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


class QemuProcess:
    """A QEMU process with a QMP socket, started and owned by us."""

    def __init__(self, workdir: Path, name: str, memory_mib: int, args: list[str] | None = None,
                 accel: str = "tcg", incoming: str | None = None) -> None:
        binary = qemu_binary()
        if binary is None:
            raise QmpError("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
        self.qmp_path = str(workdir / f"{name}.qmp")
        self.log_path = workdir / f"{name}.qemu.log"
        cmd = [binary, "-machine", f"pc,accel={accel}", "-m", str(memory_mib), "-nodefaults", "-nographic",
               "-display", "none", "-serial", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               *(args or [])]
        if incoming:
            cmd += ["-incoming", incoming]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.qmp: QmpClient | None = None

    async def start(self) -> QmpClient:
        if self.proc.poll() is not None:
            raise QmpError(f"QEMU exited: {self.log_path.read_text()[-500:]}")
        self.qmp = await QmpClient.connect(self.qmp_path)
        return self.qmp

    async def status(self) -> str:
        assert self.qmp is not None
        return str((await self.qmp.execute("query-status"))["status"])

    async def quit(self) -> None:
        if self.qmp is not None:
            try:
                await self.qmp.execute("quit", timeout=5)
            except (QmpError, trio.TooSlowError, OSError, trio.BrokenResourceError):
                pass
            await self.qmp.aclose()
            self.qmp = None
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
