"""One error vocabulary: the codes of proto/PROTOCOL.md section 8, and the errors that carry them.

Every error palm_net raises about a session or a migration is a ``PalmError``:
a code from ``ErrorCode`` and a one-line detail (never key material).  Its
kinds say whose fault it is, as h11 separates LocalProtocolError from
RemoteProtocolError:

- ``RemoteProtocolError``: the peer (or the network) broke the protocol; the
  session ends and nothing more of it is processed.  ``HandshakeError`` is
  its kind for the handshake and the peer's attestation.
- ``LocalProtocolError``: we tried to make a message or a move the protocol
  forbids (a bug, or a bad argument of ours); nothing was sent.
- ``MigrationFailure``: the migration cannot go on by a decision of ours (a
  limit, a failed check of what arrived, the hypervisor, the operator).

What crosses the wire in an ABORT is the code and ``public_reason(code)``;
the detail stays in the local log.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """proto/PROTOCOL.md section 8, in its order (a test compares the two lists)."""

    # framing
    OVERSIZE = "oversize"
    UNDERSIZE = "undersize"
    # preamble
    BAD_PREAMBLE = "bad-preamble"
    VERSION = "version"
    PURPOSE = "purpose"
    PLAIN_NOT_ALLOWED = "plain-not-allowed"
    CIPHER_NOT_ALLOWED = "cipher-not-allowed"
    # handshake and attestation
    HANDSHAKE_FAILED = "handshake-failed"
    MALFORMED = "malformed"
    UNKNOWN_AUTHORITY = "unknown-authority"
    BAD_CERTIFICATE = "bad-certificate"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    KEY_MISMATCH = "key-mismatch"
    BAD_QUOTE = "bad-quote"
    MEASUREMENT_NOT_ALLOWED = "measurement-not-allowed"
    ROLE_NOT_ALLOWED = "role-not-allowed"
    TIMEOUT = "timeout"
    CLOSED = "closed"
    # records and messages
    BAD_RECORD = "bad-record"
    UNKNOWN_TYPE = "unknown-type"
    OUT_OF_STATE = "out-of-state"
    SEQUENCE = "sequence"
    WRONG_MIGRATION = "wrong-migration"
    UNAUTHENTICATED = "unauthenticated"
    # the migration
    ROLLBACK = "rollback"
    UNSUPPORTED = "unsupported"
    BACKEND = "backend"
    HYPERVISOR = "hypervisor"
    INCOMPLETE = "incomplete"
    INTEGRITY = "integrity"
    DIGEST_MISMATCH = "digest-mismatch"
    # BEGIN refused
    BUSY = "busy"
    EXISTS = "exists"
    TOO_LARGE = "too-large"
    NO_SPACE = "no-space"
    SHUTTING_DOWN = "shutting-down"
    REPLAY = "replay"
    MODE_MISMATCH = "mode-mismatch"
    PLAIN_REFUSED = "plain-refused"
    # the handoff
    ABORTED = "aborted"
    # the source, before anything is sent (never on the wire)
    POLICY = "policy"
    UNREACHABLE = "unreachable"
    VM_STATE = "vm-state"
    CANCELLED = "cancelled"
    REVOKED = "revoked"


class PalmError(Exception):
    """A code and a one-line detail."""

    def __init__(self, code: ErrorCode | str, detail: str = "") -> None:
        self.code = ErrorCode(code)
        self.detail = detail
        super().__init__(f"{self.code}: {detail}" if detail else str(self.code))


class RemoteProtocolError(PalmError):
    """The peer broke the protocol; the session must close, nothing more is processed."""


class HandshakeError(RemoteProtocolError):
    """The handshake failed or the peer was refused (preamble, attestation, cipher, role)."""


class LocalProtocolError(PalmError):
    """We tried to make a message or a move the protocol does not allow."""


class MigrationFailure(PalmError):
    """The migration cannot go on, by a decision of ours."""


# What a peer is told: the code and a generic reason.  The detail (paths,
# QEMU's log, our limits) stays in the local log (proto/PROTOCOL.md 8).
PUBLIC_REASONS: dict[ErrorCode, str] = {
    ErrorCode.BUSY: "the destination has no free slot or memory for this migration now",
    ErrorCode.NO_SPACE: "the destination has no room for this VM's memory",
    ErrorCode.TOO_LARGE: "the VM is larger than this destination accepts",
    ErrorCode.EXISTS: "the destination already hosts this VM or a VM of that name",
    ErrorCode.SHUTTING_DOWN: "the destination agent is shutting down",
    ErrorCode.REPLAY: "migration id already used on this agent",
    ErrorCode.MODE_MISMATCH: "BEGIN disagrees with the session's transport mode",
    ErrorCode.PLAIN_REFUSED: "a VM with protected processes never uses the plain benchmark mode",
    ErrorCode.BACKEND: "the destination cannot host this VM's backend",
    ErrorCode.HYPERVISOR: "the hypervisor failed the migration",
    ErrorCode.INCOMPLETE: "the migration arrived incomplete",
    ErrorCode.INTEGRITY: "a protected page or the protected-context blob failed verification",
    ErrorCode.ROLLBACK: "a page record older than one already applied",
    ErrorCode.DIGEST_MISMATCH: "memory digests differ",
    ErrorCode.TIMEOUT: "the session ran out of time",
    ErrorCode.ABORTED: "the destination already aborted this migration",
    ErrorCode.CANCELLED: "the source cancelled the migration",
}


def public_reason(code: ErrorCode) -> str:
    return PUBLIC_REASONS.get(code, "refused")
