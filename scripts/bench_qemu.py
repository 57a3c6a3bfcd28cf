"""QEMU alone, for scripts/bench.py (issue 14, goal 4): the baseline palm_net's QEMU migration is judged against.

A bare QEMU pair (palm_net's own QEMU VMs refuse -object), the same guest as
the palm_net QEMU VM (memory size, content loaded by `-device loader`),
migrated by QEMU itself over plain TCP or over its TLS (x509 credentials,
verify-peer), on a given accelerator.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from palm_net.hypervisor.qemu import qemu_binary
from palm_net.hypervisor.qmp import QmpClient, QmpError

MIB = 1 << 20
GIB = 1 << 30


def make_tls_creds(d: Path) -> str | None:
    """ca-cert.pem and {server,client}-{cert,key}.pem in d (certtool, else openssl); None, or why not."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "client-cert.pem").exists():
        return None
    if shutil.which("certtool"):
        _certtool_creds(d)
        return None
    if shutil.which("openssl"):
        _openssl_creds(d)
        return None
    return "neither certtool (gnutls-bin) nor openssl is installed"


def _certtool_creds(d: Path) -> None:
    def tool(*args: str, template: str | None = None) -> None:
        cmd = ["certtool", *args]
        if template is not None:
            tp = d / "tmpl"
            tp.write_text(template)
            cmd += ["--template", str(tp)]
        subprocess.run(cmd, check=True, capture_output=True)

    tool("--generate-privkey", "--outfile", str(d / "ca-key.pem"))
    tool("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"), "--outfile", str(d / "ca-cert.pem"),
         template="cn = bench CA\nca\ncert_signing_key\nexpiration_days = 1\n")
    for role, extra in (("server", "tls_www_server\n"), ("client", "tls_www_client\n")):
        tool("--generate-privkey", "--outfile", str(d / f"{role}-key.pem"))
        tool("--generate-certificate", "--load-privkey", str(d / f"{role}-key.pem"), "--load-ca-certificate",
             str(d / "ca-cert.pem"), "--load-ca-privkey", str(d / "ca-key.pem"), "--outfile",
             str(d / f"{role}-cert.pem"),
             template=f"cn = 127.0.0.1\nip_address = 127.0.0.1\ndns_name = localhost\n{extra}"
                      "encryption_key\nsigning_key\nexpiration_days = 1\n")


def _openssl_creds(d: Path) -> None:
    """The same credentials with the openssl CLI: the key usages QEMU's x509 checks want."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "1",
        "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for i, (role, usage) in enumerate((("server", "serverAuth"), ("client", "clientAuth")), start=1):
        (d / f"{role}.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                       f"extendedKeyUsage={usage}\n"
                                       "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem", "-out", f"{role}.csr",
            "-subj", "/CN=127.0.0.1")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-set_serial", str(i),
            "-out", f"{role}-cert.pem", "-days", "1", "-extfile", f"{role}.ext")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchQemu:
    """A bare QEMU for the QEMU-alone runs."""

    def __init__(self, work: Path, name: str, memory: int, accel: str, args: list[str], incoming: bool) -> None:
        binary = qemu_binary()
        assert binary is not None
        self.qmp_path = str(work / f"{name}.qmp")
        cmd = [binary, "-machine", f"pc,accel={accel}", "-m", str(memory // MIB), "-nodefaults",
               "-display", "none", "-serial", "none", "-monitor", "none",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args]
        if incoming:
            cmd += ["-incoming", "defer"]
        with open(work / f"{name}.qemu.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.qmp = QmpClient.connect(self.qmp_path, 20, alive=lambda: self.proc.poll() is None)

    def quit(self) -> None:
        try:
            self.qmp.execute("quit", timeout=5)
        except QmpError:
            pass
        self.qmp.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def event_time(ev: dict[str, Any]) -> float:
    ts = ev["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


# How long a guest runs before it is migrated: past its firmware's start.  Under
# KVM the guest's first second rewrites its RAM, and a migration started then sends
# every page twice (QEMU alone, 1 GiB: 1028 MiB after 0.5 s, 514 MiB after 1.5 s,
# 3 s and 5 s); the goal is an idle guest's.
SETTLE = 3.0


def loader_args(content: Path) -> list[str]:
    return ["-device", f"loader,file={content},addr=0x1000000,force-raw=on"]


def qemu_migrate_once(work: Path, memory: int, content: Path, accel: str, tls: bool,
                      downtime_ms: int, channels: int = 1) -> dict[str, Any]:
    """One QEMU-alone migration (source and destination QEMU on loopback); total and the guest's real pause.
    ``channels`` > 1: QEMU's multifd with ``channels`` - 1 multifd streams, as palm_net's N channels."""
    port = free_port()

    def creds(endpoint: str) -> list[str]:
        return ["-object", f"tls-creds-x509,id=tls0,dir={work / 'tls' / endpoint},endpoint={endpoint},"
                "verify-peer=on"] if tls else []

    if tls:  # QEMU expects ca-cert.pem + {server,client}-{cert,key}.pem in the dir
        for endpoint in ("server", "client"):
            ed = work / "tls" / endpoint
            ed.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "tls" / "ca-cert.pem", ed / "ca-cert.pem")
            shutil.copy(work / "tls" / f"{endpoint}-cert.pem", ed / f"{endpoint}-cert.pem")
            shutil.copy(work / "tls" / f"{endpoint}-key.pem", ed / f"{endpoint}-key.pem")
    src = BenchQemu(work, "src", memory, accel, [*loader_args(content), *creds("client")], incoming=False)
    try:
        dst = BenchQemu(work, "dst", memory, accel, [*loader_args(content), *creds("server")], incoming=True)
    except BaseException:
        src.quit()
        raise
    try:
        qs, qd = src.qmp, dst.qmp
        params: dict[str, Any] = {"max-bandwidth": 100 * GIB, "downtime-limit": downtime_ms}
        if tls:
            params["tls-creds"] = "tls0"
            qd.execute("migrate-set-parameters", **{"tls-creds": "tls0"})
        if channels > 1:
            for q in (qs, qd):
                q.execute("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                q.execute("migrate-set-parameters", **{"multifd-channels": channels - 1})
        qd.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        qs.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        qs.execute("migrate-set-parameters", **params)
        time.sleep(SETTLE)  # let the guest run past its firmware's start, as the palm_net runs' guests do
        t0 = time.perf_counter()
        qs.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        ev = qs.wait_event(lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in
                           ("completed", "failed", "cancelled"), 300)
        wall_ms = (time.perf_counter() - t0) * 1000
        info = qs.execute("query-migrate")
        if ev["data"]["status"] != "completed":
            raise QmpError(f"QEMU migration {ev['data']['status']}: {info.get('error-desc', '')}")
        ram = info.get("ram", {})
        # The guest's real pause: the source's STOP event to the destination's
        # RESUME event (QEMU's own "downtime" ends when the source completes).
        resume = qd.wait_event(lambda e: e.get("event") == "RESUME", 60)
        stop = [e for e in qs.events if e.get("event") == "STOP"][-1]
        e2e_ms = (event_time(resume) - event_time(stop)) * 1000
        # QEMU's own total-time, and our wall clock from `migrate` to the
        # "completed" event as a cross-check (QEMU has reported 0 here).
        return {"total_ms": float(info.get("total-time") or wall_ms), "wall_ms": wall_ms,
                "downtime_ms": e2e_ms, "qemu_downtime_ms": float(info["downtime"]),
                "rounds": ram.get("dirty-sync-count"), "bytes": ram.get("transferred")}
    finally:
        src.quit()
        dst.quit()
