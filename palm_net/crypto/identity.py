"""Agent identities, the cluster authority, certificates and attestation quotes.

A trusted VMM on each end (PALM's assumption) is stood for here by an agent
whose code and policy hash to an allowed *measurement*, certified by the
cluster authority and proven live by a quote bound to the Noise handshake.
Formats are specified in proto/PROTOCOL.md (section "Identities").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from palm_net.crypto.noise import KeyPair, keypair_from_private
from palm_net.errors import ErrorCode
from palm_net.hostfs import UnsafePathError, ensure_dir, read_private_file, write_atomic

CERT_VERSION = 1
CERT_DOMAIN = b"palm-net/cert/v1\x00"
QUOTE_DOMAIN = b"palm-net/quote/v1\x00"
MAX_CERT_LEN = 4096
MAX_KEY_FILE = 4096
ROLES = ("source", "destination")  # an agent's: the sides of a migration it may take
OPERATOR_ROLE = "operator"  # signs the cluster's policy (proto 10); never an agent's

IDENTITY_FILE = "identity.key"
CERT_FILE = "agent.cert"
CA_KEY_FILE = "ca.key"
CA_PUB_FILE = "ca.pub"


class AttestationError(Exception):
    """A peer refused at the handshake: ``reason`` is the error code the wire carries."""

    def __init__(self, reason: ErrorCode, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or readable by others."""


# --------------------------------------------------------------------------
# Key files: written 0600, refused when group/other may read them.


def write_secret_file(path: Path, data: bytes) -> None:
    """Writes a key file 0600: a fresh temporary file (never through a planted
    name or symlink), fsync'd and renamed into place."""
    write_atomic(path, data, 0o600)


def read_secret_file(path: Path) -> bytes:
    try:
        return read_private_file(path, "key file", MAX_KEY_FILE)
    except UnsafePathError as exc:
        raise KeyFileError(str(exc)) from None


def key_directory(directory: Path) -> Path:
    """Where key files go: made 0700 by us, or verified (no other user may plant or swap them)."""
    try:
        return ensure_dir(directory, "key directory")
    except UnsafePathError as exc:
        raise KeyFileError(str(exc)) from None


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=MAX_CERT_LEN, max_str_len=1024,
                              max_array_len=64, max_map_len=64, strict_map_key=True)
    except Exception:
        raise KeyFileError(f"{what} is not valid msgpack") from None
    if not isinstance(obj, dict):
        raise KeyFileError(f"{what} is not a msgpack map")
    return obj


def _field(obj: dict[str, Any], key: str, typ: type, what: str) -> Any:
    val = obj.get(key)
    if not isinstance(val, typ) or (isinstance(val, bool) and typ is int):
        raise KeyFileError(f"{what}: field {key!r} missing or of the wrong type")
    return val


# --------------------------------------------------------------------------
# Agent identity


@dataclass(frozen=True, repr=False)
class AgentIdentity:
    name: str
    static: KeyPair  # X25519, the Noise static key
    signing: SigningKey  # Ed25519, signs quotes

    def __repr__(self) -> str:
        return f"AgentIdentity(name={self.name!r}, static_pub={self.static.public.hex()[:16]}...)"

    @property
    def sign_pub(self) -> bytes:
        return bytes(self.signing.verify_key)

    @classmethod
    def generate(cls, name: str) -> AgentIdentity:
        validate_name(name)
        return cls(name, keypair_from_private(os.urandom(32)), SigningKey.generate())

    def save(self, directory: Path) -> Path:
        path = key_directory(directory) / IDENTITY_FILE
        blob = msgpack.packb({"v": 1, "name": self.name, "x25519": self.static.private,
                              "ed25519": bytes(self.signing)})
        write_secret_file(path, blob)
        return path

    @classmethod
    def load(cls, directory: Path) -> AgentIdentity:
        path = directory / IDENTITY_FILE
        obj = _unpack_map(read_secret_file(path), str(path))
        what = str(path)
        if obj.get("v") != 1:
            raise KeyFileError(f"{what}: unsupported identity version")
        x = _field(obj, "x25519", bytes, what)
        ed = _field(obj, "ed25519", bytes, what)
        if len(x) != 32 or len(ed) != 32:
            raise KeyFileError(f"{what}: key of the wrong length")
        return cls(_field(obj, "name", str, what), keypair_from_private(x), SigningKey(ed))

    def public_description(self) -> dict[str, str]:
        return {"name": self.name, "static_pub": self.static.public.hex(),
                "sign_pub": self.sign_pub.hex()}


def validate_name(name: str) -> None:
    """Agent and VM names: also used as directory names, so never '.', '..' or a path."""
    if (not (1 <= len(name) <= 64) or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
            or name.startswith(".")):
        raise ValueError(f"invalid name {name!r}: 1-64 ASCII letters, digits, '-', '_', '.', not starting with '.'")


# --------------------------------------------------------------------------
# Measurement: a digest of the agent's code and policy, the same on every host.


def compute_measurement(policy: bytes = b"", root: Path | None = None) -> bytes:
    """BLAKE2b-256 over the sorted (relative path, content) of palm_net's *.py plus the policy."""
    root = root or Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=32, person=b"palm-measure")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix().encode()
        if "/testing/" in "/" + rel.decode():
            continue  # test tooling is not part of the trusted agent
        content = path.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(content).to_bytes(8, "big") + content)
    h.update(b"policy" + len(policy).to_bytes(8, "big") + policy)
    return h.digest()


# --------------------------------------------------------------------------
# Cluster authority and certificates


def key_id(public: bytes) -> bytes:
    return hashlib.blake2b(public, digest_size=16, person=b"palm-keyid").digest()


@dataclass(frozen=True)
class Certificate:
    name: str
    static_pub: bytes
    sign_pub: bytes
    measurement: bytes
    not_before: int
    not_after: int
    roles: tuple[str, ...]
    issuer: bytes  # key id of the authority
    body: bytes = field(repr=False)  # the exact signed bytes
    signature: bytes = field(repr=False)

    def encode(self) -> bytes:
        out: bytes = msgpack.packb({"body": self.body, "sig": self.signature})
        return out

    @classmethod
    def decode(cls, data: bytes) -> Certificate:
        if len(data) > MAX_CERT_LEN:
            raise AttestationError(ErrorCode.MALFORMED, "certificate too long")
        try:
            outer = _unpack_map(data, "certificate")
            body = _field(outer, "body", bytes, "certificate")
            sig = _field(outer, "sig", bytes, "certificate")
            obj = _unpack_map(body, "certificate body")
            if obj.get("v") != CERT_VERSION or set(obj) != {
                "v", "name", "static_pub", "sign_pub", "measurement", "nbf", "naf", "roles", "iss"
            }:
                raise KeyFileError("certificate: unsupported version or fields")
            roles = _field(obj, "roles", list, "certificate")
            if not all(isinstance(r, str) for r in roles):
                raise KeyFileError("certificate: roles must be strings")
            cert = cls(
                _field(obj, "name", str, "certificate"),
                _field(obj, "static_pub", bytes, "certificate"),
                _field(obj, "sign_pub", bytes, "certificate"),
                _field(obj, "measurement", bytes, "certificate"),
                _field(obj, "nbf", int, "certificate"),
                _field(obj, "naf", int, "certificate"),
                tuple(roles),
                _field(obj, "iss", bytes, "certificate"),
                body,
                sig,
            )
        except KeyFileError as exc:
            raise AttestationError(ErrorCode.MALFORMED, str(exc)) from None
        if len(cert.static_pub) != 32 or len(cert.sign_pub) != 32 or len(cert.measurement) != 32:
            raise AttestationError(ErrorCode.MALFORMED, "certificate key or measurement length")
        return cert

    def verify(self, authority_pub: bytes, now: float | None = None) -> None:
        """Checks issuer, signature and validity window; raises AttestationError."""
        if not hmac.compare_digest(self.issuer, key_id(authority_pub)):
            raise AttestationError(ErrorCode.UNKNOWN_AUTHORITY,
                                   f"certificate of {self.name!r} is issued by another authority")
        try:
            VerifyKey(authority_pub).verify(CERT_DOMAIN + self.body, self.signature)
        except (BadSignatureError, ValueError, TypeError):
            raise AttestationError(ErrorCode.BAD_CERTIFICATE,
                                   f"signature on certificate of {self.name!r} is invalid") from None
        t = time.time() if now is None else now
        if t < self.not_before:
            raise AttestationError(ErrorCode.NOT_YET_VALID, f"certificate of {self.name!r}")
        if t > self.not_after:
            raise AttestationError(ErrorCode.EXPIRED, f"certificate of {self.name!r}")


@dataclass(frozen=True, repr=False)
class Authority:
    signing: SigningKey

    def __repr__(self) -> str:
        return f"Authority(key_id={self.key_id.hex()})"

    @property
    def public(self) -> bytes:
        return bytes(self.signing.verify_key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.public)

    @classmethod
    def generate(cls) -> Authority:
        return cls(SigningKey.generate())

    def save(self, directory: Path) -> None:
        key_directory(directory)
        write_secret_file(directory / CA_KEY_FILE, msgpack.packb({"v": 1, "ed25519": bytes(self.signing)}))
        write_atomic(directory / CA_PUB_FILE, (self.public.hex() + "\n").encode(), 0o644)

    @classmethod
    def load(cls, directory: Path) -> Authority:
        path = directory / CA_KEY_FILE
        obj = _unpack_map(read_secret_file(path), str(path))
        seed = _field(obj, "ed25519", bytes, str(path))
        if obj.get("v") != 1 or len(seed) != 32:
            raise KeyFileError(f"{path}: unsupported authority key")
        return cls(SigningKey(seed))

    def issue(
        self,
        name: str,
        static_pub: bytes,
        sign_pub: bytes,
        measurement: bytes,
        roles: Iterable[str] = ROLES,
        not_before: int | None = None,
        days: float = 365,
    ) -> Certificate:
        roles = tuple(roles)
        for r in roles:
            if r not in (*ROLES, OPERATOR_ROLE):
                raise ValueError(f"unknown role {r!r} (known: {', '.join((*ROLES, OPERATOR_ROLE))})")
        if OPERATOR_ROLE in roles and len(roles) > 1:
            # An agent's host can be compromised: its key must never also sign the cluster's policy.
            raise ValueError("the operator role goes alone: an agent's certificate never signs policy")
        nbf = int(time.time()) - 60 if not_before is None else not_before
        naf = nbf + int(days * 86400)
        body = msgpack.packb({
            "v": CERT_VERSION, "name": name, "static_pub": static_pub, "sign_pub": sign_pub,
            "measurement": measurement, "nbf": nbf, "naf": naf, "roles": list(roles),
            "iss": self.key_id,
        })
        sig = self.signing.sign(CERT_DOMAIN + body).signature
        return Certificate(name, static_pub, sign_pub, measurement, nbf, naf, roles, self.key_id, body, sig)


def load_authority_public(path: Path) -> bytes:
    """The authority's public key file (ca.pub: 64 hex digits), never its private key."""
    try:
        raw = path.read_bytes()[:4096]
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a directory; give the authority's public key file "
                           f"({path / CA_PUB_FILE})") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read authority public key {path}: {exc.strerror}") from None
    try:
        pub = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        pub = b""
    if len(pub) != 32:
        raise KeyFileError(f"{path} is not an authority public key (ca.pub holds 64 hex digits)")
    return pub


# --------------------------------------------------------------------------
# Attestation quote: Ed25519 over the handshake hash and the measurement.


def make_quote(identity: AgentIdentity, handshake_hash: bytes, measurement: bytes) -> bytes:
    return identity.signing.sign(QUOTE_DOMAIN + handshake_hash + measurement).signature


def verify_quote(sign_pub: bytes, handshake_hash: bytes, measurement: bytes, quote: bytes) -> None:
    if len(quote) != 64:
        raise AttestationError(ErrorCode.BAD_QUOTE, "quote has the wrong length")
    try:
        VerifyKey(sign_pub).verify(QUOTE_DOMAIN + handshake_hash + measurement, quote)
    except (BadSignatureError, ValueError, TypeError):
        raise AttestationError(ErrorCode.BAD_QUOTE, "quote signature does not verify") from None


def same_key(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
