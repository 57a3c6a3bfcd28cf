"""The record layer (sans-IO): one frame = one Noise transport message.

Each direction has its own CipherState with an implicit counter nonce, so a
replayed, reordered, dropped or altered record fails authentication at the
receiver.  Both ends also chain every record's AEAD tag into a running
transcript hash; the migration protocol's completion record carries the
sender's value so the receiver can prove it processed exactly that sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import zlib
from collections.abc import Iterator
from typing import TypeVar

from palm_net.crypto.noise import MAX_MESSAGE_LEN, TAGLEN, Buffer, CipherState, NoiseError
from palm_net.errors import ErrorCode, PalmError, RemoteProtocolError
from palm_net.wire.framing import LENGTH, PREFIX_LEN, FrameBuffer
from palm_net.wire.messages import MAX_PLAINTEXT as WIRE_MAX_PLAINTEXT

# Noise REKEY (spec 11.3) after this many records in a direction: about
# 256 MiB of page records, so a transient key protects a bounded amount.
REKEY_INTERVAL = 4096
MAX_PLAINTEXT = MAX_MESSAGE_LEN - TAGLEN
assert MAX_PLAINTEXT == WIRE_MAX_PLAINTEXT  # the wire layer bounds messages by the same figure
TRANSCRIPT_LEN = 32


def _chain(prev: bytes, item: bytes) -> bytes:
    return hashlib.blake2b(prev + item, digest_size=TRANSCRIPT_LEN).digest()


CLEAR, SEALED = 0, 1  # PLAIN_BENCHMARK mode: the first byte of every frame body
B = TypeVar("B", bytes, memoryview)


class _Direction:
    """One direction's cipher state, record count, transcript and rekey schedule.

    In PLAIN_BENCHMARK mode (``plain``) each frame body starts with a kind
    byte: SEALED records are Noise transport messages as in SECURE mode (the
    nonce counts sealed records only); CLEAR records carry their plaintext
    unprotected.  Only bulk data may travel CLEAR (the session protocol
    refuses anything else), so the handoff messages stay authenticated.
    """

    __slots__ = ("count", "cs", "plain", "rekey_interval", "sealed", "transcript")

    def __init__(self, cs: CipherState, rekey_interval: int = REKEY_INTERVAL, plain: bool = False) -> None:
        if not cs.has_key():
            raise ValueError("a record direction needs a keyed CipherState")
        self.cs = cs
        self.count = 0
        self.sealed = 0
        self.transcript = bytes(TRANSCRIPT_LEN)
        self.rekey_interval = rekey_interval
        self.plain = plain

    def _advance(self, body: Buffer, sealed: bool) -> None:
        # A clear record has no tag: chain a CRC of it so the count still binds.
        tag = bytes(body[-TAGLEN:]) if sealed else zlib.crc32(body).to_bytes(4, "big")
        self.transcript = _chain(self.transcript, tag)
        self.count += 1
        if sealed:
            self.sealed += 1
            if self.sealed % self.rekey_interval == 0:
                self.cs.rekey()


class RecordSender(_Direction):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"RecordSender(count={self.count}, plain={self.plain})"

    def seal(self, plaintext: bytes, clear: bool = False) -> bytes:
        """Returns the frame (length prefix + body)."""
        prefix, body = self.seal_parts(plaintext, clear)
        return prefix + body

    def seal_parts(self, plaintext: bytes, clear: bool = False) -> tuple[bytes, bytes]:
        """The frame as (length prefix, body), for callers that join many frames at once.
        ``clear`` (PLAIN_BENCHMARK mode only) sends the plaintext unprotected."""
        if not 0 < len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"record plaintext must be 1..{MAX_PLAINTEXT} bytes")
        if not self.plain:
            if clear:
                raise ValueError("clear records exist only in the plain benchmark mode")
            ct = self.cs.encrypt_with_ad(b"", plaintext)
            self._advance(ct, True)
            return LENGTH.pack(len(ct)), ct
        if clear:
            self._advance(plaintext, False)
            return LENGTH.pack(1 + len(plaintext)), bytes([CLEAR]) + plaintext
        ct = self.cs.encrypt_with_ad(b"", plaintext)
        self._advance(ct, True)
        return LENGTH.pack(1 + len(ct)), bytes([SEALED]) + ct

    @staticmethod
    def frame_size(plaintext_len: int, plain: bool) -> int:
        """Bytes on the wire for a record of this plaintext (the larger, sealed form)."""
        return PREFIX_LEN + int(plain) + plaintext_len + TAGLEN

    def seal_into(self, plaintext: Buffer, out: memoryview, clear: bool = False) -> int:
        """The frame written at the start of ``out`` (the bulk path: no copies but the
        sealing itself); returns its length.  As ``seal_parts`` otherwise."""
        m = len(plaintext)
        if not 0 < m <= MAX_PLAINTEXT:
            raise ValueError(f"record plaintext must be 1..{MAX_PLAINTEXT} bytes")
        if clear and not self.plain:
            raise ValueError("clear records exist only in the plain benchmark mode")
        start = PREFIX_LEN + int(self.plain)
        if self.plain:
            out[PREFIX_LEN] = CLEAR if clear else SEALED
        if clear:
            out[start : start + m] = plaintext
            self._advance(out[start : start + m], False)
            size = m
        else:
            size = self.cs.encrypt_into(plaintext, out[start:])
            self._advance(out[start + size - TAGLEN : start + size], True)
        LENGTH.pack_into(out, 0, start - PREFIX_LEN + size)
        return start + size


class Record:
    """One record as the receiver opened it: its plaintext (bytes, or a view of the
    buffer it was opened in), its index in the session, the receive transcript
    before it, and whether it came sealed."""

    __slots__ = ("authenticated", "data", "index", "transcript_before")

    def __repr__(self) -> str:
        return f"Record(index={self.index}, {len(self.data)} bytes, authenticated={self.authenticated})"

    def __init__(self, data: Buffer, index: int, transcript_before: bytes, authenticated: bool = True) -> None:
        self.data = data
        self.index = index
        self.transcript_before = transcript_before
        self.authenticated = authenticated


class RecordReceiver(_Direction):
    __slots__ = ("authenticated", "failed", "frames")

    def __init__(self, cs: CipherState, rekey_interval: int = REKEY_INTERVAL,
                 max_record: int = MAX_MESSAGE_LEN, plain: bool = False) -> None:
        if not TAGLEN < max_record <= MAX_MESSAGE_LEN:
            raise ValueError(f"max_record must be in {TAGLEN + 1}..{MAX_MESSAGE_LEN}")
        super().__init__(cs, rekey_interval, plain)
        self.frames = FrameBuffer(max_record + 1 if plain else max_record, min_len=2 if plain else TAGLEN + 1)
        self.failed = False
        self.authenticated = True  # whether the last record returned was sealed

    def __repr__(self) -> str:
        return f"RecordReceiver(count={self.count}, plain={self.plain}, failed={self.failed})"

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self.frames.feed(data)

    def take_buffered(self) -> bytes:
        """The bytes ``receive_data`` took and no record consumed yet: for a caller
        switching to its own buffers (``whole_frames``, ``open_in_place``)."""
        return self.frames.take_rest()

    def whole_frames(self, buf: Buffer, size: int) -> int:
        """Where the whole frames at the start of ``buf[:size]`` end (every length checked)."""
        with self._fail_closed():
            return self.frames.whole_frames(buf, size)

    def open_in_place(self, buf: memoryview) -> list[Record]:
        """Opens the whole frames that fill ``buf`` (see ``whole_frames``), decrypting
        each where it lies; their plaintexts are views of ``buf``.  Same checks and
        failure rule as ``next_record``."""
        out: list[Record] = []
        pos, end = 0, len(buf)
        with self._fail_closed():
            while pos < end:
                (n,) = LENGTH.unpack_from(buf, pos)
                body = buf[pos + PREFIX_LEN : pos + PREFIX_LEN + self.frames.check(n)]
                if len(body) != n:
                    raise RemoteProtocolError(ErrorCode.BAD_RECORD, "a frame cut short")
                pos += PREFIX_LEN + n
                body, sealed = self._unwrap(body)
                index, before = self.count, self.transcript
                if sealed:
                    tag = bytes(body[-TAGLEN:])  # before the plaintext may overwrite anything
                    size = self.cs.decrypt_into(body, body)
                    self._advance(tag, True)
                    body = body[:size]
                else:
                    self._advance(body, False)
                out.append(Record(body, index, before, sealed))
        return out

    @contextlib.contextmanager
    def _fail_closed(self) -> Iterator[None]:
        """Runs a step of reading records: nothing after a failure, and any failure
        (a bad length, kind or tag) is final."""
        if self.failed:
            raise RemoteProtocolError(ErrorCode.BAD_RECORD, "the record layer already failed")
        try:
            yield
        except PalmError:
            self.failed = True
            raise
        except NoiseError:
            self.failed = True
            raise RemoteProtocolError(ErrorCode.BAD_RECORD, f"record {self.count} failed authentication") from None

    def _unwrap(self, body: B) -> tuple[B, bool]:
        """A frame body as (record, sealed): in PLAIN_BENCHMARK mode its kind byte decides."""
        if not self.plain:
            return body, True
        kind, rest = body[0], body[1:]
        if kind not in (CLEAR, SEALED) or (kind == SEALED and len(rest) <= TAGLEN):
            raise RemoteProtocolError(ErrorCode.BAD_RECORD, f"record {self.count} has an unknown kind")
        return rest, kind == SEALED

    def next_record(self) -> bytes | None:
        """The next plaintext, None if more bytes are needed.  ``authenticated``
        tells whether it was sealed (always, outside the plain benchmark mode).

        Any failure is final: the session is dead and nothing more is returned.
        """
        with self._fail_closed():
            frame = self.frames.next_frame()
            if frame is None:
                return None
            body, sealed = self._unwrap(frame)
            pt = self.cs.decrypt_with_ad(b"", body) if sealed else body
        self._advance(body, sealed)
        self.authenticated = sealed
        return pt
