"""The "TLS copy" baseline peer of scripts/bench.py (issue 14, goal 1).

The same number of bytes a migration moves, copied over loopback TLS 1.3
(Python's `ssl`, OpenSSL, AES-256-GCM) from the memory of one process into
fresh memory of another: the receiver is a forked process that maps a new
memfd (never touched before, so it pays the kernel's page clear and fault per
page exactly as a migration's destination does) and receives into it in
place.  Timed from the first byte sent to the receiver's one-byte
acknowledgement that all bytes arrived; the TLS handshake, the certificate
and the source's fill are outside the timing.

    python scripts/bench_tls.py 512MiB [random|zero] [repeats]
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
SEND_SLICE = 4 * MIB
EXPECTED_CIPHER = "TLS_AES_256_GCM_SHA384"


def make_cert(d: Path) -> tuple[Path, Path]:
    """A throw-away self-signed P-256 certificate for 127.0.0.1 (the `openssl` CLI)."""
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / "key.pem", d / "cert.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def _contexts(key: Path, cert: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(str(cert))
    for ctx in (server, client):
        # TLS 1.3 only.  Python's ssl cannot choose TLS 1.3 suites; OpenSSL's
        # default list puts TLS_AES_256_GCM_SHA384 first, and the negotiated
        # suite is checked and reported with every copy.
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return server, client


def _sink(lsock: socket.socket, key: Path, cert: Path, size: int, conn: Any) -> None:
    server, _ = _contexts(key, cert)
    raw, _ = lsock.accept()
    lsock.close()
    s = server.wrap_socket(raw, server_side=True)
    fd = os.memfd_create("tlscopy-dst")  # fresh memory of this process, populated by the writes
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    view = memoryview(m)
    got = 0
    while got < size:
        n = s.recv_into(view[got:], min(SEND_SLICE, size - got))
        if not n:
            break
        got += n
    s.sendall(b"k")
    conn.send(got)
    view.release()
    m.close()
    os.close(fd)
    s.close()


class TlsCopy:
    """Copies ``size`` bytes over loopback TLS 1.3 into a fresh memfd of a forked process."""

    def __init__(self, work: Path) -> None:
        self.key, self.cert = make_cert(work / "tlscopy")

    def copy(self, size: int, fill: str = "random", seed: int = 1) -> dict[str, Any]:
        ctx = mp.get_context("fork")
        lsock = socket.create_server(("127.0.0.1", 0))
        parent, child = ctx.Pipe(duplex=False)
        # Forked before the source is filled: the receiver inherits nothing populated.
        proc = ctx.Process(target=_sink, args=(lsock, self.key, self.cert, size, child), daemon=True)
        proc.start()
        child.close()
        src = mmap.mmap(-1, size)
        try:
            if fill == "random":
                _fill_random(src, size, seed)
            elif fill != "zero":
                raise ValueError(f"unknown fill {fill!r} (random, zero)")
            else:
                src.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))  # resident, like a running guest's
            _, client = _contexts(self.key, self.cert)
            s = client.wrap_socket(socket.create_connection(lsock.getsockname()), server_hostname="127.0.0.1")
            lsock.close()
            try:
                s.do_handshake()
                cipher, version, bits = s.cipher() or ("?", "?", 0)
                view = memoryview(src)
                t = time.perf_counter()
                for off in range(0, size, SEND_SLICE):
                    s.sendall(view[off : off + SEND_SLICE])
                ack = s.recv(1)
                ms = (time.perf_counter() - t) * 1000
                view.release()
            finally:
                s.close()
            got = parent.recv() if parent.poll(30) else -1
            proc.join(30)
            if ack != b"k" or got != size:
                raise RuntimeError(f"TLS copy incomplete: receiver got {got} of {size} bytes")
            return {"ms": ms, "cipher": cipher, "version": version, "bits": bits,
                    "gibs": size / (1 << 30) / (ms / 1000)}
        finally:
            src.close()
            if proc.is_alive():
                proc.kill()
                proc.join()


def _fill_random(mem: mmap.mmap, size: int, seed: int) -> None:
    try:
        from palm_net.hypervisor.model_guest import fill_pseudorandom  # the model's own: the same kind of bytes
    except ImportError:
        chunk = os.urandom(MIB)
        for off in range(0, size, MIB):
            n = min(MIB, size - off)
            mem[off : off + n] = chunk[:n]
        return
    fill_pseudorandom(mem, 0, size, seed)


def main() -> int:
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from palm_net.units import parse_size
    size = parse_size(sys.argv[1] if len(sys.argv) > 1 else "512MiB")
    fill = sys.argv[2] if len(sys.argv) > 2 else "random"
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory() as d:
        tc = TlsCopy(Path(d))
        for _ in range(reps):
            r = tc.copy(size, fill)
            print(f"{r['ms']:.0f} ms, {r['gibs']:.2f} GiB/s, {r['cipher']} {r['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
