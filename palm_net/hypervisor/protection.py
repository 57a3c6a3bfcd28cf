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

import numpy as np
import numpy.typing as npt

from palm_net.crypto.noise import CipherFunctions, aesgcm_available, ffi

PAGE_SIZE = 4096
TAG_LEN = 16
_AD = struct.Struct("<16sIQQ")
_NONCE = struct.Struct("<IQ")


class ProtectionIntegrityError(Exception):
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


AD_LEN = 9 + _AD.size


def _ads_and_nonces(vm_id: bytes, pid: int, gfns: npt.NDArray[np.uint64],
                    versions: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Each page's associated data and nonce (as ``_ad`` and ``_NONCE``), as rows."""
    k = len(gfns)
    ad = np.empty((k, AD_LEN), np.uint8)
    ad[:, :9] = np.frombuffer(b"palm-page", np.uint8)
    ad[:, 9:25] = np.frombuffer(vm_id, np.uint8)
    ad[:, 25:29] = np.frombuffer(struct.pack("<I", pid), np.uint8)
    ad[:, 29:37] = gfns.astype("<u8").view(np.uint8).reshape(k, 8)
    ad[:, 37:45] = versions.astype("<u8").view(np.uint8).reshape(k, 8)
    nonce = np.empty((k, 12), np.uint8)
    nonce[:, :4] = gfns.astype("<u4").view(np.uint8).reshape(k, 4)
    nonce[:, 4:] = ad[:, 37:45]
    return ad, nonce


def _boxes(k: int, scratch: npt.NDArray[np.uint8] | None) -> npt.NDArray[np.uint8]:
    """k rows of ciphertext || tag, as libsodium's combined mode takes and gives them."""
    return scratch[:k] if scratch is not None and len(scratch) >= k else np.empty((k, PAGE_SIZE + TAG_LEN), np.uint8)


def seal_pages(fns: CipherFunctions, key: bytes, vm_id: bytes, pid: int, gfns: npt.NDArray[np.uint64],
               versions: npt.NDArray[np.uint64], pages: list[npt.NDArray[np.uint8]],
               scratch: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]:
    """``seal_page`` for many pages of one process at once, as ``open_pages``: each
    plaintext of ``pages`` sealed under its gfn and (new) version; rows of
    ciphertext || MAC (in ``scratch`` if it has room)."""
    k = len(gfns)
    boxed = _boxes(k, scratch)
    if k == 0:
        return boxed
    ad, nonce = _ads_and_nonces(vm_id, pid, gfns, versions)
    bp, ap, np_ = (ffi.from_buffer(x, require_writable=True) for x in (boxed, ad, nonce))
    encrypt = fns.encrypt_c
    for i in range(k):
        if encrypt(bp + i * (PAGE_SIZE + TAG_LEN), ffi.NULL, ffi.from_buffer(pages[i]), PAGE_SIZE,
                   ap + i * AD_LEN, AD_LEN, ffi.NULL, np_ + i * 12, key) != 0:  # (AES-GCM without AES-NI)
            boxed[: i + 1] = 0  # whatever a failed call left is sent by no one
            raise ProtectionIntegrityError(f"protected page gfn {int(gfns[i])} (pid {pid}) could not be sealed")
    return boxed


def open_pages(fns: CipherFunctions, key: bytes, vm_id: bytes, pid: int, gfns: npt.NDArray[np.uint64],
               versions: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]],
               tags: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8] | None = None,
               scratch: npt.NDArray[np.uint8] | None = None) -> None:
    """``open_page`` for many pages of one process at once: the associated data and
    nonces built as arrays, one C call a page (not the few microseconds of Python
    each that made protection cost a third of a migration's time).  The plaintexts
    go to ``out`` (rows of 4096) if given; ``scratch``: a (rows, 4112) buffer to use
    again.  ProtectionIntegrityError names the first failure."""
    k = len(gfns)
    if k == 0:
        return
    ad, nonce = _ads_and_nonces(vm_id, pid, gfns, versions)
    boxed = _boxes(k, scratch)
    if isinstance(pages, list):
        for i, page in enumerate(pages):
            boxed[i, :PAGE_SIZE] = page
    else:
        boxed[:, :PAGE_SIZE] = pages
    boxed[:, PAGE_SIZE:] = tags
    dst = out if out is not None else np.empty((1, PAGE_SIZE), np.uint8)
    step = PAGE_SIZE if out is not None else 0
    dp, bp, ap, np_ = (ffi.from_buffer(x, require_writable=True) for x in (dst, boxed, ad, nonce))
    decrypt = fns.decrypt_c
    for i in range(k):
        if decrypt(dp + i * step, ffi.NULL, ffi.NULL, bp + i * (PAGE_SIZE + TAG_LEN), PAGE_SIZE + TAG_LEN,
                   ap + i * AD_LEN, AD_LEN, np_ + i * 12, key) != 0:
            raise ProtectionIntegrityError(f"protected page gfn {int(gfns[i])} (pid {pid}, version "
                                           f"{int(versions[i])}) fails its MAC")


def open_page(fns: CipherFunctions, key: bytes, vm_id: bytes, pid: int, gfn: int, version: int,
              ciphertext: bytes | memoryview, tag: bytes) -> bytes:
    try:
        return fns.decrypt_raw(bytes(ciphertext) + bytes(tag), _ad(vm_id, pid, gfn, version),
                               _NONCE.pack(gfn, version), key)
    except Exception:  # libsodium's CryptoError; the message names the page, never the key
        raise ProtectionIntegrityError(
            f"protected page gfn {gfn} (pid {pid}, version {version}) fails its MAC") from None
