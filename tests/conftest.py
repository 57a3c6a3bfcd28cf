from __future__ import annotations

import json
from pathlib import Path

import pytest

from palm_net.channel.handshake import ChannelConfig
from palm_net.crypto.identity import AgentIdentity, Authority, compute_measurement

ROOT = Path(__file__).resolve().parent.parent
CACOPHONY = ROOT.parent / "shared" / "noise" / "cacophony.txt"


@pytest.fixture(scope="session")
def cacophony() -> dict[str, dict]:
    if not CACOPHONY.exists():
        pytest.skip(f"Noise test vectors not found at {CACOPHONY}")
    vectors = json.loads(CACOPHONY.read_text())["vectors"]
    return {v["protocol_name"]: v for v in vectors if "init_psks" not in v and "resp_psks" not in v}


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
