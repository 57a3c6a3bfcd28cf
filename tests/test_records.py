"""The record layer and the message codec: every tampering ends the session."""

from __future__ import annotations

import hashlib
import os
import random
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palm_net.channel.records import MAX_PLAINTEXT, RecordReceiver, RecordSender
from palm_net.crypto.noise import AESGCM, CHACHAPOLY, MAX_MESSAGE_LEN, TAGLEN, CipherState
from palm_net.errors import ErrorCode, LocalProtocolError, PalmError, RemoteProtocolError
from palm_net.wire import messages
from palm_net.wire.framing import LENGTH, FrameBuffer, frame
from palm_net.wire.messages import (
    Abort,
    Accept,
    Begin,
    Complete,
    Message,
    Outcome,
    Pages,
    Ready,
    RecoveryOutcome,
    RoundEnd,
    Stream,
    StreamEnd,
)
from palm_net.wire.protocol import Data, Role, SessionProtocol, State
from tests.conftest import FUZZ_COUNTS, raw_message

KEY = bytes(range(32))
MID = bytes(16)


def pair(fns=CHACHAPOLY, **kw):
    return RecordSender(CipherState(fns, KEY), **kw), RecordReceiver(CipherState(fns, KEY), **kw)


def deliver(rx: RecordReceiver, data: bytes) -> bytes | None:
    rx.receive_data(data)
    return rx.next_record()


@pytest.mark.parametrize("fns", [CHACHAPOLY, AESGCM])
def test_roundtrip_transcript_and_rekey(fns):
    tx, rx = pair(fns, rekey_interval=3)
    for i in range(10):
        pt = os.urandom(1 + i * 1000)
        assert deliver(rx, tx.seal(pt)) == pt
    assert tx.count == rx.count == 10 and tx.transcript == rx.transcript
    assert tx.cs.k == rx.cs.k != KEY  # rekeyed three times, in step


@pytest.mark.parametrize("plain", [False, True])
def test_the_transcript_is_the_spec_s_chain_of_tags(plain):
    """proto 5: T_0 = 32 zero bytes, T_i = BLAKE2b-256(T_(i-1) || tag_i), tag_i the
    record's last 16 bytes, or u32be crc32 of a clear record (PLAIN_BENCHMARK)."""
    tx, rx = pair(plain=plain)
    expected = bytes(32)
    for i, clear in enumerate([False, True, False] if plain else [False] * 3):
        pt = bytes([i]) * (100 + i)
        rec = tx.seal(pt, clear=True) if clear else tx.seal(pt)
        body = rec[4:]  # after the length prefix
        tag = zlib.crc32(body[1:]).to_bytes(4, "big") if clear else body[-16:]
        expected = hashlib.blake2b(expected + tag, digest_size=32).digest()
        assert deliver(rx, rec) == pt
        assert tx.transcript == rx.transcript == expected, i
    assert tx.count == rx.count == 3


def test_a_receiver_that_failed_stays_failed():
    tx, rx = pair()
    one, two = tx.seal(b"one"), tx.seal(b"two")
    bad = bytearray(two)
    bad[-1] ^= 1
    assert deliver(rx, one) == b"one"
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, bytes(bad))
    assert info.value.code is ErrorCode.BAD_RECORD
    with pytest.raises(RemoteProtocolError) as info:  # not even the intact record, which would open otherwise
        deliver(rx, two)
    assert info.value.code is ErrorCode.BAD_RECORD


def test_bit_flip_at_every_sampled_position_fails():
    rng = random.Random(7)
    tx, _ = pair()
    rec = tx.seal(os.urandom(3000))
    positions = [*sorted(rng.sample(range(4, len(rec)), 300)), 4, len(rec) - 1]
    for pos in positions:
        _, rx = pair()
        bad = bytearray(rec)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(RemoteProtocolError) as info:
            deliver(rx, bytes(bad))
        assert info.value.code == "bad-record"
        with pytest.raises(RemoteProtocolError) as info:  # no further processing
            rx.next_record()
        assert info.value.code is ErrorCode.BAD_RECORD


def test_replayed_reordered_truncated_records():
    tx, rx = pair()
    r0, r1, r2 = (tx.seal(bytes([i]) * 100) for i in range(3))
    assert deliver(rx, r0) == bytes(100)
    with pytest.raises(RemoteProtocolError, match="authentication") as info:
        deliver(rx, r0)  # replay
    assert info.value.code is ErrorCode.BAD_RECORD
    _, rx = pair()
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, r1)  # reordered: r1 before r0
    assert info.value.code is ErrorCode.BAD_RECORD
    _, rx = pair()
    deliver(rx, r0)
    assert deliver(rx, r1[:-5]) is None  # truncated: waits for the rest...
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, r2[:5])  # ...and the next bytes do not authenticate
    assert info.value.code is ErrorCode.BAD_RECORD


def test_oversize_length_refused_before_allocation():
    _, rx = pair()
    rx.receive_data((2**31).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as info:
        rx.next_record()
    assert info.value.code == "oversize"
    assert len(rx.frames) == 4  # nothing beyond the prefix was buffered
    rx = RecordReceiver(CipherState(CHACHAPOLY, KEY), max_record=1024)
    rx.receive_data((1025).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="oversize") as info:
        rx.next_record()
    assert info.value.code is ErrorCode.OVERSIZE
    _, rx = pair()
    rx.receive_data((3).to_bytes(4, "big") + b"abc")
    with pytest.raises(RemoteProtocolError, match="undersize") as info:
        rx.next_record()
    assert info.value.code is ErrorCode.UNDERSIZE


def test_sender_refuses_records_larger_than_noise_allows():
    tx, _ = pair()
    with pytest.raises(ValueError):
        tx.seal(bytes(MAX_PLAINTEXT + 1))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_fuzz_record_decoder_only_protocol_errors(data, chunk):
    FUZZ_COUNTS["record-decoder"] += 1
    _, rx = pair()
    try:
        for i in range(0, len(data), chunk):
            rx.receive_data(data[i : i + chunk])
            while rx.next_record() is not None:
                pass
    except PalmError:
        pass


# -- messages


def _msg():
    return messages.Message(MID, 0, RoundEnd(1, 2, 3))


def test_message_roundtrip():
    m = _msg()
    assert messages.decode(messages.encode(m)) == m


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("seq"),
    lambda o: o.update(extra=1),
    lambda o: o.update(t="NOPE"),
    lambda o: o.update(v=1),  # the version before the data records
    lambda o: o.update(mid=b"short"),
    lambda o: o.update(seq=-1),
    lambda o: o["b"].pop("round"),
    lambda o: o["b"].update(more=1),
    lambda o: o["b"].update(round="1"),
    lambda o: o["b"].update(round=10**9),
    lambda o: o["b"].update(round=True),
])
def test_message_schema_violations(mutate):
    obj = {"v": messages.WIRE_VERSION, "t": "ROUND_END", "mid": MID, "seq": 0,
           "b": {"round": 1, "pages": 2, "dirty": 3}}
    mutate(obj)
    with pytest.raises(RemoteProtocolError):
        messages.decode(msgpack.packb(obj))


def test_an_outcome_is_one_of_three_and_an_abort_code_maps_to_a_known_one():
    for outcome in RecoveryOutcome:
        body = messages.decode(messages.encode(Message(MID, 0, Outcome(outcome.value, b"")))).body
        assert body.outcome == outcome
    forged = {"v": messages.WIRE_VERSION, "t": "OUTCOME", "mid": MID, "seq": 0,
              "b": {"outcome": "committed!", "token": b""}}
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(msgpack.packb(forged))
    assert info.value.code is ErrorCode.MALFORMED
    assert Abort("no-space", "", b"").error_code is ErrorCode.NO_SPACE
    assert Abort("from-the-future", "", b"").error_code is ErrorCode.OUT_OF_STATE  # a code this side does not know


def test_timings_are_two_capped_microsecond_counts_of_a_fixed_size():
    assert messages.timings(0.0015, 12.25) == (1500).to_bytes(4, "big") + (12_250_000).to_bytes(4, "big")
    assert messages.timings_s(messages.timings(0.0015, 12.25)) == (0.0015, 12.25)
    assert messages.timings(1e9, -1.0) == (2**32 - 1).to_bytes(4, "big") + bytes(4)  # capped, never negative
    for body in (Ready(b"", messages.timings(0, 0)), Ready(b"", messages.timings(4e3, 4e3))):
        assert len(messages.encode(Message(MID, 7, body))) == len(messages.encode(Message(MID, 7, Ready(b""))))
    with pytest.raises(LocalProtocolError):
        Ready(b"", bytes(7))  # exactly 8 bytes


def test_malformed_msgpack_and_ext_types():
    for data in (b"\xc1", b"\x81", msgpack.packb([1, 2]), msgpack.packb(msgpack.ExtType(1, b"x")),
                 messages.encode(_msg()) + b"\x00"):
        with pytest.raises(RemoteProtocolError) as info:
            messages.decode(data)
        assert info.value.code is ErrorCode.MALFORMED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_message_decoder_bytes(data):
    FUZZ_COUNTS["message-decoder"] += 1
    try:
        messages.decode(data)
    except PalmError:
        pass


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(messages.TYPES)), st.dictionaries(st.text(max_size=10), values, max_size=6),
       values)
def test_fuzz_message_decoder_structured(mtype, body, seq):
    FUZZ_COUNTS["message-schema"] += 1
    obj = {"v": messages.WIRE_VERSION, "t": mtype, "mid": MID, "seq": seq, "b": body}
    try:
        msg = messages.decode(msgpack.packb(obj))
    except PalmError:
        return
    assert type(msg.body) is messages.TYPES[mtype] and set(msg.body.fields()) == set(body)


# -- the session state machine


def _begun(backend: str, spec: bytes) -> tuple[SessionProtocol, SessionProtocol]:
    src, dst = SessionProtocol(Role.SOURCE, MID), SessionProtocol(Role.DESTINATION)
    dst.receive(src.send(Begin(vm="v", vm_id=bytes(16), pages=1, protected_pages=0, processes=0, vcpus=1,
                         plain=False, digest=False, backend=backend, spec=spec)))
    src.receive(dst.send(Accept()))
    return src, dst


def _forged(src: SessionProtocol, mtype: str, **body) -> bytes:
    """A message the peer's state machine would not let it send (a forger's)."""
    return raw_message(mtype, MID, src._next_seq[Role.SOURCE], body)


def test_session_backend_decides_page_or_stream_messages():
    # a page migration never takes STREAM, a stream migration never takes pages
    src, dst = _begun("model", b"")
    with pytest.raises(RemoteProtocolError, match="not part of a page migration") as info:
        dst.receive(_forged(src, "STREAM", length=1))
    assert info.value.code is ErrorCode.OUT_OF_STATE
    src, dst = _begun("qemu", b"spec")
    for mtype, body in (("PAGES", {"round": 0, "gfns": b"", "kinds": b"", "vers": b"", "tags": b""}),
                        ("KEYS", {"data": b""}), ("CPU_STATE", {"state": b""})):
        with pytest.raises(RemoteProtocolError, match="not part of a stream migration") as info:
            dst.receive(_forged(src, mtype, **body))
        assert info.value.code is ErrorCode.OUT_OF_STATE
    # the stream path: STREAM*, STREAM_END, COMPLETE (no context blob)
    src, dst = _begun("qemu", b"spec")
    for m in (src.send(Stream(length=3)), *src.send_data(b"abc"), src.send(StreamEnd(bytes=3))):
        dst.receive(m)
    with pytest.raises(RemoteProtocolError) as info:  # nothing streams after the end
        dst.receive(_forged(src, "STREAM", length=4))
    assert info.value.code is ErrorCode.OUT_OF_STATE
    src, dst = _begun("qemu", b"spec")
    dst.receive(src.send(StreamEnd(bytes=0)))
    dst.receive(src.send(Complete(records=2, page_records=0, transcript=bytes(32))))
    assert dst.state is State.VERIFYING
    # unknown backends, and a spec where none belongs (or none where one must be)
    for backend, spec, code in (("xen", b"", "unsupported"), ("model", b"x", "malformed"),
                                ("qemu", b"", "malformed")):
        d = SessionProtocol(Role.DESTINATION)
        with pytest.raises(RemoteProtocolError) as info:
            d.receive(raw_message("BEGIN", MID, 0, {
                "vm": "v", "vm_id": bytes(16), "pages": 1, "protected_pages": 0, "processes": 0, "vcpus": 1,
                "plain": False, "digest": False, "backend": backend, "spec": spec}))
        assert info.value.code == code


def test_session_out_of_state_replay_and_foreign_mid():
    src, dst = SessionProtocol(Role.SOURCE, MID), SessionProtocol(Role.DESTINATION)
    begin = src.send(Begin(vm="v", vm_id=bytes(16), pages=1, protected_pages=0, processes=0, vcpus=1,
                     plain=False, digest=False, backend="model", spec=b""))
    dst.receive(begin)
    # PAGES before ACCEPT: out of state on the destination
    src2 = SessionProtocol(Role.SOURCE, MID)
    src2.state = State.STREAMING
    src2._next_seq[Role.SOURCE] = 1
    pages = src2.send(Pages(round=0, gfns=b"", kinds=b"", vers=b"", tags=b""))
    with pytest.raises(RemoteProtocolError) as info:
        dst.receive(pages)
    assert info.value.code == "out-of-state"
    # a replayed BEGIN is out of state too
    dst2 = SessionProtocol(Role.DESTINATION)
    dst2.receive(begin)
    with pytest.raises(RemoteProtocolError) as info:
        dst2.receive(begin)
    assert info.value.code is ErrorCode.OUT_OF_STATE
    # right state, wrong sequence number
    dst3 = SessionProtocol(Role.DESTINATION)
    dst3.receive(begin)
    dst3.send(Accept())
    src3 = SessionProtocol(Role.SOURCE, MID)
    src3.state = State.STREAMING
    src3._next_seq[Role.SOURCE] = 5
    with pytest.raises(RemoteProtocolError) as info:
        dst3.receive(src3.send(RoundEnd(round=0, pages=0, dirty=0)))
    assert info.value.code == "sequence"
    # right state and sequence, another migration's id
    dst4 = SessionProtocol(Role.DESTINATION)
    dst4.receive(begin)
    dst4.send(Accept())
    other = SessionProtocol(Role.SOURCE, os.urandom(16))
    other.state = State.STREAMING
    other._next_seq[Role.SOURCE] = 1
    with pytest.raises(RemoteProtocolError) as info:
        dst4.receive(other.send(RoundEnd(round=0, pages=0, dirty=0)))
    assert info.value.code == "wrong-migration"



def test_a_stream_of_one_byte_is_one_data_record():
    """Guards _data: a bulk of one byte is sent and taken as its one (last) data record."""
    src, dst = _begun("qemu", b"spec")
    announce, *data = [src.send(Stream(length=1)), *src.send_data(b"x")]
    assert dst.receive(announce).type == "STREAM" and dst.data_due
    (record,) = data
    ev = dst.receive(record)
    assert isinstance(ev, Data) and ev.last and bytes(ev.data) == b"x" and not dst.data_due

# --------------------------------------------------------------------------
# Each bound at its edge (found by mutation testing)


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_a_record_holds_1_to_max_plaintext_bytes():
    tx, rx = pair()
    with pytest.raises(ValueError):
        tx.seal(b"")
    with pytest.raises(ValueError):
        tx.seal_into(b"", memoryview(bytearray(64)))
    with pytest.raises(ValueError):
        tx.seal(bytes(MAX_PLAINTEXT + 1))
    assert deliver(rx, tx.seal(bytes(MAX_PLAINTEXT))) == bytes(MAX_PLAINTEXT)
    for bad in (TAGLEN, MAX_MESSAGE_LEN + 1):
        with pytest.raises(ValueError):
            RecordReceiver(CipherState(CHACHAPOLY, KEY), max_record=bad)
    RecordReceiver(CipherState(CHACHAPOLY, KEY), max_record=TAGLEN + 1)


def test_a_sealed_frame_shorter_than_a_tag_and_one_byte_is_refused_unread():
    _, rx = pair()
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, _frame(bytes(TAGLEN)))
    assert info.value.code == "undersize"


def test_plain_mode_frames_a_kind_byte_and_at_least_one_byte():
    tx, rx = pair(plain=True)
    assert deliver(rx, tx.seal(b"x", clear=True)) == b"x"  # a 2-byte frame body
    assert deliver(rx, tx.seal(bytes(MAX_PLAINTEXT), clear=True)) == bytes(MAX_PLAINTEXT)  # kind byte + max
    assert deliver(rx, tx.seal(bytes(MAX_PLAINTEXT))) == bytes(MAX_PLAINTEXT)  # kind byte + a whole Noise message
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, _frame(b"\x00" + bytes(MAX_MESSAGE_LEN + 1)))  # one byte more than that
    assert info.value.code == "oversize"
    _, rx = pair(plain=True)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, _frame(b"\x00"))  # the kind byte alone
    assert info.value.code == "undersize"


@pytest.mark.parametrize(("body", "why"), [(b"\x02" + bytes(40), "kind"), (b"\x01" + bytes(TAGLEN), "tag only")])
def test_plain_mode_refuses_an_unknown_kind_and_a_sealed_record_with_no_plaintext(body, why):
    _, rx = pair(plain=True)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, _frame(body))
    assert info.value.code == "bad-record", why


def test_a_message_is_bounded_by_the_record_and_its_envelope_checked_on_both_sides():
    pad = bytes(MAX_PLAINTEXT - 64)
    msg = msgpack.packb({"v": 2, "t": "ACCEPT", "mid": MID, "seq": 0, "b": {}, "pad": pad})
    msg += bytes(MAX_PLAINTEXT - len(msg))  # exactly the most a record holds: judged on its content
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(msg)
    assert info.value.code == "malformed"
    with pytest.raises(RemoteProtocolError) as info:
        messages.decode(msg + b"\x00")
    assert info.value.code == "oversize"
    for mid, seq in ((bytes(15), 0), (MID, -1), (MID, 2**63)):
        with pytest.raises(LocalProtocolError) as info:
            messages.encode(messages.Message(mid, seq, Accept()))
        assert info.value.code is ErrorCode.MALFORMED
    assert messages.decode(messages.encode(messages.Message(MID, 0, Accept()))).type == "ACCEPT"


@pytest.mark.parametrize("plain", [False, True])
def test_a_direction_rekeys_after_exactly_its_interval_of_sealed_records(plain):
    """REKEY after every ``rekey_interval`` sealed records, clear ones not counted, both ends in step (proto 5)."""
    tx, rx = pair(plain=plain, rekey_interval=4)
    keys = []
    for i in range(9):
        if plain:
            assert deliver(rx, tx.seal(b"bulk", clear=True)) == b"bulk"
        assert deliver(rx, tx.seal(bytes([i]))) == bytes([i])
        assert rx.cs.k == tx.cs.k
        keys.append(tx.cs.k)
    assert keys[:3] == [KEY] * 3 and keys[3:7] == [keys[3]] * 4 and keys[7:] == [keys[7]] * 2
    assert len({KEY, keys[3], keys[7]}) == 3


def test_a_record_direction_needs_a_key():
    """No record layer over a CipherState without a key (its records would go unsealed)."""
    for direction in (RecordSender, RecordReceiver):
        with pytest.raises(ValueError):
            direction(CipherState(CHACHAPOLY))


def test_any_refusal_of_a_frame_is_final_not_only_a_failed_tag():
    """An unknown kind or a bad length ends the receiver too: the valid record after it is never opened."""
    tx, rx = pair(plain=True)
    rx.receive_data(_frame(b"\x02" + bytes(40)) + tx.seal(b"valid", clear=True))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as info:
            rx.next_record()
        assert info.value.code is ErrorCode.BAD_RECORD and rx.failed
    _, rx = pair()
    buf = (2**20).to_bytes(4, "big") + bytes(20)
    with pytest.raises(RemoteProtocolError) as info:
        rx.whole_frames(buf, len(buf))
    assert info.value.code is ErrorCode.OVERSIZE and rx.failed
    with pytest.raises(RemoteProtocolError) as info:
        rx.whole_frames(buf[:4], 4)
    assert info.value.code is ErrorCode.BAD_RECORD


def test_plain_mode_refuses_a_sealed_record_with_no_plaintext_even_under_a_valid_tag():
    """A sealed record holds 1 byte at least in plain mode too: a tag alone is refused before it is opened."""
    _, rx = pair(plain=True)
    empty = CipherState(CHACHAPOLY, KEY).encrypt_with_ad(b"", b"")  # the record the peer's key would make
    with pytest.raises(RemoteProtocolError) as info:
        deliver(rx, _frame(b"\x01" + empty))
    assert info.value.code is ErrorCode.BAD_RECORD

def test_an_int_field_at_its_bound_is_taken_and_one_more_is_not():
    """Guards Field.ok's `value <= max`: a message at each bound decodes; one more is malformed."""
    top = {"round": 10_000, "pages": messages.MAX_GUEST_PAGES * 64, "dirty": messages.MAX_GUEST_PAGES}
    at = messages.Message(MID, messages.MAX_SEQ, RoundEnd(**top))
    assert messages.decode(messages.encode(at)) == at
    for name in top:
        forged = {"v": messages.WIRE_VERSION, "t": "ROUND_END", "mid": MID, "seq": 0, "b": {**top, name: top[name] + 1}}
        with pytest.raises(RemoteProtocolError) as info:
            messages.decode(msgpack.packb(forged))
        assert info.value.code is ErrorCode.MALFORMED


def test_a_frame_buffer_counts_only_whole_frames_checks_a_bare_prefix_and_starts_afresh_after_take_rest():
    """Guards FrameBuffer: whole_frames' bounds, the default 1-byte minimum, and take_rest resetting the frame due."""
    fb = FrameBuffer(max_len=8)
    two = frame(b"abc") + frame(b"defgh")
    assert [fb.whole_frames(two, n) for n in (len(two), len(two) - 1, 7 + 4, 6)] == [len(two), 7, 7, 0]
    with pytest.raises(RemoteProtocolError) as info:  # a 1-byte frame, then a bare prefix claiming too much
        fb.whole_frames(frame(b"x") + LENGTH.pack(9), 9)
    assert info.value.code is ErrorCode.OVERSIZE
    fb.feed(frame(b"abcdef")[:6])
    assert fb.next_frame() is None  # a frame in progress ...
    assert fb.take_rest() == frame(b"abcdef")[:6]  # ... taken away, and forgotten
    fb.feed(frame(b"xy"))
    assert fb.next_frame() == b"xy" and len(fb) == 0


def test_a_message_type_that_is_not_a_string_is_an_unknown_type():
    """Guards decode's `type(obj["t"]) is str` before the lookup: a map there is refused, not a TypeError."""
    for t in ({"x": 1}, b"ROUND_END", 7):
        forged = {"v": messages.WIRE_VERSION, "t": t, "mid": MID, "seq": 0, "b": {"round": 1, "pages": 2, "dirty": 3}}
        with pytest.raises(RemoteProtocolError) as info:
            messages.decode(msgpack.packb(forged))
        assert info.value.code is ErrorCode.UNKNOWN_TYPE
