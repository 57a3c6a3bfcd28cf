"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

The length is checked against the configured maximum before a single byte of
the body is buffered, so a peer claiming 4 GiB costs us nothing.
"""

from __future__ import annotations

import struct

from palm_net.errors import ErrorCode, RemoteProtocolError

LENGTH = struct.Struct(">I")
PREFIX_LEN = LENGTH.size


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Accumulates stream bytes and yields whole frames (sans-IO)."""

    __slots__ = ("_buf", "_need", "max_len", "min_len")

    def __init__(self, max_len: int, min_len: int = 1) -> None:
        self._buf = bytearray()
        self.max_len = max_len
        self.min_len = min_len
        self._need = -1  # body length of the frame in progress, -1 if unknown

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        self._need = -1
        return rest

    def check(self, n: int) -> int:
        """A frame length read from the wire, within bounds (else RemoteProtocolError)."""
        if n > self.max_len:
            raise RemoteProtocolError(ErrorCode.OVERSIZE, f"frame length {n} exceeds the maximum {self.max_len}")
        if n < self.min_len:
            raise RemoteProtocolError(ErrorCode.UNDERSIZE, f"frame length {n} below the minimum {self.min_len}")
        return n

    def whole_frames(self, buf: bytes | bytearray | memoryview, size: int) -> int:
        """For a caller that keeps its own buffer: where the whole frames at the start
        of ``buf[:size]`` end (0 if none is whole yet), every length checked."""
        end = 0
        while end + PREFIX_LEN <= size:
            (n,) = LENGTH.unpack_from(buf, end)
            if end + PREFIX_LEN + self.check(n) > size:
                break
            end += PREFIX_LEN + n
        return end

    def next_frame(self) -> bytes | None:
        buf = self._buf
        if self._need < 0:
            if len(buf) < PREFIX_LEN:
                return None
            (n,) = LENGTH.unpack_from(buf)
            self._need = self.check(n)
        end = PREFIX_LEN + self._need
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body = bytes(view[PREFIX_LEN:end])  # one copy (a bytearray slice would be two)
        del buf[:end]
        self._need = -1
        return body
