"""The attested handshake: success over memory streams and TCP, and every refusal."""

from __future__ import annotations

import logging
import os
import time

import msgpack
import pytest
import trio
import trio.testing

from palm_net.channel.handshake import (
    AttestedHandshake,
    Purpose,
    TransportMode,
    decode_preamble,
    encode_preamble,
)
from palm_net.channel.transport import accept, connect
from palm_net.crypto.identity import (
    CA_KEY_FILE,
    CERT_DOMAIN,
    IDENTITY_FILE,
    MAX_CERT_LEN,
    MAX_KEY_FILE,
    AgentIdentity,
    AttestationError,
    Authority,
    Certificate,
    KeyFileError,
    compute_measurement,
    read_secret_file,
    validate_name,
    write_secret_file,
)
from palm_net.crypto.noise import CipherName
from palm_net.errors import ErrorCode, HandshakeError, LocalProtocolError, RemoteProtocolError
from palm_net.wire.framing import frame


def pump(init: AttestedHandshake, resp: AttestedHandshake, tamper=None) -> None:
    """Runs a sans-IO handshake to completion; ``tamper(i, bytes)`` may alter flight i."""
    to_resp = init.initiate()
    flight = 0
    while not (init.complete and resp.complete):
        assert flight < 4, "the handshake stalled: three messages make it"
        if tamper:
            to_resp = tamper(flight, to_resp)
        flight += 1
        to_init = resp.receive_data(to_resp)
        if init.complete:
            break
        if tamper:
            to_init = tamper(flight, to_init)
        flight += 1
        to_resp = init.receive_data(to_init)


def test_sans_io_handshake_both_ciphers(pki):
    a, b = pki.config("src"), pki.config("dst")
    for cipher in (CipherName.CHACHAPOLY, CipherName.AESGCM):
        init = AttestedHandshake(a, True, cipher=cipher)
        resp = AttestedHandshake(b, False, purpose=None)
        pump(init, resp)
        assert init.result and resp.result
        assert init.result.handshake_hash == resp.result.handshake_hash
        assert init.result.peer.name == "dst" and resp.result.peer.name == "src"
        assert cipher.value in init.result.protocol_name
        assert resp.result.purpose is Purpose.MIGRATION
        rec = init.result.sender.seal(b"first record")
        resp.result.receiver.receive_data(rec)
        assert resp.result.receiver.next_record() == b"first record"


async def _pair(stream_a, stream_b, cfg_a, cfg_b, on_start=None, **kw):
    out = {}
    async with trio.open_nursery() as n:
        async def server():
            out["b"] = await accept(stream_b, cfg_b, on_start=on_start)
        n.start_soon(server)
        out["a"] = await connect(stream_a, cfg_a, **kw)
    return out["a"], out["b"]


async def test_memory_stream_exchange(pki):
    s1, s2 = trio.testing.memory_stream_pair()
    a, b = await _pair(s1, s2, pki.config("src"), pki.config("dst"))
    payloads = [os.urandom(n) for n in (1, 100, 65519, 4096)]
    for p in payloads:
        await a.send(p)
    assert [(await b.receive()).data for _ in payloads] == payloads
    await b.send(b"reply")
    assert (await a.receive()).data == b"reply"


async def test_tcp_loopback_exchange(pki):
    cfg_a, cfg_b = pki.config("src"), pki.config("dst")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    got = []
    async with trio.open_nursery() as n:
        async def serve_one():
            stream = await listeners[0].accept()
            ch = await accept(stream, cfg_b)
            for _ in range(50):
                got.append((await ch.receive()).data)
            await ch.send(b"ack")
        n.start_soon(serve_one)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ch = await connect(stream, cfg_a)
        for i in range(50):
            await ch.send(bytes([i]) * 60000)
        assert (await ch.receive()).data == b"ack"
    assert got == [bytes([i]) * 60000 for i in range(50)]
    await listeners[0].aclose()


def _refused(init_cfg, resp_cfg, reason: str, rejecter: str = "init", **kw):
    init = AttestedHandshake(init_cfg, True, **kw)
    resp = AttestedHandshake(resp_cfg, False, purpose=None)
    with pytest.raises(HandshakeError) as info:
        pump(init, resp)
    assert info.value.code == reason
    # The side that refused never completed; nothing beyond the handshake happened.
    assert not (init.complete and resp.complete)
    assert (init if rejecter == "init" else resp).result is None
    return info.value


def test_unknown_authority(pki):
    rogue = Authority.generate()
    # The destination's certificate is from a self-made authority: the source refuses.
    err = _refused(pki.config("src"), pki.config("dst", authority=rogue), "unknown-authority")
    assert "another authority" in str(err)
    # And the other way round: the destination refuses a rogue source.
    _refused(pki.config("src", authority=rogue), pki.config("dst"), "unknown-authority", rejecter="resp")


def test_expired_and_not_yet_valid(pki):
    old = int(time.time()) - 10 * 86400
    _refused(pki.config("src"), pki.config("dst", not_before=old, days=1), "expired")
    _refused(pki.config("src", not_before=int(time.time()) + 3600), pki.config("dst"), "not-yet-valid",
             rejecter="resp")


def test_key_mismatch_stolen_certificate(pki):
    victim = pki.config("dst")
    thief = pki.config("dst")  # own keys...
    stolen = type(thief)(**{**thief.__dict__, "certificate": victim.certificate})  # ...victim's certificate
    _refused(pki.config("src"), stolen, "key-mismatch")


def test_bad_quote_forged_signature(pki, monkeypatch):
    import palm_net.channel.handshake as hsmod
    real = hsmod.make_quote
    monkeypatch.setattr(hsmod, "make_quote", lambda ident, h, m: real(ident, bytes(len(h)), m))
    _refused(pki.config("src"), pki.config("dst"), "bad-quote")


def test_quote_replayed_from_another_session(pki):
    """A quote captured in one session does not verify in another (channel binding)."""
    src, dst = pki.config("src"), pki.config("dst")
    import palm_net.channel.handshake as hsmod
    captured = []
    orig = hsmod.make_quote
    hsmod.make_quote = lambda ident, h, m: captured.append(orig(ident, h, m)) or captured[-1]
    try:
        pump(AttestedHandshake(src, True), AttestedHandshake(dst, False))
        replay = captured[0]
        hsmod.make_quote = lambda ident, h, m: replay
        with pytest.raises(HandshakeError) as info:
            pump(AttestedHandshake(src, True), AttestedHandshake(dst, False))
        assert info.value.code == "bad-quote"
    finally:
        hsmod.make_quote = orig


def test_measurement_not_allowed(pki):
    _refused(pki.config("src"), pki.config("dst", measurement=os.urandom(32)), "measurement-not-allowed")


def test_role_not_allowed(pki):
    _refused(pki.config("src"), pki.config("dst", roles=["source"]), "role-not-allowed")
    _refused(pki.config("src", roles=["destination"]), pki.config("dst"), "role-not-allowed", rejecter="resp")


def test_cipher_not_allowed_and_downgrade_detected(pki):
    only_chacha = pki.config("dst", ciphers=(CipherName.CHACHAPOLY,))
    _refused(pki.config("src", ciphers=(CipherName.AESGCM, CipherName.CHACHAPOLY)), only_chacha,
             "cipher-not-allowed", rejecter="resp", cipher=CipherName.AESGCM)

    # An attacker rewrites the initiator's choice in the preamble: the prologue no
    # longer matches and the handshake fails at the first authenticated message.
    def downgrade(flight, data):
        if flight == 0:
            n = int.from_bytes(data[:4], "big")
            purpose, mode, name = decode_preamble(data[4 : 4 + n])
            return frame(encode_preamble(purpose, mode, name.replace("AESGCM", "ChaChaPoly"))) + data[4 + n :]
        return data
    init = AttestedHandshake(pki.config("src"), True, cipher=CipherName.AESGCM)
    resp = AttestedHandshake(pki.config("dst"), False)
    with pytest.raises(HandshakeError) as info:
        pump(init, resp, tamper=downgrade)
    assert info.value.code == "handshake-failed"
    assert not init.complete


def test_purpose_bound_into_prologue(pki):
    """A migration endpoint refuses a recovery transcript and vice versa."""
    init = AttestedHandshake(pki.config("src"), True, purpose=Purpose.RECOVERY)
    resp = AttestedHandshake(pki.config("dst"), False, purpose=Purpose.MIGRATION)
    with pytest.raises(HandshakeError) as info:
        pump(init, resp)
    assert info.value.code == "purpose"

    def flip_purpose(flight, data):
        if flight == 0:
            b = bytearray(data)
            b[4 + 5] = Purpose.MIGRATION  # the preamble's purpose byte
            return bytes(b)
        return data
    init = AttestedHandshake(pki.config("src"), True, purpose=Purpose.RECOVERY)
    resp = AttestedHandshake(pki.config("dst"), False, purpose=None)
    with pytest.raises(HandshakeError):
        pump(init, resp, tamper=flip_purpose)


def test_plain_mode_needs_both_sides(pki):
    with pytest.raises(LocalProtocolError, match="plain"):  # our own mistake: nothing is sent
        AttestedHandshake(pki.config("src"), True, mode=TransportMode.PLAIN_BENCHMARK)
    _refused(pki.config("src", allow_plain=True), pki.config("dst"), "plain-not-allowed", rejecter="resp",
             mode=TransportMode.PLAIN_BENCHMARK)
    init = AttestedHandshake(pki.config("src", allow_plain=True), True, mode=TransportMode.PLAIN_BENCHMARK)
    resp = AttestedHandshake(pki.config("dst", allow_plain=True), False)
    pump(init, resp)
    assert resp.result.mode is TransportMode.PLAIN_BENCHMARK
    # Bulk data may go in the clear; everything else is still sealed (proto 5).
    clear, sealed = init.result.sender.seal(b"visible", clear=True), init.result.sender.seal(b"control")
    assert b"visible" in clear and b"control" not in sealed
    rx = resp.result.receiver
    rx.receive_data(clear + sealed)
    assert (rx.next_record(), rx.authenticated) == (b"visible", False)
    assert (rx.next_record(), rx.authenticated) == (b"control", True)


def test_garbage_and_oversize_preamble(pki):
    resp = AttestedHandshake(pki.config("dst"), False)
    with pytest.raises(HandshakeError) as info:
        resp.receive_data(b"\xff\xff\xff\xff")
    assert info.value.code == "oversize"
    resp = AttestedHandshake(pki.config("dst"), False)
    with pytest.raises(HandshakeError):
        resp.receive_data(b"\x00\x00\x00\x08GET / HT")


async def test_handshake_deadline(pki):
    cfg = pki.config("dst", handshake_timeout=0.2)
    _s1, s2 = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeError) as info:
        await accept(s2, cfg)  # the peer never speaks
    assert info.value.code == "timeout"


def test_no_key_material_in_reprs_exceptions_or_logs(pki, caplog):
    caplog.set_level(logging.DEBUG)
    src, dst = pki.config("src"), pki.config("dst")
    init = AttestedHandshake(src, True)
    resp = AttestedHandshake(dst, False)
    pump(init, resp)
    secrets = [src.identity.static.private, bytes(src.identity.signing), dst.identity.static.private,
               bytes(dst.identity.signing), init.result.sender.cs.k, init.result.receiver.cs.k]
    texts = [repr(x) for x in (src, dst, src.identity, init, resp, init.result, init.result.sender,
                              init.result.receiver, pki.authority)]
    try:
        _refused(pki.config("src"), pki.config("dst", measurement=os.urandom(32)), "measurement-not-allowed")
    except Exception as exc:  # pragma: no cover
        texts.append(str(exc))
    texts.append(caplog.text)
    for s in secrets:
        for t in texts:
            assert s.hex() not in t and s.hex()[:16] not in t


# --------------------------------------------------------------------------
# Each check at its edge (found by mutation testing)


def test_certificates_are_judged_by_the_configured_clock(pki):
    """An agent whose clock says the peer's certificate has expired refuses it,
    whatever the host's own clock says."""
    later = time.time() + 400 * 86400
    _refused(pki.config("src", clock=lambda: later), pki.config("dst", days=30), "expired")


def _payload_refused(pki, payload: dict) -> HandshakeError:
    init = AttestedHandshake(pki.config("src"), True)
    init._payload = lambda h: msgpack.packb(payload)  # type: ignore[method-assign]
    resp = AttestedHandshake(pki.config("dst"), False, purpose=None)
    with pytest.raises(HandshakeError) as info:
        pump(init, resp)
    assert resp.result is None
    return info.value


def _altered_payload_refused(pki, change) -> HandshakeError | None:
    """The initiator's real payload with ``change`` made to it (its dict); the error, or None."""
    init = AttestedHandshake(pki.config("src"), True)
    real = init._payload
    init._payload = lambda h: msgpack.packb(change(msgpack.unpackb(real(h))))  # type: ignore[method-assign]
    resp = AttestedHandshake(pki.config("dst"), False, purpose=None)
    try:
        pump(init, resp)
    except HandshakeError as exc:
        assert resp.result is None
        return exc
    return None


def _with(**fields):
    return lambda d: {**d, **fields}


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("change", [
    _with(v=2), _with(cert="not bytes"), _with(quote="not bytes"), _with(ciphers="AESGCM"),
    _with(ciphers=["AESGCM", 7]), _with(ciphers=[7]), _with(more=1), _without("quote"), _without("ciphers"),
], ids=["v", "cert", "quote", "ciphers", "cipher-name", "cipher-names", "extra", "missing", "no-ciphers"])
def test_every_field_of_the_attestation_payload_is_checked(pki, change):
    """One field wrong in an otherwise valid payload (so no later check hides it)."""
    assert _altered_payload_refused(pki, lambda d: d) is None  # the real one passes
    err = _altered_payload_refused(pki, change)
    assert err is not None and err.code == "malformed"


def test_the_attestation_payload_is_bounded(pki):
    base = {"v": 1, "cert": b"c" * 100, "quote": b"q" * 64}
    assert _payload_refused(pki, {**base, "ciphers": ["AESGCM"] * 9}).code == "malformed"  # 8 at most
    assert _payload_refused(pki, {**base, "ciphers": ["A" * 257]}).code == "malformed"  # 256 characters at most


def test_the_attestation_payload_s_bounds_hold_at_their_edge_in_a_valid_payload(pki):
    """8 cipher names of 256 characters at most, judged in a payload otherwise valid (no later check hides them)."""
    def padded(count, size):
        return lambda d: {**d, "ciphers": d["ciphers"] + ["x" * size] * (count - len(d["ciphers"]))}
    assert _altered_payload_refused(pki, padded(8, 256)) is None
    for count, size in ((9, 1), (8, 257)):
        err = _altered_payload_refused(pki, padded(count, size))
        assert err is not None and err.code == "malformed", (count, size)


def test_a_preamble_is_whole_and_at_most_64_bytes(pki):
    with pytest.raises(HandshakeError) as info:
        decode_preamble(b"PALM\x01\x01\x00")  # the magic, but cut short
    assert info.value.code == "bad-preamble"
    # 64 bytes is allowed (the name is then what is refused), 65 is too long.
    for size, code in ((64, "cipher-not-allowed"), (65, "bad-preamble")):
        name = b"N" * (size - 8)
        resp = AttestedHandshake(pki.config("dst"), False)
        with pytest.raises(HandshakeError) as info:
            resp.receive_data(frame(b"PALM\x01\x01\x00" + bytes([len(name)]) + name))
        assert info.value.code == code, size


def test_a_preamble_is_8_bytes_and_its_ascii_name():
    head = b"PALM" + bytes([1, Purpose.MIGRATION, TransportMode.SECURE])
    assert decode_preamble(head + b"\x00") == (Purpose.MIGRATION, TransportMode.SECURE, "")
    for bad in (head, head + b"\x01\xff"):  # 7 bytes; a name that is not ascii
        with pytest.raises(HandshakeError) as info:
            decode_preamble(bad)
        assert info.value.code == "bad-preamble"


def test_a_preamble_whose_length_byte_disagrees_or_whose_name_noise_refuses_is_a_refusal_not_a_crash(pki):
    """A preamble with a wrong name length, or a known cipher in an unknown protocol name, is a HandshakeError."""
    head = b"PALM" + bytes([1, Purpose.MIGRATION, TransportMode.SECURE])
    for bad in (head + b"\x02x", head + b"\x00x"):
        with pytest.raises(HandshakeError) as info:
            decode_preamble(bad)
        assert info.value.code == "bad-preamble"
    resp = AttestedHandshake(pki.config("dst"), False)
    with pytest.raises(HandshakeError) as info:  # the cipher is allowed; Noise knows no 448 nor BLAKE3
        resp.receive_data(frame(encode_preamble(Purpose.MIGRATION, TransportMode.SECURE,
                                                "Noise_XX_448_ChaChaPoly_BLAKE3")))
    assert info.value.code == "cipher-not-allowed"


def test_an_initiator_offers_its_first_configured_cipher_unless_told(pki):
    for ciphers in ((CipherName.AESGCM, CipherName.CHACHAPOLY), (CipherName.CHACHAPOLY, CipherName.AESGCM)):
        init = AttestedHandshake(pki.config("src", ciphers=ciphers), True)
        resp = AttestedHandshake(pki.config("dst"), False, purpose=None)
        pump(init, resp)
        assert init.result is not None and ciphers[0].value in init.result.protocol_name


def test_the_configured_record_bound_holds_on_the_session_s_receiver(pki):
    init = AttestedHandshake(pki.config("src"), True)
    resp = AttestedHandshake(pki.config("dst", max_record=1000), False, purpose=None)
    pump(init, resp)
    assert init.result and resp.result
    rx = resp.result.receiver
    rx.receive_data(init.result.sender.seal(bytes(1000 - 16)))  # a 1000-byte frame: at the bound
    assert rx.next_record() == bytes(984)
    with pytest.raises(RemoteProtocolError) as info:
        rx.receive_data(init.result.sender.seal(bytes(1000 - 15)))
        rx.next_record()
    assert info.value.code is ErrorCode.OVERSIZE


async def test_connect_and_accept_pass_on_what_they_are_asked_and_accept_shows_its_handshake(pki):
    """connect's purpose, mode and cipher reach the handshake; accept's on_start sees it, accept's purpose binds."""
    cfg_a = pki.config("src", allow_plain=True, ciphers=(CipherName.AESGCM, CipherName.CHACHAPOLY))
    s1, s2 = trio.testing.memory_stream_pair()
    seen: list[AttestedHandshake] = []
    a, b = await _pair(s1, s2, cfg_a, pki.config("dst", allow_plain=True), purpose=Purpose.RECOVERY,
                       mode=TransportMode.PLAIN_BENCHMARK, cipher=CipherName.CHACHAPOLY, on_start=seen.append)
    assert len(seen) == 1 and seen[0].result is b.result  # the agent drops pending handshakes by their progress
    assert b.result.purpose is Purpose.RECOVERY and b.result.mode is TransportMode.PLAIN_BENCHMARK and a.plain
    assert "ChaChaPoly" in a.result.protocol_name == b.result.protocol_name  # not the first configured
    s1, s2 = trio.testing.memory_stream_pair()
    await s1.send_all(AttestedHandshake(pki.config("src"), True, purpose=Purpose.RECOVERY).initiate())
    await s1.aclose()  # all it says: a recovery session's start
    with pytest.raises(HandshakeError) as info:  # a migration endpoint refuses a recovery session
        await accept(s2, pki.config("dst"), purpose=Purpose.MIGRATION)
    assert info.value.code == "purpose"


async def test_an_initiator_refusing_the_reply_says_why_not_that_the_address_does_not_speak_palm(pki):
    """The initiator's refusal of a palm reply (a certificate of another authority) keeps its code; only a frame
    too long for palm is called "does not speak palm"."""
    rogue = Authority.generate()
    s1, s2 = trio.testing.memory_stream_pair()
    errors: dict[str, HandshakeError] = {}

    async def end(name, stream, run):
        try:
            await run(stream)
        except HandshakeError as exc:
            errors[name] = exc
            await stream.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(end, "b", s2, lambda s: accept(s, pki.config("dst", authority=rogue)))
        await end("a", s1, lambda s: connect(s, pki.config("src")))
    assert errors["a"].code == "unknown-authority", errors["a"]


# ------------------------------------------------------------------ identities on disk, certificates
# (palm_net/crypto/identity.py: each test below fails with a mutant that survived the
# selection before it; docs/MUTATION.md)


def test_a_key_file_others_may_read_or_too_long_to_be_a_key_is_refused(tmp_path):
    key = tmp_path / "k"
    for mode in (0o640, 0o604, 0o610, 0o601):  # group or other: read, or any other bit
        write_secret_file(key, b"x")
        os.chmod(key, mode)
        with pytest.raises(KeyFileError, match="group/other"):
            read_secret_file(key)
    whole = os.urandom(MAX_KEY_FILE)
    write_secret_file(key, whole)  # at the bound: read whole
    assert read_secret_file(key) == whole
    write_secret_file(key, whole + b"x")
    with pytest.raises(KeyFileError, match="is over 4096 bytes"):
        read_secret_file(key)


def test_a_key_file_of_another_version_or_key_length_is_refused(tmp_path):
    tmp_path.chmod(0o700)
    ident = AgentIdentity.generate("host")
    ident.save(tmp_path)
    assert AgentIdentity.load(tmp_path).sign_pub == ident.sign_pub
    good = {"v": 1, "name": "host", "x25519": ident.static.private, "ed25519": bytes(ident.signing)}
    for bad in ({"x25519": bytes(31)}, {"ed25519": bytes(31)}, {"v": 2}):
        write_secret_file(tmp_path / IDENTITY_FILE, msgpack.packb(good | bad))
        with pytest.raises(KeyFileError):
            AgentIdentity.load(tmp_path)
    ca = Authority.generate()
    ca.save(tmp_path)
    assert Authority.load(tmp_path).public == ca.public
    for bad in ({"ed25519": bytes(31)}, {"v": 2}):
        write_secret_file(tmp_path / CA_KEY_FILE, msgpack.packb({"v": 1, "ed25519": bytes(ca.signing)} | bad))
        with pytest.raises(KeyFileError):
            Authority.load(tmp_path)


def _signed_certificate(ca: Authority, **change: object) -> bytes:
    ident = AgentIdentity.generate("host")
    body = {"v": 1, "name": "host", "static_pub": ident.static.public, "sign_pub": ident.sign_pub,
            "measurement": bytes(32), "nbf": int(time.time()) - 60, "naf": int(time.time()) + 3600,
            "roles": ["source", "destination"], "iss": ca.key_id} | change
    packed = msgpack.packb(body)
    out: bytes = msgpack.packb({"body": packed, "sig": ca.signing.sign(CERT_DOMAIN + packed).signature})
    return out


def test_a_signed_certificate_of_another_version_with_other_fields_or_types_is_malformed():
    ca = Authority.generate()
    Certificate.decode(_signed_certificate(ca)).verify(ca.public)
    for change in ({"v": 2}, {"extra": 1}, {"static_pub": "k" * 32}, {"nbf": True}, {"naf": "never"},
                   {"name": b"host"}, {"static_pub": bytes(31)}, {"sign_pub": bytes(33)}, {"measurement": bytes(31)}):
        with pytest.raises(AttestationError) as info:
            Certificate.decode(_signed_certificate(ca, **change))
        assert info.value.reason == ErrorCode.MALFORMED, change


def test_a_certificate_of_exactly_the_bound_is_read_one_byte_more_is_not():
    ca = Authority.generate()
    roles, pad = ["source"] + ["p" * 1000] * 3, 300  # a string is at most 1024 characters
    while len(data := _signed_certificate(ca, roles=[*roles, "p" * pad])) != MAX_CERT_LEN:
        pad += MAX_CERT_LEN - len(data)
    assert Certificate.decode(data).roles == (*roles, "p" * pad)
    with pytest.raises(AttestationError) as info:
        Certificate.decode(data + b"\x00")
    assert info.value.reason == ErrorCode.MALFORMED


def test_a_certificate_holds_from_not_before_to_not_after_both_included():
    ca = Authority.generate()
    ident = AgentIdentity.generate("host")
    cert = ca.issue("host", ident.static.public, ident.sign_pub, bytes(32), not_before=1000, days=1)
    for now in (1000, 1000 + 86400):
        cert.verify(ca.public, now)
    for now, reason in ((999.5, ErrorCode.NOT_YET_VALID), (1000 + 86400.5, ErrorCode.EXPIRED)):
        with pytest.raises(AttestationError) as info:
            cert.verify(ca.public, now)
        assert info.value.reason == reason


def test_a_name_is_1_to_64_ascii_letters_digits_dash_underscore_dot_and_never_starts_with_a_dot():
    for good in ("a", "n" * 64, "host-1_b.c", "A9"):
        validate_name(good)
    for bad in ("", "n" * 65, ".", "..", ".hidden", "a/b", "../x", "a b", "h\u00f6st", "a\x00"):
        with pytest.raises(ValueError):
            validate_name(bad)


def test_the_measurement_covers_every_agent_module_and_its_configuration_but_not_test_tooling(tmp_path):
    (tmp_path / "testing").mkdir()
    (tmp_path / "wire").mkdir()
    files = {"a.py": b"a", "testing/t.py": b"t", "wire/z.py": b"z", "notes.txt": b"n"}
    for rel, content in files.items():
        (tmp_path / rel).write_bytes(content)
    base = compute_measurement(b"", tmp_path)
    assert compute_measurement(b"", tmp_path) == base and len(base) == 32
    assert compute_measurement(b"p", tmp_path) != base
    for rel, changes in (("a.py", True), ("wire/z.py", True), ("testing/t.py", False), ("notes.txt", False)):
        (tmp_path / rel).write_bytes(files[rel] + b"!")
        assert (compute_measurement(b"", tmp_path) != base) == changes, rel
        (tmp_path / rel).write_bytes(files[rel])
    (tmp_path / "wire" / "new.py").write_bytes(b"")  # a module added
    assert compute_measurement(b"", tmp_path) != base
