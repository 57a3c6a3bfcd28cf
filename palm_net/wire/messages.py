"""Messages: strict msgpack maps with a schema per type (proto/PROTOCOL.md, "Messages").

Every message is ``{"v": 1, "t": TYPE, "mid": bin16, "seq": uint, "b": {...}}``.
Decoding refuses anything the schema does not name: unknown types, missing or
extra fields, wrong types, values over their bound, ext types.  The unpacker's
own limits stop huge containers before they are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from palm_net.channel.records import MAX_PLAINTEXT
from palm_net.wire.errors import ProtocolError

WIRE_VERSION = 1
MID_LEN = 16
MAX_SEQ = 2**63 - 1
PAGE_SIZE = 4096
PAGE_SHIFT = 12
# Up to this many page entries in one PAGES message (zero pages are 17 bytes each).
MAX_PAGES_PER_MESSAGE = 2048
# Largest guest we accept: 2**28 pages = 1 TiB.
MAX_GUEST_PAGES = 2**28
MAX_BLOB = MAX_PLAINTEXT - 256  # room for the envelope around one bin field
MAX_SPEC = 4096
PAGE_BACKENDS = frozenset({"model"})
STREAM_BACKENDS = frozenset({"qemu"})


@dataclass(frozen=True)
class Field:
    kind: type  # int, bytes, str, bool
    max: int  # max value for int, max length for bytes/str
    min: int = 0
    exact: int | None = None  # exact length for bytes


def U(max_value: int = MAX_SEQ) -> Field:
    return Field(int, max_value)


def B(max_len: int, exact: int | None = None) -> Field:
    return Field(bytes, max_len, exact=exact)


def S(max_len: int) -> Field:
    return Field(str, max_len)


BOOL = Field(bool, 1)

SCHEMAS: dict[str, dict[str, Field]] = {
    # source -> destination: open a migration
    "BEGIN": {
        "vm": S(64),
        "vm_id": B(16, exact=16),
        "pages": U(MAX_GUEST_PAGES),
        "protected_pages": U(MAX_GUEST_PAGES),
        "processes": U(4096),
        "vcpus": U(256),
        "plain": BOOL,
        "digest": BOOL,  # ask the destination for its memory digest in READY
        "backend": S(16),  # "model": page records; "qemu": the hypervisor's own stream
        "spec": B(MAX_SPEC),  # the machine to start for a stream backend (empty for "model")
    },
    "ACCEPT": {},
    # page records: parallel arrays (gfn u64 LE, kind u8, version u64 LE) + data
    "PAGES": {
        "round": U(10_000),
        "gfns": B(8 * MAX_PAGES_PER_MESSAGE),
        "kinds": B(MAX_PAGES_PER_MESSAGE),
        "vers": B(8 * MAX_PAGES_PER_MESSAGE),
        "data": B(MAX_BLOB),
        "tags": B(16 * 16),  # MACs of the protected pages, in order (at most 15 data pages fit)
    },
    # process keys and layout, before the first page (verifies protected pages on arrival)
    "KEYS": {"data": B(MAX_BLOB)},
    # stream backends: the hypervisor's own migration stream, in order, then its length
    "STREAM": {"data": B(MAX_BLOB)},
    "STREAM_END": {"bytes": U()},
    "ROUND_END": {"round": U(10_000), "pages": U(MAX_GUEST_PAGES * 64), "dirty": U(MAX_GUEST_PAGES)},
    "CPU_STATE": {"state": B(MAX_BLOB)},
    "CONTEXT": {"index": U(2**20), "total": U(2**20), "data": B(MAX_BLOB)},
    "COMPLETE": {"records": U(), "page_records": U(), "transcript": B(32, exact=32)},
    "READY": {"digest": B(32)},  # empty unless BEGIN asked for it
    "COMMIT": {},
    "DONE": {},
    "ABORT": {"code": S(64), "reason": S(512), "token": B(256)},
    # a new RECOVERY session: the in-doubt source asks for the outcome
    "QUERY": {},
    "OUTCOME": {"outcome": S(16), "token": B(256)},
}

ENVELOPE = {"v", "t", "mid", "seq", "b"}


@dataclass(frozen=True)
class Message:
    type: str
    mid: bytes
    seq: int
    body: Mapping[str, Any]

    def __repr__(self) -> str:
        # Bodies may hold ciphertext, blobs or state: never print them.
        return f"Message({self.type}, mid={self.mid.hex()[:8]}, seq={self.seq})"


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("malformed", "msgpack ext types are not allowed")


def _check(name: str, value: Any, f: Field, where: str) -> None:
    if f.kind is int:
        ok = type(value) is int and f.min <= value <= f.max
    elif f.kind is bool:
        ok = type(value) is bool
    else:
        # Text from a peer reaches logs and terminals: printable only (no
        # control characters, newlines, escapes or bidi overrides).
        ok = (isinstance(value, (bytes, str)) and type(value) is f.kind and len(value) <= f.max
              and (f.exact is None or len(value) == f.exact)
              and (not isinstance(value, str) or value.isprintable()))
    if not ok:
        raise ProtocolError("malformed", f"{where}: field {name!r} has a wrong type or is out of bounds")


def encode(msg: Message) -> bytes:
    out: bytes = msgpack.packb({"v": WIRE_VERSION, "t": msg.type, "mid": msg.mid, "seq": msg.seq,
                                "b": dict(msg.body)}, use_bin_type=True)
    return out


def decode(data: bytes) -> Message:
    """Strict decode of one message; any deviation is a ProtocolError."""
    if len(data) > MAX_PLAINTEXT:
        raise ProtocolError("oversize", "message larger than a record")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_bin_len=MAX_PLAINTEXT, max_str_len=1024, max_array_len=0, max_map_len=16,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError("malformed", f"not a msgpack message ({type(exc).__name__})") from None
    if type(obj) is not dict or set(obj) != ENVELOPE:
        raise ProtocolError("malformed", "envelope must have exactly v, t, mid, seq, b")
    if obj["v"] != WIRE_VERSION or type(obj["v"]) is not int:
        raise ProtocolError("version", f"message version {obj['v']!r} not supported")
    mtype = obj["t"]
    if type(mtype) is not str or mtype not in SCHEMAS:
        raise ProtocolError("unknown-type", f"unknown message type {str(mtype)[:32]!r}")
    _check("mid", obj["mid"], B(MID_LEN, exact=MID_LEN), mtype)
    _check("seq", obj["seq"], U(), mtype)
    body = obj["b"]
    schema = SCHEMAS[mtype]
    if type(body) is not dict or set(body) != set(schema):
        raise ProtocolError("malformed", f"{mtype}: body fields must be exactly {sorted(schema)}")
    for name, f in schema.items():
        _check(name, body[name], f, mtype)
    return Message(mtype, obj["mid"], obj["seq"], body)
