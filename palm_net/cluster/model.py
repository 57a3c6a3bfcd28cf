"""What the cluster keeps in etcd: the key layout and the records, sans-IO.

etcd is a store every agent and operator of the cluster shares, so what is
read from it is data, never trusted code or unbounded input: every value is
JSON of at most ``MAX_VALUE`` bytes, decoded into a frozen record whose every
field is checked (names as agent names are, hex of the right length, numbers
in range, printable text of bounded length).  A value that fails is
``RecordError``: the reader skips it and says so, as it would a value it
cannot parse.

Layout under a prefix (default ``/palm/``)::

    agents/NAME          AgentRecord       the agent, under its lease (gone when it stops or dies)
    vms/VM_ID            VmRecord          where a VM runs, following the handoff (CAS only)
    known/NAME           KnownAgent        an agent that once registered under this name (no lease)
    config/revoked/NAME  signed policy     an agent every agent refuses (palm_net.cluster.policy, proto 10)
    config/allowlist     signed policy     the measurements agents accept (absent: each agent's own list)
    drain/NAME           signed policy     a DrainRequest: the host is draining, nothing new is placed on it
    drain-status/NAME    DrainStatus       the drain's progress, written by the drained agent
    slots/I              Slot              one of the cluster's concurrent drain migrations (under a lease)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from palm_net.crypto.identity import validate_name

MAX_VALUE = 64 * 1024  # one record
MAX_TEXT = 512
MAX_DRAIN_VMS = 4096
MAX_MIGRATING = 64
MAX_ALLOWLIST = 256
MAX_SLOTS = 100
ROLES = ("source", "destination")
VM_STATES = ("running", "paused", "incoming", "dead", "stopped", "unknown")
BACKENDS = ("model", "qemu")


class RecordError(ValueError):
    """A value read from etcd is not a valid record (one line)."""


# ------------------------------------------------------------------ the keys


class Keys:
    """Where everything is, under one prefix (``--etcd-prefix``)."""

    def __init__(self, prefix: str = "/palm/") -> None:
        if (not prefix.startswith("/") or not prefix.endswith("/") or not 2 <= len(prefix) <= 64
                or not all(c.isascii() and (c.isalnum() or c in "/-_.") for c in prefix) or "//" in prefix):
            raise ValueError(f"bad etcd prefix {prefix!r}: /NAME/ of at most 64 ASCII letters, digits, - _ . /")
        self.prefix = prefix
        self.agents = (prefix + "agents/").encode()
        self.known = (prefix + "known/").encode()
        self.vms = (prefix + "vms/").encode()
        self.config = (prefix + "config/").encode()
        self.revoked = (prefix + "config/revoked/").encode()
        self.allowlist = (prefix + "config/allowlist").encode()
        self.drains = (prefix + "drain/").encode()
        self.drain_statuses = (prefix + "drain-status/").encode()
        self.slots = (prefix + "slots/").encode()

    @staticmethod
    def _named(base: bytes, name: str) -> bytes:
        validate_name(name)
        return base + name.encode()

    def agent(self, name: str) -> bytes:
        return self._named(self.agents, name)

    def known_agent(self, name: str) -> bytes:
        return self._named(self.known, name)

    def vm(self, vm_id: str) -> bytes:
        return self.vms + _hex_text(vm_id, 16, "vm_id").encode()

    def revocation(self, name: str) -> bytes:
        return self._named(self.revoked, name)

    def drain(self, name: str) -> bytes:
        return self._named(self.drains, name)

    def drain_status(self, name: str) -> bytes:
        return self._named(self.drain_statuses, name)

    def slot(self, i: int) -> bytes:
        if not 0 <= i < MAX_SLOTS:
            raise ValueError("slot out of range")
        return self.slots + str(i).encode()

    @staticmethod
    def tail(base: bytes, key: bytes) -> str:
        """The name a key ends with (RecordError if it is not under ``base`` or not a name)."""
        if not key.startswith(base):
            raise RecordError("key outside its prefix")
        try:
            name = key[len(base):].decode("ascii")
            validate_name(name)
        except (UnicodeDecodeError, ValueError):
            raise RecordError(f"bad name in key {key[:100]!r}") from None
        return name


# ------------------------------------------------------------------ checking


def _load(value: bytes, what: str) -> dict[str, Any]:
    if len(value) > MAX_VALUE:
        raise RecordError(f"{what}: {len(value)} bytes, over the limit of {MAX_VALUE}")
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError):
        raise RecordError(f"{what}: not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise RecordError(f"{what}: not a version 1 record")
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    data = json.dumps({"v": 1, **obj}, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_VALUE:
        raise RecordError(f"record of {len(data)} bytes over the limit of {MAX_VALUE}")
    return data


def _get(d: dict[str, Any], key: str, what: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise RecordError(f"{what}: no {key!r}")
        return default
    return d[key]


def _name(d: dict[str, Any], key: str, what: str, default: Any = ...) -> str:
    v = _get(d, key, what, default)
    if v == default and default is not ...:
        return str(v)
    if not isinstance(v, str):
        raise RecordError(f"{what}: {key} is not text")
    try:
        validate_name(v)
    except ValueError:
        raise RecordError(f"{what}: {key} is not an agent or VM name") from None
    return v


def _text(d: dict[str, Any], key: str, what: str, default: Any = ..., limit: int = MAX_TEXT) -> str:
    v = _get(d, key, what, default)
    if not isinstance(v, str) or len(v) > limit or not v.isprintable():
        raise RecordError(f"{what}: {key} is not printable text of at most {limit} characters")
    return v


def _hex_text(v: object, nbytes: int, what: str, empty: bool = False) -> str:
    if not isinstance(v, str) or not (len(v) == 2 * nbytes or (empty and v == "")):
        raise RecordError(f"{what} is not {2 * nbytes} hex digits")
    if v and not all(c in "0123456789abcdef" for c in v):
        raise RecordError(f"{what} is not lower-case hex")
    return v


def _hex(d: dict[str, Any], key: str, what: str, nbytes: int, empty: bool = False, default: Any = ...) -> str:
    return _hex_text(_get(d, key, what, default), nbytes, f"{what}: {key}", empty)


def _int(d: dict[str, Any], key: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1, default: Any = ...) -> int:
    v = _get(d, key, what, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RecordError(f"{what}: {key} is not an integer from {lo} to {hi}")
    return v


def _num(d: dict[str, Any], key: str, what: str, lo: float = 0.0, hi: float = 1e12, default: Any = ...) -> float:
    v = _get(d, key, what, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise RecordError(f"{what}: {key} is not a number from {lo:g} to {hi:g}")
    return float(v)


def _bool(d: dict[str, Any], key: str, what: str, default: Any = ...) -> bool:
    v = _get(d, key, what, default)
    if not isinstance(v, bool):
        raise RecordError(f"{what}: {key} is not true or false")
    return v


def _list(d: dict[str, Any], key: str, what: str, limit: int, default: Any = ...) -> list[Any]:
    v = _get(d, key, what, default)
    if not isinstance(v, list) or len(v) > limit:
        raise RecordError(f"{what}: {key} is not a list of at most {limit}")
    return v


def _one_of(d: dict[str, Any], key: str, what: str, allowed: tuple[str, ...], default: Any = ...) -> str:
    v = _get(d, key, what, default)
    if v not in allowed:
        raise RecordError(f"{what}: {key} is not one of {', '.join(allowed)}")
    return str(v)


def _addr(d: dict[str, Any], key: str, what: str) -> str:
    v = _text(d, key, what, limit=300)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise RecordError(f"{what}: {key} is not HOST:PORT")
    return v


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class Outgoing:
    """A migration out of an agent, as its agent publishes it."""

    mid: str
    vm: str
    to: str  # the destination's address (and name once the handshake named it)
    phase: str
    started: float

    @classmethod
    def parse(cls, d: object, what: str) -> Outgoing:
        if not isinstance(d, dict):
            raise RecordError(f"{what}: a migration is not an object")
        return cls(_hex(d, "mid", what, 16), _name(d, "vm", what), _text(d, "to", what, limit=300),
                   _text(d, "phase", what, limit=32), _num(d, "started", what, hi=1e11))


@dataclass(frozen=True)
class AgentRecord:
    """An agent, as it publishes itself under its lease."""

    name: str
    addr: str  # where other agents reach it (HOST:PORT)
    measurement: str  # hex
    static_pub: str  # hex: its Noise static key
    roles: tuple[str, ...]
    capacity: int  # bytes of guest memory this host offers
    free: int  # bytes of guest memory still free
    vms: int
    version: str
    started: float
    lists_revision: int = 0  # the revocations and allowlist it enforces, as of this etcd revision
    accepting: bool = True
    in_doubt: int = 0
    conflicts: int = 0  # VM records it would take over and another agent also claims
    migrating: tuple[Outgoing, ...] = ()

    def encode(self) -> bytes:
        d = asdict(self)
        d["roles"] = list(self.roles)
        d["migrating"] = [asdict(m) for m in self.migrating]
        return _dump(d)

    @classmethod
    def decode(cls, value: bytes) -> AgentRecord:
        w = "agent record"
        d = _load(value, w)
        roles = _list(d, "roles", w, 2)
        if not all(r in ROLES for r in roles):
            raise RecordError(f"{w}: unknown role")
        name = _name(d, "name", w)
        w = f"agent record {name}"
        return cls(name, _addr(d, "addr", w), _hex(d, "measurement", w, 32), _hex(d, "static_pub", w, 32),
                   tuple(roles), _int(d, "capacity", w), _int(d, "free", w), _int(d, "vms", w, hi=1 << 20),
                   _text(d, "version", w, limit=64), _num(d, "started", w, hi=1e11),
                   _int(d, "lists_revision", w, default=0), _bool(d, "accepting", w, default=True),
                   _int(d, "in_doubt", w, hi=1 << 20, default=0), _int(d, "conflicts", w, hi=1 << 20, default=0),
                   tuple(Outgoing.parse(m, w) for m in _list(d, "migrating", w, MAX_MIGRATING, default=[])))


@dataclass(frozen=True)
class VmRecord:
    """Where a VM runs, as the cluster record says (it follows the handoff, proto 7.5;
    it never decides anything).  ``migration`` is the id of the migration that put
    it on ``agent`` ("" when it was made there, or that is not known)."""

    vm_id: str
    name: str
    agent: str
    migration: str = ""
    memory: int = 0
    backend: str = "model"
    policy: str = "any"
    state: str = "running"

    def encode(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> VmRecord:
        w = "VM record"
        d = _load(value, w)
        return cls(_hex(d, "vm_id", w, 16), _name(d, "name", w), _name(d, "agent", w),
                   _hex(d, "migration", w, 16, empty=True, default=""), _int(d, "memory", w, hi=1 << 50),
                   _one_of(d, "backend", w, BACKENDS), _text(d, "policy", w, limit=256),
                   _one_of(d, "state", w, VM_STATES))


@dataclass(frozen=True)
class KnownAgent:
    """An agent that once registered under this name (kept after it leaves: `palm cluster
    revoke` refuses a name no agent ever had, and names the keys it had)."""

    name: str
    static_pub: str  # hex
    at: float  # when it last registered

    def encode(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> KnownAgent:
        w = "known agent"
        d = _load(value, w)
        return cls(_name(d, "name", w), _hex(d, "static_pub", w, 32), _num(d, "at", w, hi=1e11))


@dataclass(frozen=True)
class DrainOptions:
    """KubeVirt's defaults: 5 migrations in the cluster, 2 out of one node, 150 s per
    GiB to complete, 150 s without progress."""

    max_cluster: int = 5
    max_source: int = 2
    per_gib: float = 150.0  # completion timeout: this many seconds per GiB of guest memory (at least 60 s)
    progress_timeout: float = 150.0  # cancelled when no byte went out for this long (before the handoff only)
    attempts: int = 3  # tries per VM (another destination each time where there is one)
    bandwidth: int = 0  # bytes a second per migration (0: no cap)

    def check(self) -> DrainOptions:
        if not (1 <= self.max_cluster <= MAX_SLOTS and 1 <= self.max_source <= MAX_SLOTS
                and 0 < self.per_gib <= 1e6 and 0 < self.progress_timeout <= 1e6 and 1 <= self.attempts <= 100
                and 0 <= self.bandwidth <= 1 << 40):
            raise ValueError("drain limits: max_cluster and max_source 1..100, timeouts positive, attempts 1..100, "
                             "bandwidth up to 1 TiB/s")
        return self


@dataclass(frozen=True)
class DrainRequest:
    """The operator's request that a host be evacuated; while it exists the host
    is draining and nothing new is placed on it."""

    id: str  # hex, one per `palm cluster drain` run that started it
    at: float
    by: str = ""
    options: DrainOptions = field(default_factory=DrainOptions)
    stop: bool = False  # start no more migrations (the mark stays)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "by": self.by, "options": asdict(self.options), "stop": self.stop}

    @classmethod
    def parse(cls, d: object, w: str = "drain request") -> DrainRequest:
        if not isinstance(d, dict):
            raise RecordError(f"{w}: not an object")
        o = _get(d, "options", w, {})
        if not isinstance(o, dict):
            raise RecordError(f"{w}: options is not an object")
        opts = DrainOptions(_int(o, "max_cluster", w, 1, MAX_SLOTS, 5), _int(o, "max_source", w, 1, MAX_SLOTS, 2),
                            _num(o, "per_gib", w, 1e-3, 1e6, 150.0), _num(o, "progress_timeout", w, 1e-3, 1e6, 150.0),
                            _int(o, "attempts", w, 1, 100, 3), _int(o, "bandwidth", w, 0, 1 << 40, 0))
        # each field in its range: check() holds
        return cls(_hex(d, "id", w, 8), _num(d, "at", w, hi=1e11), _text(d, "by", w, default="", limit=128),
                   opts, _bool(d, "stop", w, default=False))


DRAIN_VM_STATES = ("waiting", "migrating", "moved", "failed", "unplaceable", "gone")
DRAIN_STATES = ("running", "done", "incomplete", "stopped")


@dataclass(frozen=True)
class DrainVm:
    state: str
    to: str = ""
    attempts: int = 0
    error: str = ""
    sent: int = 0  # bytes on the wire so far (the current attempt)
    memory: int = 0
    total_ms: float = 0.0
    downtime_ms: float = 0.0

    @classmethod
    def parse(cls, d: object, what: str) -> DrainVm:
        if not isinstance(d, dict):
            raise RecordError(f"{what}: a VM entry is not an object")
        return cls(_one_of(d, "state", what, DRAIN_VM_STATES), _text(d, "to", what, default="", limit=64),
                   _int(d, "attempts", what, hi=1000, default=0), _text(d, "error", what, default=""),
                   _int(d, "sent", what, default=0), _int(d, "memory", what, hi=1 << 50, default=0),
                   _num(d, "total_ms", what, default=0.0), _num(d, "downtime_ms", what, default=0.0))


@dataclass(frozen=True)
class DrainStatus:
    """What the drained agent reports: one entry per VM it had to move."""

    id: str
    host: str
    state: str
    started: float
    updated: float
    vms: dict[str, DrainVm]
    finished: float = 0.0
    max_parallel: int = 0  # the most migrations it had in flight at once
    note: str = ""

    def encode(self) -> bytes:
        return _dump({"id": self.id, "host": self.host, "state": self.state, "started": self.started,
                      "updated": self.updated, "finished": self.finished, "max_parallel": self.max_parallel,
                      "note": self.note, "vms": {k: asdict(v) for k, v in sorted(self.vms.items())}})

    @classmethod
    def decode(cls, value: bytes) -> DrainStatus:
        w = "drain status"
        d = _load(value, w)
        vms = _get(d, "vms", w)
        if not isinstance(vms, dict) or len(vms) > MAX_DRAIN_VMS:
            raise RecordError(f"{w}: vms is not an object of at most {MAX_DRAIN_VMS}")
        parsed = {}
        for k, v in vms.items():
            try:
                validate_name(k)
            except ValueError:
                raise RecordError(f"{w}: a VM name is not a name") from None
            parsed[k] = DrainVm.parse(v, w)
        return cls(_hex(d, "id", w, 8), _name(d, "host", w), _one_of(d, "state", w, DRAIN_STATES),
                   _num(d, "started", w, hi=1e11), _num(d, "updated", w, hi=1e11), parsed,
                   _num(d, "finished", w, hi=1e11, default=0.0), _int(d, "max_parallel", w, hi=1000, default=0),
                   _text(d, "note", w, default=""))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(DRAIN_VM_STATES, 0)
        for v in self.vms.values():
            out[v.state] += 1
        return out


@dataclass(frozen=True)
class Slot:
    agent: str
    vm: str
    at: float

    def encode(self) -> bytes:
        return _dump(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> Slot:
        w = "slot"
        d = _load(value, w)
        return cls(_name(d, "agent", w), _name(d, "vm", w), _num(d, "at", w, hi=1e11))
