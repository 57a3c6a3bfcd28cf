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
