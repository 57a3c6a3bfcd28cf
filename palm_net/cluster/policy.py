"""The cluster's policy, signed: revocations, the allowlist and drain requests (proto 10), sans-IO;
and what each agent says of itself (its record, its name), signed by its own key.

etcd is writable by every agent's credential, so what decides whom an agent
trusts cannot be whatever etcd holds.  Each policy value is a document signed
by the authority, or by an operator whose certificate the authority issued
with the ``operator`` role (``palm ca issue --role operator``; the authority's
key stays offline).  Each names its cluster, its kind and subject (the etcd
key it belongs under) and a serial that only grows.

An agent keeps, per (kind, subject), the highest document it verified
(``PolicyStore``, durable in its state directory) and takes from etcd only a
higher one: a deleted key, an older document, an unsigned or wrongly signed
one, or one signed by a certificate without the operator role changes
nothing (each refusal is counted).  Only a newer signed document lifts a
revocation or widens the allowlist.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from palm_net.cluster.gate import Lists
from palm_net.cluster.model import (
    MAX_ALLOWLIST,
    MAX_VALUE,
    AgentRecord,
    DrainRequest,
    Keys,
    KnownAgent,
    RecordError,
    VmRecord,
)
from palm_net.crypto.identity import (
    CA_KEY_FILE,
    CA_PUB_FILE,
    CERT_FILE,
    IDENTITY_FILE,
    OPERATOR_ROLE,
    AgentIdentity,
    AttestationError,
    Authority,
    Certificate,
    KeyFileError,
    load_authority_public,
    validate_name,
)
from palm_net.crypto.identity import (
    ROLES as AGENT_ROLES,
)
from palm_net.errors import ErrorCode
from palm_net.hostfs import UnsafePathError, read_nofollow

POLICY_VERSION = 1
POLICY_DOMAIN = b"palm-net/policy/v1\x00"
MAX_POLICY = 8192  # one document, the signer's certificate included
MAX_KEYS = 16  # static keys one revocation names
MAX_REVOCATIONS = 1024  # documents an agent keeps for revocations
MAX_SERIAL = (1 << 63) - 1
KINDS = ("revocation", "allowlist", "drain")
_COMMON = {"v", "kind", "cluster", "subject", "serial", "at", "by"}
_FIELDS = {"revocation": _COMMON | {"revoked", "keys", "reason"}, "allowlist": _COMMON | {"measurements"},
           "drain": _COMMON | {"request"}}


class PolicyError(RecordError):
    """A policy document or a signed record refused; ``reason`` is what is counted (one word)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"refused ({reason}): {detail}")


@dataclass(frozen=True)
class PolicyDoc:
    """One document's body.  ``revoked``/``keys``/``reason`` for a revocation,
    ``measurements`` for the allowlist (None: back to each agent's own list),
    ``request`` for a drain (None: the host is no longer draining)."""

    kind: str
    cluster: str  # the etcd prefix: a document of another cluster is refused
    subject: str  # the agent named (revocation, drain); "" for the allowlist
    serial: int
    at: int  # Unix seconds, when signed (informative)
    by: str = ""
    revoked: bool = False
    keys: tuple[bytes, ...] = ()  # the revoked agent's static keys
    reason: str = ""
    measurements: tuple[bytes, ...] | None = None
    request: DrainRequest | None = None
    signer: str = field(default="", compare=False)  # "authority" or "operator NAME", once verified
    raw: bytes = field(default=b"", repr=False, compare=False)  # the signed document as read

    def body(self) -> bytes:
        d: dict[str, Any] = {"v": POLICY_VERSION, "kind": self.kind, "cluster": self.cluster,
                             "subject": self.subject, "serial": self.serial, "at": self.at, "by": self.by}
        if self.kind == "revocation":
            d |= {"revoked": self.revoked, "keys": list(self.keys), "reason": self.reason}
        elif self.kind == "allowlist":
            d["measurements"] = None if self.measurements is None else list(self.measurements)
        else:
            d["request"] = None if self.request is None else self.request.to_dict()
        out: bytes = msgpack.packb(d)
        return out

    @property
    def restricts_only(self) -> bool:
        """A revocation in force: it can only deny service, so an expired operator's still counts."""
        return self.kind == "revocation" and self.revoked

    def key(self, keys: Keys) -> bytes:
        """Where it belongs in etcd."""
        if self.kind == "revocation":
            return keys.revocation(self.subject)
        if self.kind == "allowlist":
            return keys.allowlist
        return keys.drain(self.subject)


def next_serial(current: int) -> int:
    """Greater than ``current`` and than any serial issued before now: a document etcd lost
    is still superseded by the next one signed (agents keep the highest they saw)."""
    return min(MAX_SERIAL, max(current + 1, time.time_ns() // 1000))


# ------------------------------------------------------------------ signing


@dataclass(frozen=True, repr=False)
class Signer:
    """Who signs: the authority itself (``cert`` None) or an operator certified for the role."""

    key: SigningKey
    authority_pub: bytes
    cert: Certificate | None = None

    def __repr__(self) -> str:
        return f"Signer({self.name})"

    @property
    def name(self) -> str:
        return "authority" if self.cert is None else f"operator {self.cert.name}"

    @classmethod
    def load(cls, directory: Path) -> Signer:
        """The authority's directory (ca.key), or an operator's: identity.key, agent.cert issued
        with the operator role, and the authority's ca.pub (KeyFileError otherwise)."""
        if (directory / CA_KEY_FILE).exists():
            ca = Authority.load(directory)
            return cls(ca.signing, ca.public)
        for f in (IDENTITY_FILE, CERT_FILE, CA_PUB_FILE):
            if not (directory / f).exists():
                raise KeyFileError(f"{directory} holds neither the authority's ca.key nor an operator's {f} "
                                   f"(palm keygen, then palm ca issue --role operator --agent {directory})")
        ident = AgentIdentity.load(directory)
        authority_pub = load_authority_public(directory / CA_PUB_FILE)
        try:
            cert = Certificate.decode(read_nofollow(directory / CERT_FILE, 8192))
            cert.verify(authority_pub)
        except (AttestationError, OSError, UnsafePathError) as exc:
            raise KeyFileError(f"{directory / CERT_FILE}: {exc}") from None
        if OPERATOR_ROLE not in cert.roles or not hmac.compare_digest(cert.sign_pub, ident.sign_pub):
            raise KeyFileError(f"{directory / CERT_FILE} is not an operator's certificate for this identity "
                               "(palm ca issue --role operator)")
        return cls(ident.signing, authority_pub, cert)

    def sign(self, doc: PolicyDoc) -> PolicyDoc:
        body = doc.body()
        sig = self.key.sign(POLICY_DOMAIN + body).signature
        raw: bytes = msgpack.packb({"body": body, "sig": sig, "cert": b"" if self.cert is None else self.cert.encode()})
        if len(raw) > MAX_POLICY:
            raise ValueError(f"policy document of {len(raw)} bytes over the limit of {MAX_POLICY}")
        return replace(doc, signer=self.name, raw=raw)


# ------------------------------------------------------------------ verifying


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=MAX_POLICY, max_str_len=1024, max_array_len=MAX_ALLOWLIST,
                               max_map_len=16, strict_map_key=True)
    except Exception:
        raise PolicyError("malformed", f"{what} is not bounded msgpack") from None


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    v = d.get(key)
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise PolicyError("malformed", f"{what}: {key} missing or of the wrong type")
    return v


def _keys32(v: object, limit: int, what: str) -> tuple[bytes, ...]:
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(k, bytes) and len(k) == 32 for k in v):
        raise PolicyError("malformed", f"{what}: not a list of at most {limit} 32-byte values")
    return tuple(v)


def parse_body(body: bytes, cluster: str) -> PolicyDoc:
    """The body's fields, checked (no signature: see ``verify``)."""
    d = _unpack(body, "policy body")
    if not isinstance(d, dict) or d.get("v") != POLICY_VERSION or d.get("kind") not in KINDS:
        raise PolicyError("malformed", "not a version 1 policy body of a known kind")
    kind = d["kind"]
    if set(d) != _FIELDS[kind]:
        raise PolicyError("malformed", f"{kind}: fields are not {', '.join(sorted(_FIELDS[kind]))}")
    w = f"{kind} document"
    if _get(d, "cluster", str, w) != cluster:
        raise PolicyError("other-cluster", f"{w} is for the cluster {d['cluster'][:64]!r}, not {cluster!r}")
    subject = _get(d, "subject", str, w)
    try:
        if kind == "allowlist":
            if subject:
                raise ValueError("the allowlist has no subject")
        else:
            validate_name(subject)
    except ValueError as exc:
        raise PolicyError("malformed", f"{w}: {exc}") from None
    serial, at, by = _get(d, "serial", int, w), _get(d, "at", int, w), _get(d, "by", str, w)
    if not 1 <= serial <= MAX_SERIAL or not 0 <= at < 1 << 40 or len(by) > 128:
        raise PolicyError("malformed", f"{w}: serial, at or by out of range")
    doc = PolicyDoc(kind, cluster, subject, serial, at, by)
    if kind == "revocation":
        reason = _get(d, "reason", str, w)
        if len(reason) > 500:
            raise PolicyError("malformed", f"{w}: reason over 500 characters")
        return replace(doc, revoked=_get(d, "revoked", bool, w), keys=_keys32(d["keys"], MAX_KEYS, w), reason=reason)
    if kind == "allowlist":
        ms = d["measurements"]
        return replace(doc, measurements=None if ms is None else _keys32(ms, MAX_ALLOWLIST, w))
    try:
        req = None if d["request"] is None else DrainRequest.parse(d["request"], w)
    except RecordError as exc:
        raise PolicyError("malformed", str(exc)) from None
    return replace(doc, request=req)


def verify(data: bytes, authority_pub: bytes, cluster: str, now: float | None) -> PolicyDoc:
    """A signed document, verified (PolicyError otherwise).  ``now`` None: the signer's
    certificate window is not checked (a document this agent verified once, read back)."""
    if len(data) > MAX_POLICY:
        raise PolicyError("malformed", f"{len(data)} bytes, over the limit of {MAX_POLICY}")
    outer = _unpack(data, "policy document")
    if not isinstance(outer, dict) or set(outer) != {"body", "sig", "cert"}:
        raise PolicyError("unsigned", "not a signed policy document (body, sig, cert)")
    body, sig, cert_bytes = (_get(outer, k, bytes, "policy document") for k in ("body", "sig", "cert"))
    if len(sig) != 64:
        raise PolicyError("malformed", "signature of the wrong length")
    signer = "authority"
    key = authority_pub
    expired: AttestationError | None = None
    if cert_bytes:
        try:
            cert = Certificate.decode(cert_bytes)
        except AttestationError as exc:
            raise PolicyError("malformed", str(exc)) from None
        try:
            cert.verify(authority_pub, cert.not_before if now is None else now)  # None: not the window
        except AttestationError as exc:
            if exc.reason not in (ErrorCode.EXPIRED, ErrorCode.NOT_YET_VALID):
                raise PolicyError(exc.reason.value, str(exc)) from None
            expired = exc
        if OPERATOR_ROLE not in cert.roles:
            raise PolicyError("wrong-role", f"signed by {cert.name!r}, whose certificate lacks the operator role")
        key, signer = cert.sign_pub, f"operator {cert.name}"
    try:
        VerifyKey(key).verify(POLICY_DOMAIN + body, sig)
    except (BadSignatureError, ValueError, TypeError):
        raise PolicyError("bad-signature", f"the signature of the {signer} does not verify") from None
    doc = parse_body(body, cluster)
    if expired is not None and now is not None and not doc.restricts_only:
        raise PolicyError(expired.reason.value, str(expired))
    return replace(doc, signer=signer, raw=data)


# ------------------------------------------------------------------ what an agent keeps


@dataclass
class PolicyStore:
    """The highest verified document per (kind, subject): an agent's own drain only, every
    revocation, the allowlist.  Plain data, on the agent's trio thread."""

    authority_pub: bytes
    keys: Keys
    me: str  # this agent: the only drain it takes is its own
    kept: dict[tuple[str, str], PolicyDoc] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # refused documents, by reason

    def offer(self, kind: str, subject: str, value: bytes, now: float) -> str:
        """A value read from etcd under the key of (kind, subject): ``new`` if taken, ``same``,
        ``ignored`` (someone else's drain), or why it was refused (and counted)."""
        if kind == "drain" and subject != self.me:
            return "ignored"
        kept = self.kept.get((kind, subject))
        if kept is not None and hmac.compare_digest(value, kept.raw):
            return "same"
        try:
            doc = verify(value, self.authority_pub, self.keys.prefix, now)
            if (doc.kind, doc.subject) != (kind, subject):
                raise PolicyError("misplaced", f"a {doc.kind} document of {doc.subject!r} under the key of "
                                               f"{kind} {subject!r}")
        except PolicyError as exc:
            return self._refuse(exc.reason)
        return self.take(doc)

    def take(self, doc: PolicyDoc) -> str:
        k = (doc.kind, doc.subject)
        kept = self.kept.get(k)
        if kept is not None:
            if doc.serial < kept.serial:
                return self._refuse("older")
            if doc.serial == kept.serial:
                # two documents under one serial: the first verified stands
                return "same" if hmac.compare_digest(doc.raw, kept.raw) else self._refuse("equivocation")
        elif doc.kind == "revocation" and sum(1 for x in self.kept if x[0] == "revocation") >= MAX_REVOCATIONS:
            lifted = next((x for x, d in self.kept.items() if d.kind == "revocation" and not d.revoked), None)
            if lifted is None:
                return self._refuse("too-many")
            del self.kept[lifted]  # forgetting a lifted one can at worst let an older revocation back in
        self.kept[k] = doc
        return "new"

    def count(self, reason: str) -> None:
        """Something else refused (an agent record: ``record-forged``, ``record-squatted``...)."""
        self._refuse(reason)

    def _refuse(self, reason: str) -> str:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return reason

    def lists(self, revision: int, read_at: float) -> Lists:
        revs = [d for d in self.kept.values() if d.kind == "revocation" and d.revoked]
        allow = self.kept.get(("allowlist", ""))
        ms = None if allow is None or allow.measurements is None else frozenset(allow.measurements)
        return Lists(frozenset(d.subject for d in revs), ms, revision, read_at,
                     frozenset(k for d in revs for k in d.keys))

    def drain_request(self) -> DrainRequest | None:
        doc = self.kept.get(("drain", self.me))
        return None if doc is None else doc.request

    def stale(self, current: dict[bytes, bytes]) -> list[PolicyDoc]:
        """Kept documents etcd has lost, or holds older or not signed: any agent may write
        them back, they are signed.  ``current``: etcd's values under ``config/`` (and this
        agent's drain key).  A value that verifies with a serial as high is left alone,
        even if this agent refused it (its clock, or two documents of one serial): agents
        never overwrite each other's."""
        out = []
        for d in self.kept.values():
            if d.kind == "drain" and d.subject != self.me:
                continue
            there = current.get(d.key(self.keys))
            if there is not None:
                if hmac.compare_digest(there, d.raw):
                    continue
                try:
                    if verify(there, self.authority_pub, self.keys.prefix, None).serial >= d.serial:
                        continue
                except PolicyError:
                    pass
            out.append(d)
        return out

    # the state directory's copy

    def encode(self) -> bytes:
        out: bytes = msgpack.packb({"v": 1, "docs": [d.raw for d in self.kept.values()]})
        return out

    def load(self, data: bytes) -> int:
        """Documents kept before a restart, verified again (their signer's window is not:
        they were taken when it held).  RecordError if the file is damaged."""
        try:
            obj = msgpack.unpackb(data, raw=False, max_bin_len=MAX_POLICY, max_array_len=MAX_REVOCATIONS + 2,
                                  max_map_len=2, max_str_len=16)
        except Exception:
            raise RecordError("the kept policy documents are damaged") from None
        if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("docs"), list):
            raise RecordError("the kept policy documents are damaged")
        docs = []
        for raw in obj["docs"]:
            if not isinstance(raw, bytes):
                raise RecordError("the kept policy documents are damaged")
            docs.append(verify(raw, self.authority_pub, self.keys.prefix, None))
        return sum(self.take(d) == "new" for d in docs)


def revocation(cluster: str, name: str, serial: int, keys: Iterable[bytes], reason: str, by: str,
               revoked: bool = True) -> PolicyDoc:
    return PolicyDoc("revocation", cluster, name, serial, int(time.time()), by[:128], revoked,
                     tuple(sorted(set(keys))), reason[:500])


# ------------------------------------------------------------------ what an agent says of itself

RECORD_DOMAINS = {"agent": b"palm-net/agent-record/v1\x00", "vm": b"palm-net/vm-record/v1\x00"}


def seal_record(body: bytes, key: SigningKey, cert: Certificate, kind: str = "agent") -> bytes:
    """What an agent writes of its own (``agents/NAME``, ``known/NAME``: kind ``agent``;
    ``vms/VM_ID``: kind ``vm``), signed by its identity key with its certificate: readers
    check it is the writer's to write."""
    out: bytes = msgpack.packb({"body": body, "sig": key.sign(RECORD_DOMAINS[kind] + body).signature,
                                "cert": cert.encode()})
    return out


def _open_record(value: bytes, authority_pub: bytes | None, now: float,
                 kind: str = "agent") -> tuple[bytes, Certificate | None]:
    if len(value) > MAX_VALUE:
        raise PolicyError("malformed", f"{len(value)} bytes, over the limit of {MAX_VALUE}")
    what = f"{kind} record"
    outer = _unpack(value, what)
    if not isinstance(outer, dict) or set(outer) != {"body", "sig", "cert"}:
        raise PolicyError("unsigned", f"not a signed {what} (body, sig, cert)")
    body, sig, cert_bytes = (_get(outer, k, bytes, what) for k in ("body", "sig", "cert"))
    if authority_pub is None:
        return body, None
    try:
        cert = Certificate.decode(cert_bytes)
        cert.verify(authority_pub, now)
    except AttestationError as exc:
        raise PolicyError(exc.reason.value, str(exc)) from None
    if not set(cert.roles) & set(AGENT_ROLES):
        raise PolicyError("wrong-role", f"{cert.name!r} is not certified as an agent")
    try:
        VerifyKey(cert.sign_pub).verify(RECORD_DOMAINS[kind] + body, sig)
    except (BadSignatureError, ValueError, TypeError):
        raise PolicyError("bad-signature", f"the signature of {cert.name!r} does not verify") from None
    return body, cert


def _same_agent(cert: Certificate | None, name: str, static_pub_hex: str) -> None:
    if cert is None:
        return
    if cert.name != name or not hmac.compare_digest(cert.static_pub.hex(), static_pub_hex):
        raise PolicyError("squatted", f"a record of {name!r} signed by {cert.name!r} (another name or key)")


def open_agent_record(value: bytes, authority_pub: bytes | None, now: float) -> AgentRecord:
    """An agent record as read from etcd; verified against its certificate when the
    authority's key is given (PolicyError: forged, squatted, unsigned)."""
    body, cert = _open_record(value, authority_pub, now)
    rec = AgentRecord.decode(body)
    _same_agent(cert, rec.name, rec.static_pub)
    return rec


def open_known_agent(value: bytes, authority_pub: bytes | None, now: float) -> KnownAgent:
    body, cert = _open_record(value, authority_pub, now)
    rec = KnownAgent.decode(body)
    _same_agent(cert, rec.name, rec.static_pub)
    return rec


def open_vm_record(value: bytes, authority_pub: bytes | None, now: float) -> VmRecord:
    """A VM record: written by the agent it names, or by the source of the migration it names
    (after DONE, proto 7.5); any other writer's is refused (``not-its-own``)."""
    body, cert = _open_record(value, authority_pub, now, "vm")
    rec = VmRecord.decode(body)
    if cert is not None and cert.name != rec.agent and not rec.migration:
        raise PolicyError("not-its-own", f"a record of VM {rec.vm_id[:16]} on {rec.agent!r} written by {cert.name!r}")
    return rec
