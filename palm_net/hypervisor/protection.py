"""Page protection of the VMM (Overshadow/CHAOS multi-shadowing), as pure functions.

A protected page is either in the *process view* (plaintext in guest memory,
what the owning process sees) or in the *cipher view* (ciphertext in guest
memory, what the guest OS and anything outside the VMM see).  Going from the
process view to the cipher view re-encrypts under a bumped version; going
back verifies the MAC and decrypts.

Per page the VMM keeps: version (u64), MAC (the 16-byte AEAD tag) and the
nonce, which is derived, not stored: ``u32le(gfn) || u64le(version)``.  It is
unique per key because each process has its own key and a version is never
reused for a gfn.  The associated data binds the page's identity:
``"palm-page" || vm_id(16) || u32le(pid) || u64le(gfn) || u64le(version)``,
so a ciphertext cannot be replayed at another gfn, version, process or VM.
"""

from __future__ import annotations

import struct

from palm_net.crypto.noise import CipherFunctions, aesgcm_available

PAGE_SIZE = 4096
TAG_LEN = 16
_AD = struct.Struct("<16sIQQ")
_NONCE = struct.Struct("<IQ")


class IntegrityError(Exception):
    """A protected page does not match its metadata (tampered, rolled back, misplaced)."""


def default_page_cipher() -> str:
    return "AESGCM" if aesgcm_available() else "ChaChaPoly"


def _ad(vm_id: bytes, pid: int, gfn: int, version: int) -> bytes:
    return b"palm-page" + _AD.pack(vm_id, pid, gfn, version)


def seal_page(fns: CipherFunctions, key: bytes, vm_id: bytes, pid: int, gfn: int, version: int,
              plaintext: bytes) -> tuple[bytes, bytes]:
    """Returns (ciphertext of PAGE_SIZE bytes, tag)."""
    out = fns.encrypt_raw(plaintext, _ad(vm_id, pid, gfn, version), _NONCE.pack(gfn, version), key)
    return out[:-TAG_LEN], out[-TAG_LEN:]


def open_page(fns: CipherFunctions, key: bytes, vm_id: bytes, pid: int, gfn: int, version: int,
              ciphertext: bytes | memoryview, tag: bytes) -> bytes:
    try:
        return fns.decrypt_raw(bytes(ciphertext) + bytes(tag), _ad(vm_id, pid, gfn, version),
                               _NONCE.pack(gfn, version), key)
    except Exception:  # libsodium's CryptoError; the message names the page, never the key
        raise IntegrityError(f"protected page gfn {gfn} (pid {pid}, version {version}) fails its MAC") from None
