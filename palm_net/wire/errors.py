"""Errors of the wire protocol.  Messages name the problem, never key material."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the protocol; the session must close, nothing more is processed.

    ``code`` is one of the error codes of proto/PROTOCOL.md (section "Error codes").
    """

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class HandshakeError(ProtocolError):
    """The handshake failed or the peer was refused (attestation, cipher, role)."""


# What a peer is told: the code and a generic reason.  The detail (paths,
# QEMU's log, our limits) stays in the local log (proto/PROTOCOL.md 8).
PUBLIC_REASONS = {
    "busy": "the destination has no free slot or memory for this migration now",
    "no-space": "the destination has no room for this VM's memory",
    "too-large": "the VM is larger than this destination accepts",
    "exists": "the destination already hosts this VM or a VM of that name",
    "shutting-down": "the destination agent is shutting down",
    "replay": "migration id already used on this agent",
    "mode-mismatch": "BEGIN disagrees with the session's transport mode",
    "plain-refused": "a VM with protected processes never uses the plain benchmark mode",
    "backend": "the destination cannot host this VM's backend",
    "hypervisor": "the hypervisor failed the migration",
    "incomplete": "the migration arrived incomplete",
    "integrity": "a protected page or the protected-context blob failed verification",
    "rollback": "a page record older than one already applied",
    "digest-mismatch": "memory digests differ",
    "timeout": "the session ran out of time",
    "aborted": "the destination already aborted this migration",
}


def public_reason(code: str) -> str:
    return PUBLIC_REASONS.get(code, "refused")
