"""The record layer (sans-IO): one frame = one Noise transport message.

Each direction has its own CipherState with an implicit counter nonce, so a
replayed, reordered, dropped or altered record fails authentication at the
receiver.  Both ends also chain every record's AEAD tag into a running
transcript hash; the migration protocol's completion record carries the
sender's value so the receiver can prove it processed exactly that sequence.
"""

from __future__ import annotations

import hashlib
import zlib

from palm_net.crypto.noise import MAX_MESSAGE_LEN, TAGLEN, CipherState, NoiseError
from palm_net.wire.errors import ProtocolError
from palm_net.wire.framing import LENGTH, FrameBuffer

# Noise REKEY (spec 11.3) after this many records in a direction: about
# 256 MiB of page records, so a transient key protects a bounded amount.
REKEY_INTERVAL = 4096
MAX_PLAINTEXT = MAX_MESSAGE_LEN - TAGLEN
TRANSCRIPT_LEN = 32


def _chain(prev: bytes, item: bytes) -> bytes:
    return hashlib.blake2b(prev + item, digest_size=TRANSCRIPT_LEN).digest()


class _Direction:
    """One direction's cipher state, record count, transcript and rekey schedule."""

    __slots__ = ("_plain", "count", "cs", "rekey_interval", "transcript")

    def __init__(self, cs: CipherState, rekey_interval: int = REKEY_INTERVAL) -> None:
        self.cs = cs
        self.count = 0
        self.transcript = bytes(TRANSCRIPT_LEN)
        self.rekey_interval = rekey_interval
        self._plain = not cs.has_key()

    def _advance(self, ct: bytes) -> None:
        # Plain (benchmark) mode has no tag: chain a CRC so the count still binds.
        tag = zlib.crc32(ct).to_bytes(4, "big") if self._plain else ct[-TAGLEN:]
        self.transcript = _chain(self.transcript, tag)
        self.count += 1
        if not self._plain and self.count % self.rekey_interval == 0:
            self.cs.rekey()


class RecordSender(_Direction):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"RecordSender(count={self.count}, plain={self._plain})"

    def seal(self, plaintext: bytes) -> bytes:
        """Returns the frame (length prefix + Noise transport message)."""
        prefix, ct = self.seal_parts(plaintext)
        return prefix + ct

    def seal_parts(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """The frame as (length prefix, message), for callers that join many frames at once."""
        if not 0 < len(plaintext) <= MAX_PLAINTEXT:
            raise ValueError(f"record plaintext must be 1..{MAX_PLAINTEXT} bytes")
        ct = self.cs.encrypt_with_ad(b"", plaintext)
        self._advance(ct)
        return LENGTH.pack(len(ct)), ct


class RecordReceiver(_Direction):
    __slots__ = ("failed", "frames")

    def __init__(self, cs: CipherState, rekey_interval: int = REKEY_INTERVAL,
                 max_record: int = MAX_MESSAGE_LEN) -> None:
        if not TAGLEN < max_record <= MAX_MESSAGE_LEN:
            raise ValueError(f"max_record must be in {TAGLEN + 1}..{MAX_MESSAGE_LEN}")
        super().__init__(cs, rekey_interval)
        self.frames = FrameBuffer(max_record, min_len=1 if self._plain else TAGLEN + 1)
        self.failed = False

    def __repr__(self) -> str:
        return f"RecordReceiver(count={self.count}, plain={self._plain}, failed={self.failed})"

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self.frames.feed(data)

    def next_record(self) -> bytes | None:
        """The next authenticated plaintext, None if more bytes are needed.

        Any failure is final: the session is dead and nothing more is returned.
        """
        if self.failed:
            raise ProtocolError("session-failed", "record layer already failed")
        try:
            ct = self.frames.next_frame()
            if ct is None:
                return None
            pt = self.cs.decrypt_with_ad(b"", ct)
        except ProtocolError:
            self.failed = True
            raise
        except NoiseError:
            self.failed = True
            raise ProtocolError("bad-record", f"record {self.count} failed authentication") from None
        self._advance(ct)
        return pt
