"""Deterministic vectors for palm_net's own handshake and first records
(a page backend's BEGIN/ACCEPT; a stream backend's BEGIN/ACCEPT, STREAM and its
data record, STREAM_END; the plain benchmark mode's sealed BEGIN/ACCEPT, a clear
PAGES with its clear data record, and a sealed ROUND_END).

Fixed keys, ephemerals, certificate window and clock make every byte
reproducible (Ed25519 signatures are deterministic).  ``proto/vectors/*.json``
is what this produces; tests recompute and compare.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from nacl.signing import SigningKey

from palm_net.channel.handshake import AttestedHandshake, ChannelConfig, Purpose, TransportMode
from palm_net.crypto.identity import AgentIdentity, Authority
from palm_net.crypto.noise import CipherName, keypair_from_private
from palm_net.hypervisor.metadigest import MetadataDigest
from palm_net.wire.messages import (
    Accept,
    Begin,
    Bind,
    Channels,
    Commit,
    Complete,
    Context,
    CpuState,
    Fetch,
    Keys,
    Missing,
    Pulled,
    Ready,
    RoundEnd,
    Running,
    Stream,
    StreamEnd,
)
from palm_net.wire.pages import PageBatch, gfn_bitmap, u64le
from palm_net.wire.protocol import Role, SessionProtocol

INPUTS: dict[str, Any] = {
    "authority_seed": "a0" * 32,
    "source": {"name": "host-a", "x25519": "01" * 32, "ed25519_seed": "11" * 32, "ephemeral": "21" * 32},
    "destination": {"name": "host-b", "x25519": "02" * 32, "ed25519_seed": "12" * 32, "ephemeral": "22" * 32},
    "measurement": "5a" * 32,
    "not_before": 1_700_000_000,
    "days": 36500,
    "clock": 1_800_000_000,
    "roles": ["source", "destination"],
    "migration_id": "00112233445566778899aabbccddeeff",
}


def _config(side: dict[str, str], authority: Authority, inputs: dict[str, Any], cipher: CipherName) -> ChannelConfig:
    ident = AgentIdentity(side["name"], keypair_from_private(bytes.fromhex(side["x25519"])),
                          SigningKey(bytes.fromhex(side["ed25519_seed"])))
    m = bytes.fromhex(inputs["measurement"])
    cert = authority.issue(ident.name, ident.static.public, ident.sign_pub, m, inputs["roles"],
                           not_before=inputs["not_before"], days=inputs["days"])
    return ChannelConfig(ident, cert, authority.public, m, frozenset({m}), ciphers=(cipher,),
                         clock=lambda: float(inputs["clock"]), allow_plain=True)


# A stream backend's session (proto/PROTOCOL.md 7.7): a QEMU spec, then the
# first bytes of a QEMU migration stream (its magic "QEVM" and version 3).
STREAM_SPEC = {"memory_mib": 64, "vcpus": 1, "machine": "pc", "accel": "tcg", "args": ["-cpu", "qemu64"]}
STREAM_BYTES = b"QEVM\x00\x00\x00\x03"


def build(cipher: CipherName, inputs: dict[str, Any] = INPUTS, backend: str = "model",
          plain: bool = False, channels: int = 1, postcopy: bool = False) -> dict[str, Any]:
    authority = Authority(SigningKey(bytes.fromhex(inputs["authority_seed"])))
    src = _config(inputs["source"], authority, inputs, cipher)
    dst = _config(inputs["destination"], authority, inputs, cipher)
    mode = TransportMode.PLAIN_BENCHMARK if plain else TransportMode.SECURE
    init = AttestedHandshake(src, True, Purpose.MIGRATION, mode=mode, cipher=cipher,
                             ephemeral=keypair_from_private(bytes.fromhex(inputs["source"]["ephemeral"])))
    resp = AttestedHandshake(dst, False, None,
                             ephemeral=keypair_from_private(bytes.fromhex(inputs["destination"]["ephemeral"])))
    flight1 = init.initiate()
    flight2 = resp.receive_data(flight1)
    flight3 = init.receive_data(flight2)
    assert resp.receive_data(flight3) == b""
    assert init.result is not None and resp.result is not None
    mid = bytes.fromhex(inputs["migration_id"])
    src_proto, dst_proto = SessionProtocol(Role.SOURCE, mid), SessionProtocol(Role.DESTINATION)
    if backend == "qemu":
        spec = msgpack.packb(STREAM_SPEC, use_bin_type=True)
        begin = src_proto.send(Begin("vm-1", bytes(range(16)), 64 * 256, 0, 0, 1, False, False, "qemu", spec))
    elif channels > 1:  # 512 pages, none protected: channel 1's first block is gfns 256..511
        begin = src_proto.send(Begin("vm-1", bytes(range(16)), 512, 0, 0, 1, False, False, "model", b""))
    else:
        begin = src_proto.send(Begin("vm-1", bytes(range(16)), 256, 0 if plain else 16, 0 if plain else 1, 1, plain,
                                     False, "model", b""))
    record1 = init.result.sender.seal(begin)
    resp.result.receiver.receive_data(record1)
    assert dst_proto.receive_message(resp.result.receiver.next_record() or b"").type == "BEGIN"
    accept = dst_proto.send(Accept())
    record2 = resp.result.sender.seal(accept)
    src_proto.receive(accept)
    records: list[dict[str, Any]] = [
        {"from": "initiator", "plaintext": begin.hex(), "bytes": record1.hex()},
        {"from": "responder", "plaintext": accept.hex(), "bytes": record2.hex()},
    ]
    if channels > 1:  # proto 7.8: a page backend's KEYS (no process) then CHANNELS, or a stream's CHANNELS
        keys = msgpack.packb({"v": 2, "cipher": "AESGCM", "processes": []}, use_bin_type=True)
        first = [src_proto.send(Keys(keys))] if backend == "model" else []
        for msg in [*first, src_proto.send(Channels(channels))]:
            rec = init.result.sender.seal(msg)
            resp.result.receiver.receive_data(rec)
            assert dst_proto.receive(resp.result.receiver.next_record() or b"") is not None
            records.append({"from": "initiator", "plaintext": msg.hex(), "bytes": rec.hex()})
        data_session = _data_session(src, dst, inputs, cipher, mid, channels, backend == "qemu")
    if backend == "qemu":  # STREAM, its data record, STREAM_END
        stream = [src_proto.send(Stream(len(STREAM_BYTES))), *map(bytes, src_proto.send_data(STREAM_BYTES))]
        for i, msg in enumerate((*stream, src_proto.send(StreamEnd(len(STREAM_BYTES))))):
            rec = init.result.sender.seal(msg)
            resp.result.receiver.receive_data(rec)
            assert dst_proto.receive(resp.result.receiver.next_record() or b"") is not None
            records.append({"from": "initiator", **({"data": True} if i == 1 else {}), "plaintext": msg.hex(),
                            "bytes": rec.hex()})
    if postcopy:  # proto 7.9: the switch, the handoff, a FETCH served, PULLED
        init.result.receiver.receive_data(record2)  # (ACCEPT, opened where the source reads it)
        assert init.result.receiver.next_record() == accept
        for who, msg, data in _postcopy_messages(src_proto, dst_proto):
            sender, receiver = (init, resp) if who == "initiator" else (resp, init)
            assert sender.result is not None and receiver.result is not None
            rec = sender.result.sender.seal(msg)
            receiver.result.receiver.receive_data(rec)
            assert receiver.result.receiver.next_record() == msg
            records.append({"from": who, **({"data": True} if data else {}), "plaintext": msg.hex(),
                            "bytes": rec.hex()})
    if plain:  # bulk data in the clear, everything else sealed (proto/PROTOCOL.md 5)
        batch = PageBatch(np.array([7, 9], np.uint64), b"\x01\x00", np.array([0, 0], np.uint64),
                          bytes(range(256)) * 16)
        pages = [src_proto.send(batch.message(0)), *map(bytes, src_proto.send_data(bytes(range(256)) * 16))]
        for i, (msg, clear) in enumerate(((pages[0], True), (pages[1], True),
                                          (src_proto.send(RoundEnd(0, 2, 0)), False))):
            rec = init.result.sender.seal(msg, clear=clear)
            resp.result.receiver.receive_data(rec)
            got = resp.result.receiver.next_record() or b""
            assert dst_proto.receive(got, resp.result.receiver.authenticated) is not None
            records.append({"from": "initiator", **({"data": True} if i == 1 else {}), "clear": clear,
                            "plaintext": msg.hex(), "bytes": rec.hex()})
    return {
        "protocol_name": init.result.protocol_name,
        "inputs": inputs,
        "certificates": {"source": src.certificate.encode().hex(), "destination": dst.certificate.encode().hex()},
        "flights": [
            {"from": "initiator", "bytes": flight1.hex()},
            {"from": "responder", "bytes": flight2.hex()},
            {"from": "initiator", "bytes": flight3.hex()},
        ],
        "handshake_hash": init.result.handshake_hash.hex(),
        "backend": backend,
        **({"mode": "plain-benchmark"} if plain else {}),
        "records": records,
        **({"data_session": data_session} if channels > 1 else {}),
    }


# Post-copy (proto 7.9), after BEGIN/ACCEPT of the 256-page VM whose one process owns
# gfns 0..15: KEYS; MISSING of gfns 3 (protected: its version 2 and MAC) and 200
# (normal: the switch's round, 1); CPU_STATE, one CONTEXT, COMPLETE; READY, COMMIT,
# RUNNING; FETCH of 200, its PAGES (a normal page) and data record; the PAGES of 3 and
# its data record (the ciphertext and MAC, as MISSING named them); PULLED.
POSTCOPY_KEYS = {"v": 2, "cipher": "AESGCM", "processes": [{"pid": 1, "first": 0, "count": 16, "key": b"\x33" * 32}]}
POSTCOPY_TAG = bytes(range(16))


def _postcopy_messages(src: SessionProtocol, dst: SessionProtocol) -> list[tuple[str, bytes, bool]]:
    out: list[tuple[str, bytes, bool]] = []

    def s(msg: bytes, data: bool = False) -> None:
        dst.receive(msg)
        out.append(("initiator", msg, data))

    def d(msg: bytes) -> None:
        src.receive(msg)
        out.append(("responder", msg, False))

    gfns, vers = np.array([3, 200], np.uint64), np.array([2, 1], np.uint64)
    s(src.send(Keys(msgpack.packb(POSTCOPY_KEYS, use_bin_type=True))))
    base, bitmap = gfn_bitmap(gfns)  # gfn 3 protected (process 1's), 200 normal: version 1, the round
    s(src.send(Missing(1, base, bitmap, u64le(gfns[:1]), u64le(vers[:1]), POSTCOPY_TAG)))
    s(src.send(CpuState(b"cpu")))
    s(src.send(Context(0, 1, b"blob")))
    s(src.send(Complete(6, 0, bytes(32))))
    d(dst.send(Ready(b"")))
    s(src.send(Commit()))
    d(dst.send(Running()))
    d(dst.send(Fetch(u64le(gfns[1:]))))
    for batch in (PageBatch(gfns[1:], b"\x01", vers[1:], DATA_PAGE_PC),
                  PageBatch(gfns[:1], b"\x02", vers[:1], DATA_PAGE_PC[::-1], POSTCOPY_TAG)):
        s(src.send(batch.message(1)))
        for part in src.send_data(DATA_PAGE_PC if batch.kinds == b"\x01" else DATA_PAGE_PC[::-1]):
            s(bytes(part), data=True)
    d(dst.send(Pulled(b"")))
    return out


DATA_PAGE_PC = bytes(range(256)) * 16


# Channel 1's data session: gfn 256 (its first block of LANE_BLOCK pages, with 2
# channels) as a normal page, or a stream backend's first bytes of a multifd
# stream (QEMU's multifd magic and version 1), then COMPLETE binding the
# session's three records.
DATA_EPHEMERALS = {"initiator": "23" * 32, "responder": "24" * 32}
DATA_PAGE = bytes(range(256)) * 16
MULTIFD_BYTES = bytes.fromhex("1122334400000001")


def _data_session(src: ChannelConfig, dst: ChannelConfig, inputs: dict[str, Any], cipher: CipherName, mid: bytes,
                  channels: int, stream: bool = False) -> dict[str, Any]:
    init = AttestedHandshake(src, True, Purpose.DATA, cipher=cipher,
                             ephemeral=keypair_from_private(bytes.fromhex(DATA_EPHEMERALS["initiator"])))
    resp = AttestedHandshake(dst, False, None,
                             ephemeral=keypair_from_private(bytes.fromhex(DATA_EPHEMERALS["responder"])))
    flights = [init.initiate()]
    flights.append(resp.receive_data(flights[0]))
    flights.append(init.receive_data(flights[1]))
    assert resp.receive_data(flights[2]) == b""
    assert init.result is not None and resp.result is not None
    src_proto = SessionProtocol(Role.SOURCE, mid, data=True, stream=stream)
    dst_proto = SessionProtocol(Role.DESTINATION, data=True, stream=stream)
    batch = PageBatch(np.array([256], np.uint64), b"\x01", np.array([0], np.uint64), DATA_PAGE)
    msgs = [src_proto.send(Bind(1, channels)),
            src_proto.send(Stream(len(MULTIFD_BYTES)) if stream else batch.message(0)),
            *map(bytes, src_proto.send_data(MULTIFD_BYTES if stream else DATA_PAGE))]
    records: list[dict[str, Any]] = []
    for i, msg in enumerate(msgs):
        rec = init.result.sender.seal(msg)
        records.append({"from": "initiator", **({"data": True} if i == 2 else {}), "plaintext": msg.hex(),
                        "bytes": rec.hex()})
    complete = src_proto.send(Complete(init.result.sender.count, 1, init.result.sender.transcript))
    records.append({"from": "initiator", "plaintext": complete.hex(), "bytes": init.result.sender.seal(complete).hex()})
    for r in records:
        resp.result.receiver.receive_data(bytes.fromhex(r["bytes"]))
        assert dst_proto.receive(resp.result.receiver.next_record() or b"") is not None
    return {"ephemerals": DATA_EPHEMERALS,
            "flights": [{"from": "responder" if i == 1 else "initiator", "bytes": f.hex()}
                        for i, f in enumerate(flights)],
            "handshake_hash": init.result.handshake_hash.hex(), "records": records}



# Signed cluster policy documents (proto/PROTOCOL.md 10): one of each kind, signed
# by the authority or by an operator it certified, and documents an agent refuses.
POLICY_INPUTS: dict[str, Any] = {
    "authority_seed": "a0" * 32,
    "operator": {"name": "alice", "x25519": "0a" * 32, "ed25519_seed": "1a" * 32},
    "agent": {"name": "host-a", "x25519": "01" * 32, "ed25519_seed": "11" * 32},
    "cluster": "/palm/",
    "not_before": 1_700_000_000,
    "days": 36500,
    "clock": 1_800_000_000,
    "revoked_static": "03" * 32,
    "measurements": ["5a" * 32, "6b" * 32],
    "drain_id": "0102030405060708",
}


def build_policy(inputs: dict[str, Any] = POLICY_INPUTS) -> dict[str, Any]:
    from palm_net.cluster.model import DrainOptions, DrainRequest
    from palm_net.cluster.policy import PolicyDoc, PolicyError, Signer, verify
    from palm_net.crypto.identity import OPERATOR_ROLE

    authority = Authority(SigningKey(bytes.fromhex(inputs["authority_seed"])))
    certs = {}
    keys = {}
    for who, roles in (("operator", (OPERATOR_ROLE,)), ("agent", ("source", "destination"))):
        side = inputs[who]
        ident = AgentIdentity(side["name"], keypair_from_private(bytes.fromhex(side["x25519"])),
                              SigningKey(bytes.fromhex(side["ed25519_seed"])))
        certs[who] = authority.issue(ident.name, ident.static.public, ident.sign_pub, bytes(32), roles,
                                     not_before=inputs["not_before"], days=inputs["days"])
        keys[who] = ident.signing
    by_authority = Signer(authority.signing, authority.public)
    by_operator = Signer(keys["operator"], authority.public, certs["operator"])
    cluster, at = inputs["cluster"], inputs["clock"]
    req = DrainRequest(inputs["drain_id"], float(at), "vectors", DrainOptions())
    docs = [
        ("revocation", by_authority, PolicyDoc("revocation", cluster, "host-c", 1, at, "vectors", True,
                                               (bytes.fromhex(inputs["revoked_static"]),), "compromised")),
        ("allowlist", by_operator, PolicyDoc("allowlist", cluster, "", 2, at, "vectors",
                                             measurements=tuple(bytes.fromhex(m) for m in inputs["measurements"]))),
        ("drain", by_operator, PolicyDoc("drain", cluster, "host-a", 3, at, "vectors", request=req)),
        ("revocation lifted", by_operator, PolicyDoc("revocation", cluster, "host-c", 4, at, "vectors")),
    ]
    out_docs = []
    for label, signer, doc in docs:
        signed = signer.sign(doc)
        assert verify(signed.raw, authority.public, cluster, float(at)) == doc
        outer = msgpack.unpackb(signed.raw)
        out_docs.append({"what": label, "signer": signed.signer, "body": outer["body"].hex(),
                         "signature": outer["sig"].hex(), "document": signed.raw.hex()})
    # what an agent refuses, and the reason it counts
    by_agent = Signer(keys["agent"], authority.public, certs["agent"])
    allow = bytes.fromhex(out_docs[1]["document"])
    at_serial = allow.index(b"\xa6serial\x02") + 7
    forged = allow[:at_serial] + b"\x09" + allow[at_serial + 1:]  # a higher serial, same signature
    refused = []
    for label, data in (("signed by an agent's certificate (no operator role)", by_agent.sign(docs[1][2]).raw),
                        ("its serial raised from 2 to 9 without signing again", forged),
                        ("the body without a signature", bytes.fromhex(out_docs[1]["body"])),
                        ("signed for another cluster", by_authority.sign(
                            PolicyDoc("allowlist", "/other/", "", 2, at, "vectors", measurements=())).raw)):
        try:
            verify(data, authority.public, cluster, float(at))
            reason = "accepted"
        except PolicyError as exc:
            reason = exc.reason
        refused.append({"what": label, "document": data.hex(), "reason": reason})
    return {"inputs": inputs, "authority_public": authority.public.hex(),
            "operator_certificate": certs["operator"].encode().hex(), "documents": out_docs, "refused": refused}


def build_metadata_digest() -> dict[str, Any]:
    """proto 7.3: one protected process (gfns 3..72: a block of 64 pages and one of 6)
    with made-up versions and MACs, and the blob's ``metadata`` over them."""
    first, count = 3, 70
    versions = np.array([0] * first + [(g * 7919) % 1000 + (g << 40) for g in range(count)], np.uint64)
    tags = np.frombuffer(bytes(16 * first) + b"".join(bytes([g]) * 16 for g in range(count)), np.uint8)
    digest = MetadataDigest(versions, tags.reshape(-1, 16), [(first, count)]).digest(0)
    return {"first": first, "count": count, "versions": [int(v) for v in versions[first:]],
            "macs": tags[16 * first :].tobytes().hex(), "metadata": digest.hex()}
