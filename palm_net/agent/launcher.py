"""Start agents as separate processes: the demo, benchmarks, drills and tests use this.

``provision`` makes a throw-away authority and agent identities with
certificates; ``AgentProcess`` runs `palm agent` on one of them and waits
until its control socket answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from palm_net.agent.agent import default_measurement
from palm_net.agent.client import ControlError, control_request
from palm_net.crypto.identity import CA_PUB_FILE, CERT_FILE, OPERATOR_ROLE, AgentIdentity, Authority
from palm_net.hypervisor.qemu import kill_all_under


def provision(root: Path, names: list[str], days: float = 1, measurement: bytes | None = None) -> Authority:
    """An authority in root/ca and, for each name, an agent directory root/NAME with a certificate."""
    ca = Authority.generate()
    ca.save(root / "ca")
    m = measurement or default_measurement()
    for name in names:
        ident = AgentIdentity.generate(name)
        ident.save(root / name)
        (root / name / CERT_FILE).write_bytes(ca.issue(name, ident.static.public, ident.sign_pub, m,
                                                        days=days).encode())
    return ca


def provision_operator(root: Path, ca: Authority, name: str = "ops", days: float = 1) -> Path:
    """An operator's directory root/NAME (as `palm keygen` then `palm ca issue --role operator`):
    what `palm cluster ... --signer DIR` signs the cluster's policy with."""
    d = root / name
    ident = AgentIdentity.generate(name)
    ident.save(d)
    (d / CERT_FILE).write_bytes(ca.issue(name, ident.static.public, ident.sign_pub, bytes(32), (OPERATOR_ROLE,),
                                         days=days).encode())
    (d / CA_PUB_FILE).write_text(ca.public.hex() + "\n")
    return d


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """One `palm agent` process with its own state directory, log file and control socket."""

    def __init__(self, root: Path, name: str, host: str = "127.0.0.1", port: int | None = None,
                 extra: list[str] | None = None, prefix: list[str] | None = None, log_level: str = "info",
                 env: dict[str, str] | None = None) -> None:
        self.root, self.name, self.host = root, name, host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")  # noqa: S104
        self.extra = extra or []
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", NS]
        self.log_level = log_level
        self.env = env  # added to this process's environment (e.g. PALM_FAULT for a fault drill)
        self.control = str(root / f"{name}.sock")
        self.images_dir = root / f"{name}-images"  # what a QEMU guest's -device loader may load (copy files here)
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20) -> AgentProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "palm_net.cli", "--log-format", "json", "--log-level", self.log_level,
             "agent", "--dir", str(self.root / self.name), "--listen", f"{self.host}:{self.port}",
             "--control", self.control, "--ca", str(self.root / "ca" / "ca.pub"),
             "--memory-dir", str(self.root / f"{self.name}-mem"), "--run-dir", str(self.root / f"{self.name}-run"),
             "--images-dir", str(self.images_dir),
             *self.extra],
            stdout=log, stderr=log, start_new_session=True, env={**os.environ, **self.env} if self.env else None)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ControlError(f"agent {self.name} exited at start (status {self.proc.returncode}): "
                                   f"{self.log_tail(500)}")
            if Path(self.control).exists():
                with contextlib.suppress(ControlError):
                    self.request("status", timeout=5)
                    return self
            time.sleep(0.05)
        raise ControlError(f"agent {self.name} did not start within {timeout:g} s")

    def request(self, op: str, timeout: float = 3600, **args: Any) -> Any:
        return control_request(self.control, op, args, timeout=timeout)

    def migrate_async(self, name: str, to: str, timeout: float = 300,
                      **args: Any) -> tuple[threading.Thread, dict[str, Any]]:
        """Starts `migrate` in a thread; ``out`` gets "result" or "error" (the agent may be killed meanwhile)."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["result"] = self.request("migrate", timeout=timeout, name=name, to=to, **args)
            except ControlError as exc:
                out["error"] = str(exc)

        t = threading.Thread(target=run, name=f"migrate-{name}", daemon=True)
        t.start()
        return t, out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""


def remove_all(root: Path, agents: Iterable[AgentProcess]) -> None:
    """Test and drill teardown: stops the agents, kills the QEMU guests they
    started (which outlive their agents by design), removes ``root``."""
    for ag in agents:
        ag.stop()
    kill_all_under(root)
    shutil.rmtree(root, ignore_errors=True)
