"""The Noise core against the cacophony vectors and the spec's sharp edges."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from nacl import bindings as sodium

from palm_net.crypto.noise import (
    AESGCM,
    CHACHAPOLY,
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    TAGLEN,
    CipherState,
    DecryptError,
    HandshakeState,
    NoiseError,
    aesgcm_available,
    hkdf,
    hmac_blake2b,
    keypair_from_private,
)

NAMES = [
    "Noise_XX_25519_ChaChaPoly_BLAKE2b",
    "Noise_XX_25519_AESGCM_BLAKE2b",
    "Noise_NN_25519_ChaChaPoly_BLAKE2b",
    "Noise_IK_25519_ChaChaPoly_BLAKE2b",
]


def test_vectors_are_the_published_ones():
    """The repository's subset equals the entries of the published file (when it is at hand)."""
    import json
    from pathlib import Path

    from tests.conftest import NOISE_VECTORS

    subset = json.loads(NOISE_VECTORS.read_text())
    assert sorted(v["protocol_name"] for v in subset["vectors"]) == sorted(NAMES)
    full = Path(__file__).resolve().parent.parent.parent / "shared" / "noise" / "cacophony.txt"
    if not full.exists():
        pytest.skip(f"the published file is not at {full}; the subset names its checksum")
    raw = full.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == subset["source_sha256"]
    published = [v for v in json.loads(raw)["vectors"] if v["protocol_name"] in NAMES
                 and "init_psks" not in v and "resp_psks" not in v]
    assert published == subset["vectors"]


def _kp(v: dict, key: str):
    return keypair_from_private(bytes.fromhex(v[key])) if key in v else None


@pytest.mark.parametrize("name", NAMES)
def test_cacophony_vector(cacophony, name):
    v = cacophony[name]
    rs = bytes.fromhex(v["init_remote_static"]) if "init_remote_static" in v else None
    init = HandshakeState(name, True, bytes.fromhex(v["init_prologue"]),
                          s=_kp(v, "init_static"), e=_kp(v, "init_ephemeral"), rs=rs)
    resp = HandshakeState(name, False, bytes.fromhex(v["resp_prologue"]),
                          s=_kp(v, "resp_static"), e=_kp(v, "resp_ephemeral"))
    writer, reader = init, resp
    msgs = v["messages"]
    i = 0
    while not init.finished:
        payload = bytes.fromhex(msgs[i]["payload"])
        ct = writer.write_message(payload)
        assert ct.hex() == msgs[i]["ciphertext"], f"handshake message {i}"
        assert reader.read_message(ct) == payload
        writer, reader = reader, writer
        i += 1
    assert resp.finished
    assert init.get_handshake_hash().hex() == v["handshake_hash"]
    assert resp.get_handshake_hash() == init.get_handshake_hash()
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    # Transport messages keep alternating, starting with whoever's turn it is.
    initiator_turn = len(init.pattern.messages) % 2 == 0
    for m in msgs[i:]:
        payload = bytes.fromhex(m["payload"])
        if initiator_turn:
            ct = i_send.encrypt_with_ad(b"", payload)
            assert r_recv.decrypt_with_ad(b"", ct) == payload
        else:
            ct = r_send.encrypt_with_ad(b"", payload)
            assert i_recv.decrypt_with_ad(b"", ct) == payload
        assert ct.hex() == m["ciphertext"]
        initiator_turn = not initiator_turn


def test_hmac_is_rfc2104_over_blake2b():
    for key in (b"k", bytes(64), bytes(range(200))):
        for msg in (b"", b"abc" * 100):
            assert hmac_blake2b(key, msg) == hmac.new(key, msg, hashlib.blake2b).digest()
    # not BLAKE2b's keyed mode
    assert hmac_blake2b(b"k", b"m") != hashlib.blake2b(b"m", key=b"k").digest()
    assert len(hkdf(bytes(64), b"ikm", 3)) == 3


@pytest.mark.parametrize(("fns", "order"), [(CHACHAPOLY, "little"), (AESGCM, "big")])
def test_nonce_byte_order(fns, order):
    key = bytes(range(32))
    raw = {"little": sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
           "big": sodium.crypto_aead_aes256gcm_encrypt}[order]
    for n in (1, 2**32 + 5, 2**56 + 0x0102):
        cs = CipherState(fns, key)
        cs.set_nonce(n)
        ct = cs.encrypt_with_ad(b"ad", b"payload")
        expected = raw(b"payload", b"ad", bytes(4) + n.to_bytes(8, order), key)
        assert ct == expected
        wrong = raw(b"payload", b"ad", bytes(4) + n.to_bytes(8, "big" if order == "little" else "little"), key)
        assert ct != wrong
        assert cs.n == n + 1


@pytest.mark.parametrize("fns", [CHACHAPOLY, AESGCM])
def test_reserved_nonce_refused(fns):
    cs = CipherState(fns, bytes(32))
    cs.set_nonce(MAX_NONCE - 1)
    cs.encrypt_with_ad(b"", b"last one")
    assert cs.n == MAX_NONCE
    with pytest.raises(NoiseError, match="nonce exhausted"):
        cs.encrypt_with_ad(b"", b"x")
    with pytest.raises(NoiseError, match="nonce exhausted"):
        cs.decrypt_with_ad(b"", bytes(32))


@pytest.mark.parametrize("fns", [CHACHAPOLY, AESGCM])
def test_failed_decrypt_does_not_advance_nonce(fns):
    send, recv = CipherState(fns, bytes(32)), CipherState(fns, bytes(32))
    good = send.encrypt_with_ad(b"", b"hello")
    bad = bytearray(good)
    bad[0] ^= 1
    with pytest.raises(DecryptError):
        recv.decrypt_with_ad(b"", bytes(bad))
    assert recv.n == 0
    assert recv.decrypt_with_ad(b"", good) == b"hello"
    assert recv.n == 1


def test_rekey_changes_key_and_keeps_nonce():
    a, b = CipherState(CHACHAPOLY, bytes(32)), CipherState(CHACHAPOLY, bytes(32))
    a.encrypt_with_ad(b"", b"x")
    b.decrypt_with_ad(b"", CipherState(CHACHAPOLY, bytes(32)).encrypt_with_ad(b"", b"x"))
    old = a.k
    a.rekey()
    b.rekey()
    assert a.k != old and a.k == b.k and a.n == 1
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"y")) == b"y"


def test_handshake_turns_and_bad_names():
    with pytest.raises(NoiseError):
        HandshakeState("Noise_XX_448_ChaChaPoly_BLAKE2b", True)
    hs = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", False)
    with pytest.raises(NoiseError, match="turn"):
        hs.write_message(b"")
    with pytest.raises(NoiseError, match="too short"):
        hs.read_message(b"short")


def test_repr_hides_keys():
    kp = keypair_from_private(bytes(range(32)))
    cs = CipherState(CHACHAPOLY, bytes(range(32, 64)))
    for obj in (kp, cs):
        text = repr(obj)
        assert bytes(range(32)).hex() not in text and bytes(range(32, 64)).hex() not in text


# ------------------------------------------------------------------ bounds and edges
# (palm_net/crypto/noise.py under mutation: each test below fails with a mutant that
# survived the selection before it; docs/MUTATION.md)


@pytest.mark.parametrize("fns", [CHACHAPOLY, AESGCM])
def test_in_place_ciphers_write_only_into_a_writable_buffer_large_enough(fns):
    if fns is AESGCM and not aesgcm_available():
        pytest.skip("no AES-NI here")
    key = bytes(range(32))
    for size in (0, 1, 100):
        sealed = bytearray(size + TAGLEN)
        assert fns.encrypt_into(key, 7, bytes(size), sealed) == size + TAGLEN
        out = bytearray(size)  # exactly the plaintext's size
        assert fns.decrypt_into(key, 7, bytes(sealed), out) == size and out == bytes(size)
        with pytest.raises(ValueError):
            fns.encrypt_into(key, 7, bytes(size), bytearray(size + TAGLEN - 1))
        with pytest.raises(BufferError):
            fns.encrypt_into(key, 7, bytes(size), bytes(size + TAGLEN))  # read-only
        with pytest.raises(BufferError):
            fns.decrypt_into(key, 7, bytes(sealed), bytes(size))  # read-only
    short = bytearray(99)
    with pytest.raises(DecryptError):
        fns.decrypt_into(key, 7, bytes(sealed), short)  # one byte short of the plaintext
    assert short == bytes(99)


def test_hmac_keys_at_and_beyond_the_block_size():
    for size in (127, 128, 129):
        key = bytes(range(size))
        assert hmac_blake2b(key, b"m") == hmac.new(key, b"m", hashlib.blake2b).digest(), size


def test_a_protocol_name_from_the_wire_is_the_whole_known_name_or_refused():
    HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
    for name in ("Foo_NN_25519_ChaChaPoly_BLAKE2b", "Noise_NN_25519_ChaChaPoly_BLAKE2b_x", "Noise_NN_25519",
                 "Noise_NN_25519_ChaChaPoly_SHA256", "Noise_QQ_25519_ChaChaPoly_BLAKE2b",
                 "Noise_NN_25519_Foo_BLAKE2b"):
        with pytest.raises(NoiseError):
            HandshakeState(name, True)
    with pytest.raises(NoiseError, match="pre-message"):  # IK: the responder's static key is known beforehand
        HandshakeState("Noise_IK_25519_ChaChaPoly_BLAKE2b", False)


def test_a_handshake_message_of_65535_bytes_is_written_and_read_and_no_message_after_a_failed_last_one():
    init = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", True)
    resp = HandshakeState("Noise_NN_25519_ChaChaPoly_BLAKE2b", False)
    first = init.write_message(bytes(MAX_MESSAGE_LEN - 32))  # e, then the payload in clear
    assert len(first) == MAX_MESSAGE_LEN
    assert resp.read_message(first) == bytes(MAX_MESSAGE_LEN - 32)
    with pytest.raises(NoiseError):
        resp.write_message(bytes(MAX_MESSAGE_LEN))  # the last message, too long: the handshake is spent
    for again in (resp.write_message, resp.read_message):
        with pytest.raises(NoiseError):
            again(b"")
    with pytest.raises(NoiseError):
        init.read_message(bytes(MAX_MESSAGE_LEN + 1))
