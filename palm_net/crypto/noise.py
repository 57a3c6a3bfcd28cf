"""The Noise Protocol Framework, revision 34, on libsodium (nacl.bindings).

Only what palm_net needs: DH 25519, ciphers ChaChaPoly and AESGCM, hash
BLAKE2b, and the handshake patterns NN, XX and IK.  The objects and method
names follow the spec (section 5) so the code can be read next to it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nacl import bindings as sodium

# The libsodium under nacl.bindings: AEAD on buffers, in place (also the VMM's
# batched page AEAD, palm_net.hypervisor.protection).
from nacl._sodium import ffi as ffi
from nacl._sodium import lib

DHLEN = 32
HASHLEN = 64
BLOCKLEN = 128
KEYLEN = 32
TAGLEN = 16
MAX_MESSAGE_LEN = 65535
# Nonce 2**64-1 is reserved for REKEY (spec 5.1): encryption must refuse it.
MAX_NONCE = 2**64 - 1


class NoiseError(Exception):
    """A Noise operation failed (bad tag, reserved nonce, misuse)."""


class DecryptError(NoiseError):
    """Authentication of a ciphertext failed."""


# --------------------------------------------------------------------------
# Crypto functions (spec section 4)


class CipherName(enum.StrEnum):
    CHACHAPOLY = "ChaChaPoly"
    AESGCM = "AESGCM"


AeadFn = Callable[[bytes, bytes, bytes, bytes], bytes]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class CipherFunctions:
    name: CipherName
    encrypt_raw: AeadFn  # (message, aad, nonce, key) -> ciphertext||tag
    decrypt_raw: AeadFn
    nonce_order: str  # byte order of the 64-bit counter in the 96-bit nonce
    # The same AEAD as libsodium's C functions (combined mode), for the bulk
    # path: they read and write buffers (pynacl's take and return bytes, a copy
    # each way), may work in place, and release the GIL.
    encrypt_c: Any = None
    decrypt_c: Any = None

    def nonce(self, n: int) -> bytes:
        # Both ciphers: 32 bits of zeros then the counter; ChaChaPoly little
        # endian, AESGCM big endian (spec 12.3 and 12.4).
        return b"\x00\x00\x00\x00" + n.to_bytes(8, "little" if self.nonce_order == "little" else "big")

    def encrypt(self, k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
        return self.encrypt_raw(plaintext, ad, self.nonce(n), k)

    def decrypt(self, k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
        try:
            return self.decrypt_raw(ciphertext, ad, self.nonce(n), k)
        except Exception:  # nacl raises CryptoError; never echo inputs
            raise DecryptError("authentication failed") from None

    def rekey(self, k: bytes) -> bytes:
        return self.encrypt(k, MAX_NONCE, b"", bytes(32))[:KEYLEN]

    def encrypt_into(self, k: bytes, n: int, plaintext: Buffer, out: Buffer) -> int:
        """ENCRYPT(k, n, ad="", plaintext) written to ``out`` (ciphertext then the tag);
        returns its length.  ``out`` may start at ``plaintext`` (in place)."""
        m = len(plaintext)
        if len(out) < m + TAGLEN:
            raise ValueError("output buffer too small")
        self.encrypt_c(ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.from_buffer(plaintext), m,
                       ffi.NULL, 0, ffi.NULL, self.nonce(n), k)
        return m + TAGLEN

    def decrypt_into(self, k: bytes, n: int, ciphertext: Buffer, out: Buffer) -> int:
        """DECRYPT(k, n, ad="", ciphertext) written to ``out``; returns the plaintext length.
        ``out`` may start at ``ciphertext`` (in place).  DecryptError if the tag fails."""
        c = len(ciphertext)
        if c < TAGLEN or len(out) < c - TAGLEN:
            raise DecryptError("authentication failed")
        rc = self.decrypt_c(ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL,
                            ffi.from_buffer(ciphertext), c, ffi.NULL, 0, self.nonce(n), k)
        if rc != 0:
            raise DecryptError("authentication failed")
        return c - TAGLEN


CHACHAPOLY = CipherFunctions(
    CipherName.CHACHAPOLY,
    sodium.crypto_aead_chacha20poly1305_ietf_encrypt,
    sodium.crypto_aead_chacha20poly1305_ietf_decrypt,
    "little",
    lib.crypto_aead_chacha20poly1305_ietf_encrypt,
    lib.crypto_aead_chacha20poly1305_ietf_decrypt,
)
AESGCM = CipherFunctions(
    CipherName.AESGCM,
    sodium.crypto_aead_aes256gcm_encrypt,
    sodium.crypto_aead_aes256gcm_decrypt,
    "big",
    lib.crypto_aead_aes256gcm_encrypt,
    lib.crypto_aead_aes256gcm_decrypt,
)
CIPHERS = {c.name.value: c for c in (CHACHAPOLY, AESGCM)}


def aesgcm_available() -> bool:
    """libsodium only offers AES-256-GCM where the CPU has AES-NI and CLMUL."""
    return bool(lib.crypto_aead_aes256gcm_is_available())


def blake2b(data: bytes) -> bytes:
    return sodium.crypto_generichash_blake2b_salt_personal(data, digest_size=HASHLEN)


def hmac_blake2b(key: bytes, data: bytes) -> bytes:
    """HMAC (RFC 2104) over BLAKE2b, as spec section 4.3 demands (not keyed BLAKE2b)."""
    if len(key) > BLOCKLEN:
        key = blake2b(key)
    key = key.ljust(BLOCKLEN, b"\x00")
    ipad = bytes(b ^ 0x36 for b in key)
    opad = bytes(b ^ 0x5C for b in key)
    return blake2b(opad + blake2b(ipad + data))


def hkdf(chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
    temp_key = hmac_blake2b(chaining_key, ikm)
    out1 = hmac_blake2b(temp_key, b"\x01")
    out2 = hmac_blake2b(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    return out1, out2, hmac_blake2b(temp_key, out2 + b"\x03")


@dataclass(frozen=True, repr=False)
class KeyPair:
    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never show the private half
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate_keypair() -> KeyPair:
    public, private = sodium.crypto_box_keypair()
    return KeyPair(private, public)


def keypair_from_private(private: bytes) -> KeyPair:
    if len(private) != DHLEN:
        raise NoiseError("X25519 private key must be 32 bytes")
    return KeyPair(private, sodium.crypto_scalarmult_base(private))


def dh(kp: KeyPair, public: bytes) -> bytes:
    try:
        return sodium.crypto_scalarmult(kp.private, public)
    except Exception:  # low-order point: libsodium refuses
        raise NoiseError("invalid DH public key") from None


# --------------------------------------------------------------------------
# CipherState (spec 5.1)


class CipherState:
    __slots__ = ("fns", "k", "n")

    def __init__(self, fns: CipherFunctions, k: bytes | None = None) -> None:
        self.fns = fns
        self.k: bytes | None = None
        self.n = 0
        self.initialize_key(k)

    def __repr__(self) -> str:
        return f"CipherState({self.fns.name.value}, has_key={self.k is not None}, n={self.n})"

    def initialize_key(self, key: bytes | None) -> None:
        self.k = key
        self.n = 0

    def has_key(self) -> bool:
        return self.k is not None

    def set_nonce(self, nonce: int) -> None:
        self.n = nonce

    def _nonce(self) -> int:
        """n, while it may still be used (spec 5.1: 2^64-1 is reserved)."""
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: rekey or new handshake required")
        return self.n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.k is None:
            return plaintext
        out = self.fns.encrypt(self.k, self._nonce(), ad, plaintext)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.k is None:
            return ciphertext
        # A failed decrypt raises before n moves (spec 5.1).
        out = self.fns.decrypt(self.k, self._nonce(), ad, ciphertext)
        self.n += 1
        return out

    def encrypt_into(self, plaintext: Buffer, out: Buffer) -> int:
        """EncryptWithAd(ad="", plaintext) written to ``out``; its length (see CipherFunctions)."""
        if self.k is None:
            raise NoiseError("encrypt_into needs a key")
        size = self.fns.encrypt_into(self.k, self._nonce(), plaintext, out)
        self.n += 1
        return size

    def decrypt_into(self, ciphertext: Buffer, out: Buffer) -> int:
        """DecryptWithAd(ad="", ciphertext) written to ``out``; the plaintext length."""
        if self.k is None:
            raise NoiseError("decrypt_into needs a key")
        size = self.fns.decrypt_into(self.k, self._nonce(), ciphertext, out)
        self.n += 1
        return size

    def rekey(self) -> None:
        if self.k is None:
            raise NoiseError("rekey without a key")
        self.k = self.fns.rekey(self.k)


# --------------------------------------------------------------------------
# SymmetricState (spec 5.2)


class SymmetricState:
    def __init__(self, protocol_name: bytes, fns: CipherFunctions) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = blake2b(protocol_name)
        self.ck = self.h
        self.cipher_state = CipherState(fns)

    def __repr__(self) -> str:
        return "SymmetricState(...)"

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cipher_state.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = blake2b(self.h + data)

    def get_handshake_hash(self) -> bytes:
        return self.h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        fns = self.cipher_state.fns
        return CipherState(fns, temp_k1[:KEYLEN]), CipherState(fns, temp_k2[:KEYLEN])


# --------------------------------------------------------------------------
# Handshake patterns (spec section 7)


@dataclass(frozen=True)
class HandshakePattern:
    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]


PATTERNS = {
    "NN": HandshakePattern("NN", (), (), (("e",), ("e", "ee"))),
    "XX": HandshakePattern("XX", (), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "IK": HandshakePattern("IK", (), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
}


def protocol_name(pattern: str, cipher: CipherName) -> str:
    return f"Noise_{pattern}_25519_{cipher.value}_BLAKE2b"


def parse_protocol_name(name: str) -> tuple[HandshakePattern, CipherFunctions]:
    parts = name.split("_")
    if (
        len(parts) != 5
        or parts[0] != "Noise"
        or parts[2] != "25519"
        or parts[4] != "BLAKE2b"
        or parts[1] not in PATTERNS
        or parts[3] not in CIPHERS
    ):
        raise NoiseError(f"unsupported Noise protocol name: {name!r}")
    return PATTERNS[parts[1]], CIPHERS[parts[3]]


# --------------------------------------------------------------------------
# HandshakeState (spec 5.3)


class HandshakeState:
    def __init__(
        self,
        name: str,
        initiator: bool,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
    ) -> None:
        self.pattern, fns = parse_protocol_name(name)
        self.protocol_name = name
        self.symmetric_state = SymmetricState(name.encode("ascii"), fns)
        self.symmetric_state.mix_hash(prologue)
        self.initiator = initiator
        self.s, self.e, self.rs, self.re = s, e, rs, re
        # Pre-messages: the public keys the pattern says are known in advance.
        for token in self.pattern.initiator_pre:
            self.symmetric_state.mix_hash(self._pre_key(token, self.initiator))
        for token in self.pattern.responder_pre:
            self.symmetric_state.mix_hash(self._pre_key(token, not self.initiator))
        self._index = 0
        # h just before the last payload was encrypted/decrypted: what an
        # attestation quote in that payload binds to (channel binding).
        self.payload_hash = b""
        self._result: tuple[CipherState, CipherState] | None = None

    def __repr__(self) -> str:
        return f"HandshakeState({self.protocol_name}, initiator={self.initiator}, step={self._index})"

    def _pre_key(self, token: str, ours: bool) -> bytes:
        if token != "s":
            raise NoiseError(f"unsupported pre-message token {token!r}")
        key = (self.s.public if self.s else None) if ours else self.rs
        if key is None:
            raise NoiseError("pre-message static key missing")
        return key

    @property
    def message_index(self) -> int:
        """How many handshake messages have been written or read."""
        return self._index

    @property
    def finished(self) -> bool:
        return self._result is not None

    def is_my_turn(self) -> bool:
        return (self._index % 2 == 0) == self.initiator

    def get_handshake_hash(self) -> bytes:
        return self.symmetric_state.get_handshake_hash()

    def _dh_token(self, token: str) -> bytes:
        # "es" means DH(initiator e, responder s); each side picks its half.
        a, b = token[0], token[1]
        if self.initiator:
            mine, theirs = a, b
        else:
            mine, theirs = b, a
        local = self.e if mine == "e" else self.s
        remote = self.re if theirs == "e" else self.rs
        if local is None or remote is None:
            raise NoiseError(f"key missing for token {token!r}")
        return dh(local, remote)

    def _next_pattern(self, writing: bool) -> tuple[str, ...]:
        if self.finished or self._index >= len(self.pattern.messages):
            raise NoiseError("handshake already complete")
        if self.is_my_turn() != writing:
            raise NoiseError("not this side's turn in the handshake")
        tokens = self.pattern.messages[self._index]
        self._index += 1
        return tokens

    def _maybe_split(self) -> tuple[CipherState, CipherState] | None:
        if self._index == len(self.pattern.messages):
            self._result = self.symmetric_state.split()
        return self._result

    def write_message(self, payload: bytes | Callable[[bytes], bytes]) -> bytes:
        """Next handshake message.  ``payload`` may be a function of the hash
        at the payload's position, so a quote in it can sign that hash."""
        ss = self.symmetric_state
        out = bytearray()
        for token in self._next_pattern(writing=True):
            if token == "e":
                if self.e is None:
                    self.e = generate_keypair()
                out += self.e.public
                ss.mix_hash(self.e.public)
            elif token == "s":
                if self.s is None:
                    raise NoiseError("local static key missing")
                out += ss.encrypt_and_hash(self.s.public)
            else:
                ss.mix_key(self._dh_token(token))
        self.payload_hash = ss.get_handshake_hash()
        if callable(payload):
            payload = payload(self.payload_hash)
        out += ss.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise NoiseError("handshake message exceeds 65535 bytes")
        self._maybe_split()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise NoiseError("handshake message exceeds 65535 bytes")
        ss = self.symmetric_state
        view = memoryview(message)
        pos = 0
        for token in self._next_pattern(writing=False):
            if token == "e":
                if len(view) - pos < DHLEN:
                    raise NoiseError("handshake message too short")
                self.re = bytes(view[pos : pos + DHLEN])
                pos += DHLEN
                ss.mix_hash(self.re)
            elif token == "s":
                n = DHLEN + (TAGLEN if ss.cipher_state.has_key() else 0)
                if len(view) - pos < n:
                    raise NoiseError("handshake message too short")
                self.rs = ss.decrypt_and_hash(bytes(view[pos : pos + n]))
                pos += n
            else:
                ss.mix_key(self._dh_token(token))
        self.payload_hash = ss.get_handshake_hash()
        payload = ss.decrypt_and_hash(bytes(view[pos:]))
        self._maybe_split()
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator) cipher states."""
        if self._result is None:
            raise NoiseError("handshake not finished")
        return self._result
