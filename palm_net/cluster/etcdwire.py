"""etcd v3 over its JSON gateway, sans-IO: the values, the request bodies and the
parsing of what the gateway answers.

The gateway (``/v3/...`` on every client URL of etcd 3.4 and later) maps the
gRPC API to JSON: keys and values are base64, 64-bit integers are decimal
strings, zero values are left out, and a streaming call (watch, lease
keep-alive) answers with one JSON object per line, each wrapped as
``{"result": ...}`` or ``{"error": ...}``.  Everything here is pure: the trio
client (:mod:`palm_net.cluster.etcd`) does the I/O.  Anything the server sends
is checked for type and bounded in size before use; a malformed answer raises
:class:`EtcdError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from palm_net import jsonlines

# gRPC status codes the client treats specially (google.rpc.Code).
CODE_INVALID_ARGUMENT = 3  # etcd: also "authentication failed", "user name is empty", "auth store is old"
CODE_NOT_FOUND = 5
CODE_PERMISSION_DENIED = 7  # etcd auth: the user's roles do not grant that key
CODE_FAILED_PRECONDITION = 9  # etcd: also "authentication is not enabled", "already exists"
CODE_OUT_OF_RANGE = 11  # etcd: "required revision has been compacted"
CODE_UNAVAILABLE = 14  # etcd: no leader, leader changed, request timed out
CODE_UNAUTHENTICATED = 16  # etcd auth: "invalid auth token" (expired, or its member restarted)

_INT64_MAX = (1 << 63) - 1
_DECIMAL = re.compile(r"-?[0-9]{1,19}")


class EtcdError(Exception):
    """An etcd call failed; the message is one line.

    ``indeterminate`` is set when a write may or may not have been applied
    (the connection broke after the request was sent): the caller must read
    the key to learn the outcome.  ``compact_revision`` is set when a watch or
    a read asked for history etcd has compacted away: the caller must read
    afresh and watch from there.  ``code`` is etcd's gRPC status code, or 0.
    """

    def __init__(self, message: str, *, indeterminate: bool = False, compact_revision: int = 0,
                 code: int = 0) -> None:
        super().__init__(" ".join(message.split()))
        self.indeterminate = indeterminate
        self.compact_revision = compact_revision
        self.code = code


# --------------------------------------------------------------------- values

@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    kvs: tuple[KeyValue, ...]
    revision: int  # the store revision the read was served at
    more: bool = False
    count: int = 0


@dataclass(frozen=True)
class Event:
    """One change: for a delete, ``kv`` has the key, an empty value and the
    deleting revision as ``mod_revision``."""

    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """The events of one or more whole revisions, in revision order."""

    revision: int  # the watch has seen everything up to and including this revision
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # seconds, as granted by etcd


CompareOp = Literal["==", "!=", "<", ">"]
_RESULT = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}
_TARGET = {"value": ("VALUE", "value"), "mod": ("MOD", "mod_revision"), "version": ("VERSION", "version"),
           "create": ("CREATE", "create_revision")}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction; build with the class methods."""

    key: bytes
    target: Literal["value", "mod", "version", "create"]
    op: CompareOp
    operand: bytes | int

    @classmethod
    def value(cls, key: bytes, op: CompareOp, value: bytes) -> Compare:
        return cls(_check_key(key), "value", _check_op(op), bytes(value))

    @classmethod
    def mod_revision(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        """``mod_revision(k, "==", 0)`` holds when ``k`` does not exist."""
        return cls(_check_key(key), "mod", _check_op(op), _check_int(revision, "revision"))

    @classmethod
    def version(cls, key: bytes, op: CompareOp, version: int) -> Compare:
        """``version(k, "==", 0)`` holds when ``k`` does not exist."""
        return cls(_check_key(key), "version", _check_op(op), _check_int(version, "version"))

    @classmethod
    def create_revision(cls, key: bytes, op: CompareOp, revision: int) -> Compare:
        return cls(_check_key(key), "create", _check_op(op), _check_int(revision, "revision"))


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: bytes
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: bytes
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True)
class OpResult:
    """What one operation of a transaction returned: ``kvs`` for a Get,
    ``deleted`` for a Delete, nothing for a Put."""

    kvs: tuple[KeyValue, ...] = ()
    deleted: int = 0


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool  # whether every comparison held (the success branch ran)
    revision: int
    results: tuple[OpResult, ...]


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or not key:
        raise EtcdError("an etcd key must be non-empty bytes")
    return key


def _check_op(op: str) -> CompareOp:
    if op not in _RESULT:
        raise EtcdError(f"unknown comparison {op!r} (==, !=, <, >)")
    return op  # type: ignore[return-value]


def _check_int(v: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _INT64_MAX:
        raise EtcdError(f"{what} must be an integer from 0 to 2**63-1")
    return v


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\x00"  # with key "\0": the whole key space
    p[-1] += 1
    return bytes(p)


# ------------------------------------------------------------------- requests

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _range_fields(key: bytes, prefix: bool) -> dict[str, Any]:
    if prefix:
        return {"key": _b64(key or b"\x00"), "range_end": _b64(prefix_end(key))}
    return {"key": _b64(_check_key(key))}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def range_request(key: bytes, *, prefix: bool = False, range_end: bytes = b"", revision: int = 0,
                  limit: int = 0) -> dict[str, Any]:
    """A read of ``key``, of every key under the prefix ``key``, or of [key, range_end)."""
    body = _range_fields(key, prefix)
    if range_end:
        body["range_end"] = _b64(range_end)
    if revision:
        body["revision"] = str(_check_int(revision, "revision"))
    if limit:
        body["limit"] = str(_check_int(limit, "limit"))
    return body


def put_request(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(_check_key(key)), "value": _b64(value)}
    if lease:
        body["lease"] = str(_check_int(lease, "lease"))
    return body


def delete_request(key: bytes, *, prefix: bool = False) -> dict[str, Any]:
    return _range_fields(key, prefix)


def _compare_json(c: Compare) -> dict[str, Any]:
    target, field = _TARGET[c.target]
    operand: str = _b64(c.operand) if isinstance(c.operand, bytes) else str(c.operand)
    return {"key": _b64(c.key), "target": target, "result": _RESULT[c.op], field: operand}


def _op_json(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        return {"request_put": put_request(op.key, op.value, op.lease)}
    if isinstance(op, Delete):
        return {"request_delete_range": delete_request(op.key, prefix=op.prefix)}
    if isinstance(op, Get):
        return {"request_range": range_request(op.key, prefix=op.prefix)}
    raise EtcdError(f"not a transaction operation: {type(op).__name__}")


def txn_request(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> dict[str, Any]:
    return {"compare": [_compare_json(c) for c in compare], "success": [_op_json(o) for o in success],
            "failure": [_op_json(o) for o in failure]}


def watch_create_request(key: bytes, *, prefix: bool, start_revision: int) -> dict[str, Any]:
    req = _range_fields(key, prefix)
    if start_revision:
        req["start_revision"] = str(_check_int(start_revision, "revision"))
    req["progress_notify"] = True  # lets a quiet watch learn the revision it may resume from
    return {"create_request": req}


# -------------------------------------------------------------------- answers

def _obj(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise EtcdError(f"etcd sent a malformed answer: {what} is not an object")
    return v


def _list(d: dict[str, Any], name: str) -> list[Any]:
    v = d.get(name, [])
    if not isinstance(v, list):
        raise EtcdError(f"etcd sent a malformed answer: {name} is not a list")
    return v


def _int(d: dict[str, Any], name: str) -> int:
    v = d.get(name, 0)
    if isinstance(v, str) and _DECIMAL.fullmatch(v):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not -_INT64_MAX - 1 <= v <= _INT64_MAX:
        raise EtcdError(f"etcd sent a malformed answer: {name} is not a 64-bit integer")
    return v


def _bool(d: dict[str, Any], name: str) -> bool:
    v = d.get(name, False)
    if not isinstance(v, bool):
        raise EtcdError(f"etcd sent a malformed answer: {name} is not a boolean")
    return v


def _bytes(d: dict[str, Any], name: str) -> bytes:
    v = d.get(name, "")
    if not isinstance(v, str):
        raise EtcdError(f"etcd sent a malformed answer: {name} is not base64 text")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdError(f"etcd sent a malformed answer: {name} is not base64") from None


def _str(d: dict[str, Any], name: str) -> str:
    v = d.get(name, "")
    return v if isinstance(v, str) else ""


def header_revision(body: dict[str, Any]) -> int:
    return _int(_obj(body.get("header", {}), "header"), "revision")


def parse_kv(v: object) -> KeyValue:
    d = _obj(v, "kv")
    return KeyValue(key=_bytes(d, "key"), value=_bytes(d, "value"), create_revision=_int(d, "create_revision"),
                    mod_revision=_int(d, "mod_revision"), version=_int(d, "version"), lease=_int(d, "lease"))


def parse_range(body: dict[str, Any]) -> RangeResult:
    kvs = tuple(parse_kv(kv) for kv in _list(body, "kvs"))
    return RangeResult(kvs=kvs, revision=header_revision(body), more=_bool(body, "more"), count=_int(body, "count"))


def parse_txn(body: dict[str, Any]) -> TxnResult:
    results: list[OpResult] = []
    for r in _list(body, "responses"):
        r = _obj(r, "txn response")
        if "response_range" in r:
            results.append(OpResult(kvs=parse_range(_obj(r["response_range"], "response_range")).kvs))
        elif "response_delete_range" in r:
            results.append(OpResult(deleted=_int(_obj(r["response_delete_range"], "response"), "deleted")))
        elif "response_put" in r:
            results.append(OpResult())
        else:
            raise EtcdError("etcd sent a malformed answer: unknown transaction response")
    return TxnResult(succeeded=_bool(body, "succeeded"), revision=header_revision(body), results=tuple(results))


def parse_deleted(body: dict[str, Any]) -> int:
    return _int(body, "deleted")


def parse_lease(body: dict[str, Any]) -> Lease:
    if _str(body, "error"):
        raise EtcdError(f"etcd lease grant: {_str(body, 'error')}")
    return Lease(id=_int(body, "ID"), ttl=_int(body, "TTL"))


def parse_keepalive(body: dict[str, Any]) -> int:
    """The lease's remaining TTL in seconds; 0 or less when the lease is gone."""
    return _int(body, "TTL")


def stream_result(message: dict[str, Any]) -> dict[str, Any]:
    """Unwraps one message of a streaming call; raises on ``{"error": ...}``."""
    if "error" in message:
        err = message["error"]
        if isinstance(err, dict):
            raise error_from(err, "etcd stream")
        raise EtcdError(f"etcd stream: {err if isinstance(err, str) else 'error'}")
    return _obj(message.get("result"), "result")


def error_from(body: dict[str, Any], context: str, status: int = 0) -> EtcdError:
    """The error of a non-200 answer (3.4 sends error, message, code; 3.5 message, code;
    a stream error nests grpc_code)."""
    msg = _str(body, "message") or _str(body, "error") or (f"HTTP status {status}" if status else "error")
    try:
        code = _int(body, "code") or _int(body, "grpc_code")
    except EtcdError:
        code = 0
    return EtcdError(f"{context}: {msg[:300]} (code {code})", code=code)


@dataclass(frozen=True)
class WatchMessage:
    """One parsed watch response."""

    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    revision: int  # header revision
    events: tuple[Event, ...]


def parse_watch(message: dict[str, Any]) -> WatchMessage:
    r = stream_result(message)
    events: list[Event] = []
    for e in _list(r, "events"):
        e = _obj(e, "event")
        kind = e.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise EtcdError("etcd sent a malformed answer: unknown event type")
        events.append(Event(type="put" if kind == "PUT" else "delete", kv=parse_kv(e.get("kv", {}))))
    return WatchMessage(created=_bool(r, "created"), canceled=_bool(r, "canceled"),
                        compact_revision=_int(r, "compact_revision"), cancel_reason=_str(r, "cancel_reason")[:300],
                        revision=header_revision(r), events=tuple(events))


def parse_json(data: bytes, context: str) -> dict[str, Any]:
    try:
        v = json.loads(data)
    except (ValueError, RecursionError):
        raise EtcdError(f"{context}: etcd sent a malformed answer: not JSON") from None
    return _obj(v, "answer")


class JsonLines:
    """The gateway's streamed body, a JSON message a line, each at most ``limit``
    bytes (palm_net.jsonlines, its errors as EtcdError)."""

    def __init__(self, limit: int) -> None:
        self._lines = jsonlines.JsonLines(limit)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._lines.feed(data)
        out: list[dict[str, Any]] = []
        with _as_etcd_error():
            while (obj := self._lines.next()) is not None:
                out.append(obj)
        return out

    def __len__(self) -> int:
        return len(self._lines)

    def finish(self) -> list[dict[str, Any]]:
        """Whatever the stream's end completes (the last line may lack its newline)."""
        with _as_etcd_error():
            last = self._lines.finish()
        return [] if last is None else [last]


@contextlib.contextmanager
def _as_etcd_error() -> Iterator[None]:
    try:
        yield
    except jsonlines.LineError as exc:
        raise EtcdError(f"etcd stream: etcd sent a malformed answer: {exc}") from None
