from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest

from palm_net.channel.handshake import ChannelConfig
from palm_net.crypto.identity import AgentIdentity, Authority, compute_measurement
from palm_net.testing import scratch
from palm_net.testing.cluster import LocalCluster
from palm_net.wire import messages

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))  # the model hypervisor's host key, in every engine-level test
# Examples run by the fuzzers, printed at the end of the run (CI's record).
FUZZ_COUNTS: collections.Counter[str] = collections.Counter()


COUNTS_DIR = ROOT / ".pytest-fuzz-counts"


def pytest_configure(config) -> None:
    # In-process agents log as the real ones do (plain tracebacks, redaction).
    from palm_net import logs

    logs.configure("console", "debug")


def pytest_sessionstart(session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        scratch.sweep()  # what killed runs left (guest memory is large)
        shutil.rmtree(COUNTS_DIR, ignore_errors=True)
        COUNTS_DIR.mkdir(exist_ok=True)


def pytest_sessionfinish(session) -> None:
    scratch.remove_own()
    worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
    if FUZZ_COUNTS:
        COUNTS_DIR.mkdir(exist_ok=True)
        (COUNTS_DIR / f"{worker}.json").write_text(json.dumps(FUZZ_COUNTS))


def pytest_terminal_summary(terminalreporter) -> None:
    if hasattr(terminalreporter.config, "workerinput"):
        return  # xdist workers have reporters too: only the controller sums up
    total: collections.Counter[str] = collections.Counter()
    for f in COUNTS_DIR.glob("*.json"):
        total.update(json.loads(f.read_text()))
    shutil.rmtree(COUNTS_DIR, ignore_errors=True)
    if total:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
        terminalreporter.write_line(f"fuzz examples run: {counts}")
NOISE_VECTORS = ROOT / "tests" / "vectors" / "cacophony_subset.json"  # source and checksum inside


@pytest.fixture(scope="session")
def cacophony() -> dict[str, dict]:
    vectors = json.loads(NOISE_VECTORS.read_text())["vectors"]
    return {v["protocol_name"]: v for v in vectors}


class Pki:
    """A throw-away authority issuing agent configs."""

    def __init__(self) -> None:
        self.authority = Authority.generate()
        self.measurement = compute_measurement()

    def config(self, name: str, **kw) -> ChannelConfig:
        ident = AgentIdentity.generate(name)
        cert_kw = {k: kw.pop(k) for k in ("roles", "days", "not_before") if k in kw}
        measurement = kw.pop("measurement", self.measurement)
        authority = kw.pop("authority", self.authority)
        cert = authority.issue(name, ident.static.public, ident.sign_pub, measurement, **cert_kw)
        kw.setdefault("allowed_measurements", frozenset({self.measurement}))
        return ChannelConfig(ident, cert, self.authority.public, measurement, **kw)


@pytest.fixture
def pki() -> Pki:
    return Pki()


@pytest.fixture
async def cluster(nursery):
    """Two in-process agents, a and b, on loopback (palm_net.testing.cluster)."""
    async with LocalCluster.started(nursery, in_doubt_wait=3.0) as c:
        yield c


@pytest.fixture
def shm():
    """A private scratch directory on tmpfs (where guest memory lives), removed after."""

    d = scratch.mkdtemp("palm-t-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def raw_message(mtype: str, mid: bytes, seq: int, body: dict) -> bytes:
    """A message as a forger writes it: any body, no bounds checked (the typed
    classes refuse to make such a message; the decoder must refuse to take it)."""
    import msgpack

    return msgpack.packb({"v": messages.WIRE_VERSION, "t": mtype, "mid": mid, "seq": seq, "b": body},
                         use_bin_type=True)


def data_bytes(fd: int) -> int:
    """Bytes of a tmpfs file that hold data: pages written or faulted in (cleared), not
    those only reserved or never touched (SEEK_DATA counts a page once it is up to date)."""
    size, total, off = os.fstat(fd).st_size, 0, 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past off
            break
        off = os.lseek(fd, start, os.SEEK_HOLE)
        total += off - start
    return total
