"""The attested handshake (sans-IO): preamble, Noise XX, certificate + quote.

Wire order (proto/PROTOCOL.md, "Handshake"):

    I -> R  frame(preamble)                      cleartext; also the prologue
    I -> R  frame(XX msg1: e)                    empty payload
    R -> I  frame(XX msg2: e, ee, s, es, P_R)    P_R = responder's attestation
    I -> R  frame(XX msg3: s, se, P_I)           P_I = initiator's attestation

The initiator picks the cipher; its choice is in the preamble, which is the
Noise prologue, so a changed choice breaks the handshake (downgrade detected).
Each attestation payload carries the certificate and a quote: an Ed25519
signature over the handshake hash at the payload's position and the
measurement, so a quote is bound to this one session.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from palm_net.channel.records import RecordReceiver, RecordSender
from palm_net.crypto.identity import (
    AgentIdentity,
    AttestationError,
    Certificate,
    make_quote,
    same_key,
    verify_quote,
)
from palm_net.crypto.noise import (
    CIPHERS,
    MAX_MESSAGE_LEN,
    CipherName,
    HandshakeState,
    KeyPair,
    NoiseError,
    aesgcm_available,
    protocol_name,
)
from palm_net.errors import ErrorCode, HandshakeError, LocalProtocolError, PalmError
from palm_net.wire.framing import FrameBuffer, frame

PROTOCOL_VERSION = 1
MAGIC = b"PALM"
PROLOGUE_LABEL = b"palm-net/handshake/v1\x00"
MAX_PREAMBLE = 64
MAX_PAYLOAD = 8192
# Handshake messages carry at most keys and an attestation payload: a peer
# cannot make a pending handshake buffer more than this.
MAX_HANDSHAKE_FRAME = MAX_PAYLOAD + 256


class Purpose(enum.IntEnum):
    """What the session is for; bound into the prologue."""

    MIGRATION = 1  # a VM migration, source -> destination
    RECOVERY = 2  # an in-doubt source asking the outcome of a migration
    DATA = 3  # one more channel of a migration's pages, bound to its MIGRATION session (proto 7.8)


class TransportMode(enum.IntEnum):
    SECURE = 0
    PLAIN_BENCHMARK = 1  # benchmark only: records unencrypted; never for protected VMs


def default_ciphers() -> tuple[CipherName, ...]:
    """AESGCM first where libsodium has AES-NI (faster), else ChaChaPoly only."""
    if aesgcm_available():
        return (CipherName.AESGCM, CipherName.CHACHAPOLY)
    return (CipherName.CHACHAPOLY,)


@dataclass(frozen=True, repr=False)
class ChannelConfig:
    identity: AgentIdentity
    certificate: Certificate
    authority_pub: bytes
    measurement: bytes
    allowed_measurements: frozenset[bytes]
    ciphers: tuple[CipherName, ...] = field(default_factory=default_ciphers)
    allow_plain: bool = False
    max_record: int = MAX_MESSAGE_LEN
    handshake_timeout: float = 10.0
    clock: Callable[[], float] = time.time

    def __repr__(self) -> str:
        return f"ChannelConfig(agent={self.identity.name!r}, ciphers={[c.value for c in self.ciphers]})"


@dataclass(frozen=True)
class PeerInfo:
    name: str
    static_pub: bytes
    sign_pub: bytes
    measurement: bytes


@dataclass(repr=False)
class HandshakeResult:
    peer: PeerInfo
    purpose: Purpose
    mode: TransportMode
    protocol_name: str
    handshake_hash: bytes
    sender: RecordSender
    receiver: RecordReceiver

    def __repr__(self) -> str:
        return f"HandshakeResult(peer={self.peer.name!r}, {self.protocol_name}, mode={self.mode.name})"


def encode_preamble(purpose: Purpose, mode: TransportMode, name: str) -> bytes:
    raw = name.encode("ascii")
    return MAGIC + bytes([PROTOCOL_VERSION, purpose, mode, len(raw)]) + raw


def decode_preamble(data: bytes) -> tuple[Purpose, TransportMode, str]:
    if len(data) < 8 or data[:4] != MAGIC:
        raise HandshakeError(ErrorCode.BAD_PREAMBLE, "not a palm_net peer")
    if data[4] != PROTOCOL_VERSION:
        raise HandshakeError(ErrorCode.VERSION, f"protocol version {data[4]} not supported (want {PROTOCOL_VERSION})")
    try:
        purpose, mode = Purpose(data[5]), TransportMode(data[6])
    except ValueError:
        raise HandshakeError(ErrorCode.BAD_PREAMBLE, "unknown purpose or mode") from None
    if len(data) != 8 + data[7]:
        raise HandshakeError(ErrorCode.BAD_PREAMBLE, "length mismatch")
    try:
        return purpose, mode, data[8:].decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError(ErrorCode.BAD_PREAMBLE, "protocol name not ascii") from None


def required_peer_role(initiator: bool) -> str:
    # The initiator sends the VM (or asks about one it sent): it is the source.
    return "destination" if initiator else "source"


class AttestedHandshake:
    """Drives one side of the handshake.  Feed bytes in, send what it returns."""

    def __init__(
        self,
        config: ChannelConfig,
        initiator: bool,
        purpose: Purpose | None = Purpose.MIGRATION,
        mode: TransportMode = TransportMode.SECURE,
        cipher: CipherName | None = None,
        ephemeral: KeyPair | None = None,
    ) -> None:
        """``purpose`` None (responder only): accept any purpose the peer names."""
        self.config = config
        self.initiator = initiator
        if purpose is None and initiator:
            raise ValueError("an initiator must name its purpose")
        self.purpose = purpose
        self.mode = mode
        self._frames = FrameBuffer(MAX_HANDSHAKE_FRAME)
        self._hs: HandshakeState | None = None
        self._preamble: bytes | None = None
        self._ephemeral = ephemeral  # fixed only by test vectors
        self.result: HandshakeResult | None = None
        self.peer: PeerInfo | None = None
        if purpose is not None and initiator:
            if mode is TransportMode.PLAIN_BENCHMARK and not config.allow_plain:
                raise LocalProtocolError(ErrorCode.PLAIN_NOT_ALLOWED, "plain benchmark mode is not enabled")
            chosen = cipher or config.ciphers[0]
            if chosen not in config.ciphers:
                raise LocalProtocolError(ErrorCode.CIPHER_NOT_ALLOWED, f"{chosen.value} not allowed locally")
            self._start(encode_preamble(purpose, mode, protocol_name("XX", chosen)))

    def __repr__(self) -> str:
        return f"AttestedHandshake(initiator={self.initiator}, done={self.result is not None})"

    @property
    def complete(self) -> bool:
        return self.result is not None

    @property
    def progress(self) -> int:
        """0: nothing valid yet; 1: a valid preamble; 2+: handshake messages processed."""
        if self._hs is None:
            return 0
        return 1 + self._hs.message_index

    def _start(self, preamble: bytes) -> None:
        self._preamble = preamble
        _, _, name = decode_preamble(preamble)
        try:
            self._hs = HandshakeState(
                name, self.initiator, PROLOGUE_LABEL + preamble, s=self.config.identity.static,
                e=self._ephemeral,
            )
        except NoiseError as exc:
            raise HandshakeError(ErrorCode.CIPHER_NOT_ALLOWED, str(exc)) from None

    def initiate(self) -> bytes:
        """Initiator: the preamble and the first handshake message."""
        assert self._hs is not None and self._preamble is not None and self.initiator
        return frame(self._preamble) + frame(self._hs.write_message(b""))

    def leftover(self) -> bytes:
        """Bytes received after the last handshake message (the first records)."""
        return self._frames.take_rest()

    # -- payloads

    def _payload(self, h: bytes) -> bytes:
        cfg = self.config
        out: bytes = msgpack.packb({
            "v": PROTOCOL_VERSION,
            "cert": cfg.certificate.encode(),
            "quote": make_quote(cfg.identity, h, cfg.measurement),
            "ciphers": [c.value for c in cfg.ciphers],
        })
        return out

    def _check_peer(self, payload: bytes, h: bytes, remote_static: bytes | None) -> PeerInfo:
        cfg = self.config
        try:
            obj = msgpack.unpackb(payload, raw=False, max_bin_len=MAX_PAYLOAD, max_str_len=256,
                                  max_array_len=8, max_map_len=8, strict_map_key=True)
        except Exception:
            raise AttestationError(ErrorCode.MALFORMED, "attestation payload is not msgpack") from None
        if (not isinstance(obj, dict) or set(obj) != {"v", "cert", "quote", "ciphers"}
                or obj["v"] != PROTOCOL_VERSION or not isinstance(obj["cert"], bytes)
                or not isinstance(obj["quote"], bytes) or not isinstance(obj["ciphers"], list)
                or not all(isinstance(c, str) for c in obj["ciphers"])):
            raise AttestationError(ErrorCode.MALFORMED, "attestation payload fields")
        cert = Certificate.decode(obj["cert"])
        cert.verify(cfg.authority_pub, cfg.clock())
        if remote_static is None or not same_key(cert.static_pub, remote_static):
            raise AttestationError(ErrorCode.KEY_MISMATCH,
                                   f"certificate of {cert.name!r} is for another static key")
        verify_quote(cert.sign_pub, h, cert.measurement, obj["quote"])
        if not any(same_key(cert.measurement, m) for m in cfg.allowed_measurements):
            raise AttestationError(ErrorCode.MEASUREMENT_NOT_ALLOWED,
                                   f"agent {cert.name!r} has measurement {cert.measurement.hex()[:16]}...")
        role = required_peer_role(self.initiator)
        if role not in cert.roles:
            raise AttestationError(ErrorCode.ROLE_NOT_ALLOWED, f"agent {cert.name!r} lacks role {role!r}")
        assert self._hs is not None
        cipher = self._hs.protocol_name.split("_")[3]
        if cipher not in obj["ciphers"]:
            raise AttestationError(ErrorCode.CIPHER_NOT_ALLOWED, f"peer does not allow {cipher}")
        return PeerInfo(cert.name, cert.static_pub, cert.sign_pub, cert.measurement)

    # -- the state machine

    def receive_data(self, data: bytes | bytearray) -> bytes:
        """Consumes handshake bytes; returns bytes to send (possibly empty).

        Raises HandshakeError on any failure; the caller closes the connection.
        """
        if self.result is not None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "handshake already complete")
        self._frames.feed(data)
        out = bytearray()
        try:
            while self.result is None:
                msg = self._frames.next_frame()
                if msg is None:
                    break
                out += self._on_frame(msg)
        except AttestationError as exc:
            raise HandshakeError(ErrorCode(exc.reason.value), exc.detail) from None
        except NoiseError as exc:
            raise HandshakeError(ErrorCode.HANDSHAKE_FAILED, str(exc)) from None
        except HandshakeError:
            raise
        except PalmError as exc:  # framing
            raise HandshakeError(exc.code, exc.detail) from None
        return bytes(out)

    def _on_frame(self, msg: bytes) -> bytes:
        cfg = self.config
        if self._hs is None:  # responder, first frame: the preamble
            if len(msg) > MAX_PREAMBLE:
                raise HandshakeError(ErrorCode.BAD_PREAMBLE, "preamble too long")
            purpose, mode, name = decode_preamble(msg)
            if self.purpose is not None and purpose is not self.purpose:
                raise HandshakeError(ErrorCode.PURPOSE,
                                     f"peer wants {purpose.name}, this endpoint serves {self.purpose.name}")
            self.purpose = purpose
            if mode is TransportMode.PLAIN_BENCHMARK and not cfg.allow_plain:
                raise HandshakeError(ErrorCode.PLAIN_NOT_ALLOWED, "plain benchmark mode is not enabled here")
            cipher = name.split("_")[3] if name.count("_") == 4 else ""
            if cipher not in CIPHERS or CipherName(cipher) not in cfg.ciphers:
                raise HandshakeError(ErrorCode.CIPHER_NOT_ALLOWED, f"{name} not allowed here")
            self.mode = mode
            self._start(msg)
            return b""
        hs = self._hs
        if hs.is_my_turn():
            raise HandshakeError(ErrorCode.HANDSHAKE_FAILED, "unexpected handshake message")
        payload = hs.read_message(msg)
        step = hs.message_index
        out = b""
        if self.initiator and step == 2:
            self.peer = self._check_peer(payload, hs.payload_hash, hs.rs)
            out = frame(hs.write_message(self._payload))
        elif not self.initiator and step == 1:
            if payload:
                raise HandshakeError(ErrorCode.HANDSHAKE_FAILED, "first message must have an empty payload")
            out = frame(hs.write_message(self._payload))
        elif not self.initiator and step == 3:
            self.peer = self._check_peer(payload, hs.payload_hash, hs.rs)
        if hs.finished:
            self._finish()
        return out

    def _finish(self) -> None:
        hs = self._hs
        assert hs is not None and self.peer is not None and self.purpose is not None
        c1, c2 = hs.split()
        plain = self.mode is TransportMode.PLAIN_BENCHMARK  # bulk data in the clear, the rest sealed
        send, recv = (c1, c2) if self.initiator else (c2, c1)
        self.result = HandshakeResult(
            peer=self.peer,
            purpose=self.purpose,
            mode=self.mode,
            protocol_name=hs.protocol_name,
            handshake_hash=hs.get_handshake_hash(),
            sender=RecordSender(send, plain=plain),
            receiver=RecordReceiver(recv, max_record=self.config.max_record, plain=plain),
        )
