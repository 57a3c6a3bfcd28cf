"""palm_net's own handshake and policy vectors (proto/vectors/) reproduce byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palm_net.crypto.noise import CipherName
from palm_net.testing.vectors import build, build_policy
from palm_net.wire import messages

VECTORS = Path(__file__).resolve().parent.parent / "proto" / "vectors"


@pytest.mark.parametrize("cipher", list(CipherName))
def test_palm_vectors(cipher):
    expected = json.loads((VECTORS / f"handshake_{cipher.value.lower()}.json").read_text())
    got = build(cipher, expected["inputs"])
    assert got == expected


def _type(record: dict) -> str:
    """A record's message type, or "data" for a data record (raw bytes after PAGES or STREAM)."""
    return "data" if record.get("data") else messages.decode(bytes.fromhex(record["plaintext"])).type


def test_stream_backend_vectors():
    expected = json.loads((VECTORS / "stream_aesgcm.json").read_text())
    assert build(CipherName.AESGCM, expected["inputs"], backend="qemu") == expected
    types = [_type(r) for r in expected["records"]]
    assert types == ["BEGIN", "ACCEPT", "STREAM", "data", "STREAM_END"]
    stream = messages.decode(bytes.fromhex(expected["records"][2]["plaintext"])).body
    assert stream.length == len(bytes.fromhex(expected["records"][3]["plaintext"]))  # its data record, raw


def test_plain_mode_vectors():
    """Plain benchmark mode: a kind byte per record; only PAGES in the clear."""
    expected = json.loads((VECTORS / "plain_aesgcm.json").read_text())
    assert build(CipherName.AESGCM, expected["inputs"], plain=True) == expected
    kinds = []
    for r in expected["records"]:
        rec = bytes.fromhex(r["bytes"])
        assert int.from_bytes(rec[:4], "big") == len(rec) - 4
        kinds.append((_type(r), rec[4]))
        if rec[4] == 0:  # clear: the plaintext itself follows the kind byte
            assert rec[5:] == bytes.fromhex(r["plaintext"])
        else:  # sealed: a Noise transport message (plaintext + 16-byte tag)
            assert len(rec) == 4 + 1 + len(bytes.fromhex(r["plaintext"])) + 16
    assert kinds == [("BEGIN", 1), ("ACCEPT", 1), ("PAGES", 0), ("data", 0), ("ROUND_END", 1)]


def test_vectors_are_independent_of_the_implementation_details():
    """Spot checks an outsider can make from the spec alone."""
    v = json.loads((VECTORS / "handshake_chachapoly.json").read_text())
    flight1 = bytes.fromhex(v["flights"][0]["bytes"])
    n = int.from_bytes(flight1[:4], "big")
    preamble = flight1[4 : 4 + n]
    assert preamble[:4] == b"PALM" and preamble[4] == 1 and preamble[5] == 1 and preamble[6] == 0
    assert preamble[8:].decode() == "Noise_XX_25519_ChaChaPoly_BLAKE2b"
    # msg1 = the initiator's ephemeral public key and an empty payload
    assert int.from_bytes(flight1[4 + n : 8 + n], "big") == 32


def test_policy_vectors():
    """proto 10: the documents reproduce, and each verifies from the spec alone (Ed25519 over
    the domain and the body, by the authority or by the key of the operator's certificate)."""
    import msgpack
    from nacl.signing import VerifyKey

    expected = json.loads((VECTORS / "policy.json").read_text())
    assert build_policy(expected["inputs"]) == expected
    authority = VerifyKey(bytes.fromhex(expected["authority_public"]))
    operator = msgpack.unpackb(msgpack.unpackb(bytes.fromhex(expected["operator_certificate"]))["body"])
    assert operator["roles"] == ["operator"]
    for d in expected["documents"]:
        outer = msgpack.unpackb(bytes.fromhex(d["document"]))
        assert set(outer) == {"body", "sig", "cert"} and outer["body"].hex() == d["body"]
        key = authority if not outer["cert"] else VerifyKey(operator["sign_pub"])
        key.verify(b"palm-net/policy/v1\x00" + outer["body"], outer["sig"])
        assert msgpack.unpackb(outer["body"])["cluster"] == expected["inputs"]["cluster"]
    assert [r["reason"] for r in expected["refused"]] == ["wrong-role", "bad-signature", "unsigned", "other-cluster"]


def test_channel_vectors():
    """More channels (proto 7.8): CHANNELS on the main session; a DATA session (purpose 3 in
    its preamble) whose BIND, PAGES of its own gfn, data record and COMPLETE reproduce."""
    expected = json.loads((VECTORS / "channels_aesgcm.json").read_text())
    assert build(CipherName.AESGCM, expected["inputs"], channels=2) == expected
    assert [_type(r) for r in expected["records"]] == ["BEGIN", "ACCEPT", "KEYS", "CHANNELS"]
    data = expected["data_session"]
    flight1 = bytes.fromhex(data["flights"][0]["bytes"])
    assert flight1[4 + 4 + 1] == 3  # the preamble's purpose: DATA
    assert [_type(r) for r in data["records"]] == ["BIND", "PAGES", "data", "COMPLETE"]
    bind = messages.decode(bytes.fromhex(data["records"][0]["plaintext"]))
    assert (bind.body.channel, bind.body.count, bind.seq) == (1, 2, 0)
    assert bind.mid.hex() == expected["inputs"]["migration_id"]
    complete = messages.decode(bytes.fromhex(data["records"][3]["plaintext"])).body
    assert complete.records == 3 and complete.page_records == 1


def test_postcopy_vectors():
    """Post-copy (proto 7.9): MISSING, the handoff answered by RUNNING, a FETCH served by PAGES
    (a normal page, then a protected one with the MAC MISSING named), PULLED: they reproduce."""
    expected = json.loads((VECTORS / "postcopy_aesgcm.json").read_text())
    assert build(CipherName.AESGCM, expected["inputs"], postcopy=True) == expected
    assert [_type(r) for r in expected["records"]] == [
        "BEGIN", "ACCEPT", "KEYS", "MISSING", "CPU_STATE", "CONTEXT", "COMPLETE", "READY", "COMMIT", "RUNNING",
        "FETCH", "PAGES", "data", "PAGES", "data", "PULLED"]
    missing = messages.decode(bytes.fromhex(expected["records"][3]["plaintext"])).body
    protected = messages.decode(bytes.fromhex(expected["records"][13]["plaintext"])).body
    assert missing.tags == protected.tags and missing.vers[:8] == protected.vers


def test_stream_channel_vectors():
    """A stream backend on 2 channels (proto 7.8 item 7): CHANNELS right after ACCEPT, the
    main stream on the main session; the DATA session's BIND, STREAM (a multifd stream's
    first bytes), data record and COMPLETE reproduce."""
    expected = json.loads((VECTORS / "channels_stream_aesgcm.json").read_text())
    assert build(CipherName.AESGCM, expected["inputs"], backend="qemu", channels=2) == expected
    assert [_type(r) for r in expected["records"]] == ["BEGIN", "ACCEPT", "CHANNELS", "STREAM", "data", "STREAM_END"]
    data = expected["data_session"]
    assert [_type(r) for r in data["records"]] == ["BIND", "STREAM", "data", "COMPLETE"]
    assert bytes.fromhex(data["records"][2]["plaintext"])[:4] == bytes.fromhex("11223344")  # QEMU's multifd magic
    complete = messages.decode(bytes.fromhex(data["records"][3]["plaintext"])).body
    assert complete.records == 3 and complete.page_records == 1


def test_metadata_digest_vector():
    """proto 7.3: the blob's metadata digest reproduces, and equals the spec's definition
    computed from the vector's versions and MACs alone."""
    from palm_net.testing.vectors import build_metadata_digest
    from tests.test_protected_pages import _spec_metadata_digest

    expected = json.loads((VECTORS / "metadata_digest.json").read_text())
    assert build_metadata_digest() == expected
    assert expected["count"] == len(expected["versions"]) == 70  # a block of 64 and a shorter one
    macs = bytes.fromhex(expected["macs"])
    assert _spec_metadata_digest(expected["versions"], macs).hex() == expected["metadata"]
