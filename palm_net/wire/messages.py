"""Messages: one frozen class per type, strict msgpack on the wire (proto/PROTOCOL.md 6).

Every message is one record whose plaintext is ``{"v": 2, "t": TYPE, "mid":
bin16, "seq": uint, "b": {...}}``.  PAGES and STREAM announce bulk data
(``Body.bulk`` bytes), which follows in the next records as raw bytes, at
most DATA_RECORD bytes each (the data records: no envelope, so a receiver
can open them in place and hand them to the hypervisor without a copy).
Each message type is a frozen dataclass whose ``SCHEMA`` bounds every
field: making one that breaks its bounds is a ``LocalProtocolError``
(nothing is sent), decoding one a ``RemoteProtocolError`` (the peer broke
the protocol).  Decoding refuses anything the schema does not name: unknown
types, missing or extra fields, wrong types, values over their bound, ext
types, non-printable text; the unpacker's own limits stop huge containers
before they are built.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from palm_net.errors import ErrorCode, LocalProtocolError, PalmError, RemoteProtocolError

WIRE_VERSION = 2
MID_LEN = 16
MAX_SEQ = 2**63 - 1
# A record's plaintext: a Noise transport message (65535) less its tag (16).
MAX_PLAINTEXT = 65535 - 16
PAGE_SIZE = 4096
# A data record carries at most 15 whole pages: each page of a PAGES message's
# data then lies in one record, and the hypervisor takes it from there.
DATA_RECORD = 15 * PAGE_SIZE
# Up to this many page entries in one PAGES message, of which at most
# MAX_DATA_PAGES carry data (1 MiB: 18 data records).
MAX_PAGES_PER_MESSAGE = 2048
MAX_DATA_PAGES = 256
MAX_BULK = MAX_DATA_PAGES * PAGE_SIZE  # bulk data after one PAGES or STREAM message
# Largest guest we accept: 2**28 pages = 1 TiB.
MAX_GUEST_PAGES = 2**28
MAX_BLOB = MAX_PLAINTEXT - 256  # room for the envelope around one bin field
MAX_SPEC = 4096
# READY's and DONE's timings: two u32be microsecond counts, fixed in size so that a
# record's length says nothing of them.
TIMINGS_LEN = 8
MAX_TIMING_US = 2**32 - 1


def timings(first: float, second: float) -> bytes:
    """Two durations (seconds) as a timings field, each capped at MAX_TIMING_US."""
    return b"".join(min(max(0, round(s * 1e6)), MAX_TIMING_US).to_bytes(4, "big") for s in (first, second))


def timings_s(field: bytes) -> tuple[float, float]:
    """A timings field's two durations, in seconds."""
    return int.from_bytes(field[:4], "big") / 1e6, int.from_bytes(field[4:8], "big") / 1e6
# Channels (proto 7.8): a page migration may carry its pages on up to this many
# sessions, the main one (channel 0) and data sessions bound to it; each gfn has
# one channel (lane_of), so a page's versions travel in order on one session.
MAX_CHANNELS = 16
LANE_BLOCK = 256  # pages of a block that travels on one channel (1 MiB: one PAGES message's data)


def lane_of(gfns: Any, channels: int) -> Any:
    """The channel of each gfn: its block of LANE_BLOCK pages, modulo ``channels``."""
    return (gfns // LANE_BLOCK) % channels


PAGE_BACKENDS = frozenset({"model"})
STREAM_BACKENDS = frozenset({"qemu"})


@dataclass(frozen=True)
class Field:
    kind: type  # int, bytes, str, bool
    max: int  # max value for int, max length for bytes/str
    exact: int | None = None  # exact length for bytes
    choices: frozenset[str] | None = None  # the only values a str may take

    def ok(self, value: Any) -> bool:
        if self.kind is int:
            return type(value) is int and 0 <= value <= self.max
        if self.kind is bool:
            return type(value) is bool
        # Text from a peer reaches logs and terminals: printable only (no
        # control characters, newlines, escapes or bidi overrides).
        if type(value) is not self.kind:
            return False
        return (isinstance(value, (bytes, str)) and len(value) <= self.max
                and (self.exact is None or len(value) == self.exact)
                and (self.choices is None or value in self.choices)
                and (not isinstance(value, str) or value.isprintable()))


def uint(max_value: int = MAX_SEQ) -> Field:
    return Field(int, max_value)


def octets(max_len: int, exact: int | None = None) -> Field:
    return Field(bytes, max_len, exact=exact)


def text(max_len: int, choices: type[enum.StrEnum] | None = None) -> Field:
    return Field(str, max_len, choices=frozenset(c.value for c in choices) if choices is not None else None)


class RecoveryOutcome(enum.StrEnum):
    """What a destination answers a QUERY (proto 7.5)."""

    COMMITTED = "committed"
    ABORTED = "aborted"  # with the abort token
    UNKNOWN = "unknown"  # not this peer's to ask, or nothing recorded that could be promised
    POSTCOPY = "postcopy"  # the VM runs here and still misses pages: serve them (7.9)


BOOL = Field(bool, 1)


class Body:
    """A message type: a frozen dataclass with a ``TYPE`` and a ``SCHEMA`` of bounds."""

    TYPE: ClassVar[str]
    SCHEMA: ClassVar[dict[str, Field]]

    def __post_init__(self) -> None:
        for name, f in self.SCHEMA.items():
            if not f.ok(getattr(self, name)):
                raise LocalProtocolError(ErrorCode.MALFORMED,
                                         f"{self.TYPE}: field {name!r} has a wrong type or is out of bounds")
        if self.bulk > MAX_BULK:
            raise LocalProtocolError(ErrorCode.MALFORMED, f"{self.TYPE}: more than {MAX_BULK} bytes of data")

    @property
    def bulk(self) -> int:
        """Bytes of data the data records after this message carry."""
        return 0

    def __repr__(self) -> str:
        # Bodies may hold keys, ciphertext or state: never print a byte string.
        shown = ", ".join(f"{k}={v!r}" if not isinstance(v, bytes) else f"{k}=<{len(v)} bytes>"
                          for k, v in self.fields().items())
        return f"{type(self).__name__}({shown})"

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.SCHEMA}


@dataclass(frozen=True, repr=False)
class Begin(Body):
    """Source -> destination: open a migration (proto 7.1, 7.7)."""

    TYPE = "BEGIN"
    SCHEMA = {"vm": text(64), "vm_id": octets(16, exact=16), "pages": uint(MAX_GUEST_PAGES),
              "protected_pages": uint(MAX_GUEST_PAGES), "processes": uint(4096), "vcpus": uint(256), "plain": BOOL,
              "digest": BOOL, "backend": text(16), "spec": octets(MAX_SPEC)}
    vm: str
    vm_id: bytes
    pages: int
    protected_pages: int
    processes: int
    vcpus: int
    plain: bool
    digest: bool  # ask the destination for its memory digest in READY
    backend: str  # "model": page records; "qemu": the hypervisor's own stream
    spec: bytes  # the machine to start for a stream backend (empty for "model")


@dataclass(frozen=True, repr=False)
class Accept(Body):
    TYPE = "ACCEPT"
    SCHEMA: ClassVar[dict[str, Field]] = {}


@dataclass(frozen=True, repr=False)
class Keys(Body):
    """Process keys and layout, before the first page (proto 7.3)."""

    TYPE = "KEYS"
    SCHEMA = {"data": octets(MAX_BLOB)}
    data: bytes


@dataclass(frozen=True, repr=False)
class Pages(Body):
    """Page records: parallel arrays (gfn u64le, kind u8, version u64le) and the
    MACs of the protected pages (palm_net.wire.pages packs and checks them).
    The 4096 bytes of each non-zero page follow in data records."""

    TYPE = "PAGES"
    SCHEMA = {"round": uint(10_000), "gfns": octets(8 * MAX_PAGES_PER_MESSAGE), "kinds": octets(MAX_PAGES_PER_MESSAGE),
              "vers": octets(8 * MAX_PAGES_PER_MESSAGE), "tags": octets(16 * MAX_DATA_PAGES)}
    round: int
    gfns: bytes
    kinds: bytes
    vers: bytes
    tags: bytes  # the MAC of each protected page, in order

    @property
    def bulk(self) -> int:
        return PAGE_SIZE * (len(self.kinds) - self.kinds.count(0))  # bytes.count: C speed


@dataclass(frozen=True, repr=False)
class Stream(Body):
    """The next ``length`` bytes of a stream backend's own migration stream
    (proto 7.7), which follow in data records."""

    TYPE = "STREAM"
    SCHEMA = {"length": uint(MAX_BULK)}
    length: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.length == 0:
            raise LocalProtocolError(ErrorCode.MALFORMED, "STREAM: a length of at least 1")

    @property
    def bulk(self) -> int:
        return self.length


@dataclass(frozen=True, repr=False)
class StreamEnd(Body):
    TYPE = "STREAM_END"
    SCHEMA = {"bytes": uint()}
    bytes: int


@dataclass(frozen=True, repr=False)
class Channels(Body):
    """Source -> destination, main session, before the first page record: the pages
    travel on ``count`` channels, this session and count - 1 data sessions (proto 7.8)."""

    TYPE = "CHANNELS"
    SCHEMA = {"count": uint(MAX_CHANNELS)}
    count: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.count < 2:
            raise LocalProtocolError(ErrorCode.MALFORMED, "CHANNELS: a count of at least 2")


@dataclass(frozen=True, repr=False)
class Bind(Body):
    """Source -> destination, the first message of a DATA session: it is channel
    ``channel`` of the migration its envelope names (proto 7.8)."""

    TYPE = "BIND"
    SCHEMA = {"channel": uint(MAX_CHANNELS - 1), "count": uint(MAX_CHANNELS)}
    channel: int
    count: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.channel < self.count:
            raise LocalProtocolError(ErrorCode.MALFORMED, "BIND: a channel from 1 to count - 1")


@dataclass(frozen=True, repr=False)
class RoundEnd(Body):
    TYPE = "ROUND_END"
    SCHEMA = {"round": uint(10_000), "pages": uint(MAX_GUEST_PAGES * 64), "dirty": uint(MAX_GUEST_PAGES)}
    round: int
    pages: int
    dirty: int


@dataclass(frozen=True, repr=False)
class RoundDone(Body):
    """Destination -> source: every page of this round is written here (the source
    pauses its guest for the last copy only once the destination has caught up)."""

    TYPE = "ROUND_DONE"
    SCHEMA = {"round": uint(10_000)}
    round: int


@dataclass(frozen=True, repr=False)
class CpuState(Body):
    TYPE = "CPU_STATE"
    SCHEMA = {"state": octets(MAX_BLOB)}
    state: bytes


@dataclass(frozen=True, repr=False)
class Context(Body):
    """A chunk of the protected-context blob (proto 7.3)."""

    TYPE = "CONTEXT"
    SCHEMA = {"index": uint(2**20), "total": uint(2**20), "data": octets(MAX_BLOB)}
    index: int
    total: int
    data: bytes


@dataclass(frozen=True, repr=False)
class Complete(Body):
    TYPE = "COMPLETE"
    SCHEMA = {"records": uint(), "page_records": uint(), "transcript": octets(32, exact=32)}
    records: int
    page_records: int
    transcript: bytes


@dataclass(frozen=True, repr=False)
class Ready(Body):
    """Verified and durable.  ``timings``: the destination's own, for the record only
    (timings_us: the stream's end loaded, then PREPARE)."""

    TYPE = "READY"
    SCHEMA = {"digest": octets(32), "timings": octets(TIMINGS_LEN, exact=TIMINGS_LEN)}
    digest: bytes  # empty unless BEGIN asked for it
    timings: bytes = bytes(TIMINGS_LEN)


@dataclass(frozen=True, repr=False)
class Commit(Body):
    TYPE = "COMMIT"
    SCHEMA: ClassVar[dict[str, Field]] = {}


@dataclass(frozen=True, repr=False)
class Done(Body):
    """Committed and running.  ``timings``: the destination's own, for the record only
    (timings_us: the durable COMMIT, then the activation, QEMU's `cont`)."""

    TYPE = "DONE"
    SCHEMA = {"timings": octets(TIMINGS_LEN, exact=TIMINGS_LEN)}
    timings: bytes = bytes(TIMINGS_LEN)


@dataclass(frozen=True, repr=False)
class Abort(Body):
    TYPE = "ABORT"
    SCHEMA = {"code": text(64), "reason": text(512), "token": octets(256)}
    code: str  # an ErrorCode's value; a peer may send one this side does not know (error_code)
    reason: str
    token: bytes

    @property
    def error_code(self) -> ErrorCode:
        """The code as this side knows it; one it does not know is out-of-state."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.OUT_OF_STATE


@dataclass(frozen=True, repr=False)
class Query(Body):
    """A new RECOVERY session: the in-doubt source asks for the outcome."""

    TYPE = "QUERY"
    SCHEMA: ClassVar[dict[str, Field]] = {}


@dataclass(frozen=True, repr=False)
class Outcome(Body):
    TYPE = "OUTCOME"
    SCHEMA = {"outcome": text(16, RecoveryOutcome), "token": octets(256)}
    outcome: str  # a RecoveryOutcome (any other value is malformed)
    token: bytes


# -- post-copy (proto 7.9)

MAX_MISSING_BITMAP = 16384  # bytes of one MISSING's bitmap: 131072 pages (512 MiB of guest)
MAX_FETCH = 64  # gfns one FETCH asks for (a few vCPUs' faults)


@dataclass(frozen=True, repr=False)
class Missing(Body):
    """Source -> destination, at the switch to post-copy: pages that come later (a
    bitmap from ``base``; a normal page comes with version ``round``) and, for the
    protected ones among them (``gfns``), the version and MAC each will come with."""

    TYPE = "MISSING"
    SCHEMA = {"round": uint(10_000), "base": uint(MAX_GUEST_PAGES), "bitmap": octets(MAX_MISSING_BITMAP),
              "gfns": octets(8 * MAX_DATA_PAGES), "vers": octets(8 * MAX_DATA_PAGES),
              "tags": octets(16 * MAX_DATA_PAGES)}
    round: int
    base: int
    bitmap: bytes
    gfns: bytes
    vers: bytes
    tags: bytes


@dataclass(frozen=True, repr=False)
class Running(Body):
    """Destination -> source, the answer to a post-copy migration's COMMIT: PULLING is
    durable and the VM runs here; its pages still come from the source."""

    TYPE = "RUNNING"
    SCHEMA = {"timings": octets(TIMINGS_LEN, exact=TIMINGS_LEN)}
    timings: bytes = bytes(TIMINGS_LEN)


@dataclass(frozen=True, repr=False)
class Fetch(Body):
    """Destination -> source: pages a vCPU waits for, sent ahead of the rest."""

    TYPE = "FETCH"
    SCHEMA = {"gfns": octets(8 * MAX_FETCH)}
    gfns: bytes


@dataclass(frozen=True, repr=False)
class Want(Body):
    """Destination -> source, a recovery session: pages still missing here (``more``:
    another WANT follows)."""

    TYPE = "WANT"
    SCHEMA = {"round": uint(10_000), "gfns": octets(8 * MAX_PAGES_PER_MESSAGE), "more": BOOL}
    round: int  # the switch's (the serving phase's PAGES carry it)
    gfns: bytes
    more: bool


@dataclass(frozen=True, repr=False)
class Pulled(Body):
    """Destination -> source: every page is in and COMMITTED durable; ``digest``: the
    memory digest of what the migration wrote, if BEGIN asked."""

    TYPE = "PULLED"
    SCHEMA = {"digest": octets(32)}
    digest: bytes


TYPES: dict[str, type[Body]] = {cls.TYPE: cls for cls in (
    Begin, Accept, Keys, Pages, Stream, StreamEnd, RoundEnd, RoundDone, CpuState, Context, Complete, Ready, Commit,
    Done, Abort, Query, Outcome, Channels, Bind, Missing, Running, Fetch, Want, Pulled)}
ENVELOPE = {"v", "t", "mid", "seq", "b"}
_MID = octets(MID_LEN, exact=MID_LEN)
_SEQ = uint()
T = TypeVar("T", bound=Body)


@dataclass(frozen=True)
class Message:
    """One message on the wire: the migration id, its sequence number, its body."""

    mid: bytes
    seq: int
    body: Body

    def __repr__(self) -> str:
        return f"Message({self.body.TYPE}, mid={self.mid.hex()[:8]}, seq={self.seq})"

    @property
    def type(self) -> str:
        return self.body.TYPE

    def get(self, cls: builtins.type[T]) -> T:
        """The body as ``cls`` (an assertion of what the state machine already allowed)."""
        body = self.body
        if not isinstance(body, cls):
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"{self.type} is not {cls.TYPE}")
        return body


def encode(msg: Message) -> bytes:
    if not _MID.ok(msg.mid) or not _SEQ.ok(msg.seq):
        raise LocalProtocolError(ErrorCode.MALFORMED, "migration id or sequence number out of bounds")
    out: bytes = msgpack.packb({"v": WIRE_VERSION, "t": msg.body.TYPE, "mid": msg.mid, "seq": msg.seq,
                                "b": msg.body.fields()}, use_bin_type=True)
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(ErrorCode.MALFORMED, "msgpack ext types are not allowed")


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Strict decode of one message; any deviation is a RemoteProtocolError."""
    if len(data) > MAX_PLAINTEXT:
        raise RemoteProtocolError(ErrorCode.OVERSIZE, "message larger than a record")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_bin_len=MAX_PLAINTEXT, max_str_len=1024, max_array_len=0, max_map_len=16,
            max_ext_len=0,
        )
    except PalmError:
        raise
    except Exception as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"not a msgpack message ({type(exc).__name__})") from None
    if type(obj) is not dict or set(obj) != ENVELOPE:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "envelope must have exactly v, t, mid, seq, b")
    if type(obj["v"]) is not int or obj["v"] != WIRE_VERSION:
        raise RemoteProtocolError(ErrorCode.VERSION, "message version not supported")
    cls = TYPES.get(obj["t"]) if type(obj["t"]) is str else None
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_TYPE, "unknown message type")
    if not _MID.ok(obj["mid"]) or not _SEQ.ok(obj["seq"]):
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{cls.TYPE}: migration id or sequence out of bounds")
    body = obj["b"]
    if type(body) is not dict or set(body) != set(cls.SCHEMA):
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{cls.TYPE}: body fields must be exactly "
                                                       f"{sorted(cls.SCHEMA)}")
    try:
        return Message(obj["mid"], obj["seq"], cls(**body))
    except LocalProtocolError as exc:  # the bounds are the same: here the peer broke them
        raise RemoteProtocolError(exc.code, exc.detail) from None


def schema_fields_match(cls: type[Body]) -> bool:
    """Each class's dataclass fields are exactly its schema's, in order (a test checks every type)."""
    return [f.name for f in dataclasses.fields(cls)] == list(cls.SCHEMA)  # type: ignore[arg-type]
