"""The migration engine (sans-IO): what the source sends, what the destination checks.

Neither engine touches the network.  The source engine turns a VM into the
ordered message plaintexts of proto/PROTOCOL.md section 7 and decides, after
each round, whether to iterate or stop and copy.  The destination engine
takes message plaintexts and returns replies, applying pages to an incoming
VM and refusing to say READY unless it provably holds exactly what was sent.
The trio shell (palm_net.migration.runner) moves the bytes.
"""

from __future__ import annotations

import hmac
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from palm_net.channel.records import MAX_PLAINTEXT
from palm_net.hypervisor.backend import (
    KIND_NORMAL,
    KIND_PROTECTED,
    KIND_ZERO,
    PAGE_SIZE,
    Backend,
    HostedVM,
    HypervisorError,
    PageBatch,
    StreamBackend,
)
from palm_net.hypervisor.protection import IntegrityError
from palm_net.migration.store import HandoffStore
from palm_net.wire.errors import ProtocolError, public_reason
from palm_net.wire.messages import MAX_BLOB, MAX_PAGES_PER_MESSAGE, Message
from palm_net.wire.protocol import Role, SessionProtocol, State

# Page arrays + data of one PAGES message; the rest of a 65519-byte record
# is the msgpack envelope (measured < 120 bytes).
PAGES_BUDGET = MAX_PLAINTEXT - 256
ABORT_DOMAIN = b"palm-net/abort/v1\x00"
CONTEXT_CHUNK = MAX_BLOB
DOWNTIME_GOAL_DIVISOR = 6  # iterate on while shrinking, until expected downtime <= limit / 6


class MigrationFailure(Exception):
    """The migration cannot go on; ``code`` is an error code of proto/PROTOCOL.md."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


def describe(exc: BaseException, default_code: str) -> tuple[str, str]:
    """(code, one-line reason) of a MigrationFailure, a ProtocolError or anything else."""
    code = getattr(exc, "code", None) or default_code
    reason = getattr(exc, "reason", None) or getattr(exc, "detail", None) or str(exc) or type(exc).__name__
    return str(code), str(reason)


# --------------------------------------------------------------------------
# Parameters and statistics


@dataclass
class MigrationParams:
    downtime_limit: float = 0.300  # seconds
    max_rounds: int = 30
    max_factor: float = 3.0  # stop iterating after sending this many times the memory
    bandwidth: float | None = None  # bytes/s cap, None = unlimited
    auto_converge: bool = False
    plain: bool = False  # benchmark-only transport mode
    verify_digest: bool = False  # both sides digest memory while paused; COMMIT only if equal
    reply_timeout: float = 30.0  # seconds to wait for ACCEPT, READY and DONE

    def validate(self) -> None:
        if not 0 < self.downtime_limit <= 3600:
            raise ValueError("downtime limit must be between 0 and 3600 s")
        if not 1 <= self.max_rounds <= 10_000:
            raise ValueError("max rounds must be between 1 and 10000")
        if not 1.0 <= self.max_factor <= 1000:
            raise ValueError("max factor must be between 1 and 1000")
        if self.bandwidth is not None and self.bandwidth < 4096:
            raise ValueError("bandwidth cap must be at least 4 KiB/s")
        if not 0.1 <= self.reply_timeout <= 3600:
            raise ValueError("reply timeout must be between 0.1 and 3600 s")


@dataclass
class RoundStats:
    round: int
    pages: int  # page records sent
    bytes: int  # message bytes sent (before the AEAD tag and framing)
    duration: float
    dirty_pages: int  # pages dirtied during the round
    dirty_rate: float  # pages/s
    bandwidth: float  # bytes/s measured on the wire


@dataclass
class MigrationStats:
    status: str = "setup"
    phase: str = "setup"
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float | None = None
    expected_downtime: float | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    current_round: int = 0
    transferred: int = 0  # bytes on the wire, framing and tags included
    remaining: int = 0  # pages still to send in the current round
    zero_pages: int = 0
    normal_pages: int = 0
    protected_pages: int = 0
    page_records: int = 0
    bandwidth: float = 0.0
    throttle: float = 1.0
    digest: str | None = None  # memory digest at pause, when verify_digest was asked
    hypervisor: dict[str, Any] | None = None  # a stream backend's own figures (QEMU's query-migrate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------
# Abort tokens: the destination's promise never to activate a migration.


def make_abort_token(signing: SigningKey, mid: bytes) -> bytes:
    return signing.sign(ABORT_DOMAIN + mid).signature


def check_abort_token(sign_pub: bytes, mid: bytes, token: bytes) -> bool:
    try:
        VerifyKey(sign_pub).verify(ABORT_DOMAIN + mid, token)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------
# Source


class _SourceBase:
    """What every source engine shares: BEGIN, and the verification and handoff messages."""

    backend = "model"

    def __init__(self, vm: HostedVM, mid: bytes, params: MigrationParams, stats: MigrationStats | None = None) -> None:
        self.info = vm.info
        self.params = params
        self.proto = SessionProtocol(Role.SOURCE, mid)
        self.stats = stats or MigrationStats()
        self.round = 0
        self.sent_bytes = 0
        self.paused_at: float | None = None
        self.digest: str | None = None
        self._hosted = vm

    @property
    def mid(self) -> bytes:
        assert self.proto.mid is not None
        return self.proto.mid

    def spec(self) -> bytes:
        return b""

    def begin(self) -> bytes:
        if self.params.plain and self.info.protected_pages:
            raise MigrationFailure("plain-refused",
                                   "a VM with protected processes never migrates over the plain benchmark mode")
        return self.proto.send("BEGIN", vm=self.info.name, vm_id=self.info.vm_id, pages=self.info.npages,
                               protected_pages=self.info.protected_pages, processes=self.info.processes,
                               vcpus=self.info.vcpus, plain=self.params.plain, digest=self.params.verify_digest,
                               backend=self.backend, spec=self.spec())

    def receive(self, data: bytes) -> Message:
        return self.proto.receive(data)

    def complete(self, records_sent: int, transcript: bytes) -> bytes:
        self.stats.phase = "verify"
        return self.proto.send("COMPLETE", records=records_sent, page_records=self.stats.page_records,
                               transcript=transcript)

    def digest_paused(self) -> None:
        """With verify_digest: our memory digest, taken while the VM is paused
        (the runner overlaps it with the destination's verification)."""
        if self.params.verify_digest:
            self.digest = self.stats.digest = self._hosted.digest()

    def check_ready(self, msg: Message) -> None:
        """With verify_digest: the destination's memory must equal ours at pause."""
        if self.params.verify_digest:
            theirs = msg.body["digest"]
            if self.digest is None or not hmac.compare_digest(theirs, bytes.fromhex(self.digest)):
                raise MigrationFailure("digest-mismatch", "destination memory differs from the source at pause")

    def commit(self) -> bytes:
        self.stats.phase = "commit"
        return self.proto.send("COMMIT")

    def abort(self, code: str, reason: str) -> bytes | None:
        """ABORT if the state machine still allows the source to send one."""
        try:
            return self.proto.send("ABORT", code=code[:64], reason=public_reason(code), token=b"")
        except ProtocolError:
            return None


class SourceEngine(_SourceBase):
    """A page backend's migration: pre-copy rounds of page records, then stop-and-copy."""

    def __init__(self, vm: Backend, mid: bytes, params: MigrationParams, stats: MigrationStats | None = None) -> None:
        super().__init__(vm, mid, params, stats)
        self.vm = vm
        self.pending: Any = range(self.info.npages)  # round 0: every page
        self._hot_rounds = 0
        self._last_dirty: int | None = None

    def start(self) -> bytes:
        """After ACCEPT: turn on dirty logging; returns KEYS, the first message
        of the stream (round 0, reading every page, follows)."""
        self.vm.enable_dirty_log()
        self.stats.status = "active"
        self.stats.phase = "round"
        return self.proto.send("KEYS", data=self.vm.export_keys())

    def page_messages(self) -> Iterator[bytes]:
        """PAGES messages for the current round's pending gfns."""
        gfns, n, i = self.pending, len(self.pending), 0
        st = self.stats
        while i < n:
            batch, i = self.vm.read_pages(gfns, i, self.round, PAGES_BUDGET, MAX_PAGES_PER_MESSAGE)
            msg = self._pages_message(batch)
            st.remaining = n - i
            yield msg

    def _pages_message(self, batch: PageBatch) -> bytes:
        st = self.stats
        kinds = batch.kinds
        zero = kinds.count(KIND_ZERO)
        prot = kinds.count(KIND_PROTECTED)
        st.zero_pages += zero
        st.protected_pages += prot
        st.normal_pages += len(kinds) - zero - prot
        st.page_records += 1
        msg = self.proto.send("PAGES", round=self.round, gfns=batch.gfns.tobytes(), kinds=kinds,
                              vers=batch.vers.tobytes(), data=batch.data, tags=batch.tags)
        self.sent_bytes += len(msg)
        return msg

    def end_round(self, duration: float, wire_bytes: int) -> tuple[bytes, bool]:
        """Closes the round: ROUND_END and whether to stop and copy now."""
        dirty = self.vm.collect_dirty()
        p = self.params
        bandwidth = wire_bytes / duration if duration > 0 else float("inf")
        if p.bandwidth:
            bandwidth = min(bandwidth, p.bandwidth)
        rs = RoundStats(self.round, len(self.pending), wire_bytes, duration, len(dirty),
                        len(dirty) / duration if duration > 0 else 0.0, bandwidth)
        self.stats.rounds.append(rs)
        self.stats.bandwidth = bandwidth
        expected = len(dirty) * PAGE_SIZE / bandwidth if bandwidth > 0 else float("inf")
        self.stats.expected_downtime = expected
        msg = self.proto.send("ROUND_END", round=self.round, pages=len(self.pending), dirty=len(dirty))
        memory = self.info.npages * PAGE_SIZE
        # QEMU/Xen stop as soon as the rest fits the limit.  We also go on while
        # a round at least halves the dirty set and the expected downtime is
        # above a sixth of the limit: a hot set then costs one short extra
        # round instead of a long pause.
        fits = expected <= p.downtime_limit
        shrinking = self._last_dirty is None or len(dirty) <= self._last_dirty // 2
        converged = fits and (expected <= p.downtime_limit / DOWNTIME_GOAL_DIVISOR or not shrinking)
        stop = converged or self.round + 1 >= p.max_rounds or self.sent_bytes >= p.max_factor * memory
        self._last_dirty = len(dirty)
        if p.auto_converge and not stop:
            # QEMU's rule: throttle when the guest dirtied over half of what we sent, twice running.
            self._hot_rounds = self._hot_rounds + 1 if len(dirty) * PAGE_SIZE > wire_bytes / 2 else 0
            if self._hot_rounds >= 2:
                step = 0.2 if self.stats.throttle == 1.0 else 0.1
                self.stats.throttle = max(0.01, self.stats.throttle - step)
                self.vm.set_throttle(self.stats.throttle)
                self._hot_rounds = 0
        self.pending = dirty
        self.round += 1
        self.stats.current_round = self.round
        return msg, stop

    def stop_and_copy(self) -> Iterator[bytes]:
        """Pauses the VM and yields the last pages, the CPU state and the context blob."""
        self.stats.phase = "stop-and-copy"
        self.vm.pause()
        self.paused_at = time.monotonic()
        # The last round's dirty set (collected when we decided to stop) plus
        # whatever the guest wrote until the pause.
        self.pending = array("I", sorted(set(self.pending).union(self.vm.collect_dirty())))
        self.vm.disable_dirty_log()
        self.stats.current_round = self.round
        yield from self.page_messages()
        yield self.proto.send("CPU_STATE", state=self.vm.export_cpu_state())
        blob = self.vm.export_protection()
        chunks = [blob[i : i + CONTEXT_CHUNK] for i in range(0, len(blob), CONTEXT_CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            yield self.proto.send("CONTEXT", index=i, total=len(chunks), data=chunk)


class StreamSourceEngine(_SourceBase):
    """A stream backend's migration (QEMU): the hypervisor runs its own rounds
    and stop-and-copy; its stream travels as STREAM records, then STREAM_END."""

    backend = "qemu"

    def __init__(self, vm: StreamBackend, mid: bytes, params: MigrationParams, stats: MigrationStats | None = None,
                 spec: bytes = b"") -> None:
        super().__init__(vm, mid, params, stats)
        self.vm = vm
        self._spec = spec
        self.stream_bytes = 0

    def spec(self) -> bytes:
        return self._spec

    def stream_messages(self) -> Iterator[bytes]:
        """After ACCEPT: STREAM records until the hypervisor completes, then STREAM_END."""
        st, p = self.stats, self.params
        st.status, st.phase = "active", "stream"
        try:
            for chunk in self.vm.stream_out(MAX_BLOB, p.downtime_limit, p.bandwidth, p.auto_converge):
                self.stream_bytes += len(chunk)
                st.page_records += 1
                msg = self.proto.send("STREAM", data=chunk)
                self.sent_bytes += len(msg)
                yield msg
        except HypervisorError as exc:
            raise MigrationFailure("hypervisor", str(exc)) from None
        self.paused_at = self.vm.paused_at
        st.phase = "stop-and-copy"
        self._merge_stats(self.vm.last_stats)
        yield self.proto.send("STREAM_END", bytes=self.stream_bytes)

    def _merge_stats(self, info: dict[str, Any]) -> None:
        """QEMU's query-migrate figures into the migration record."""
        ram = info.get("ram") or {}
        st = self.stats
        st.hypervisor = {
            "status": info.get("status"), "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"), "rounds": ram.get("dirty-sync-count"),
            "transferred": ram.get("transferred"), "duplicate_pages": ram.get("duplicate"),
            "normal_pages": ram.get("normal"), "mbps": ram.get("mbps"), "stream_bytes": self.stream_bytes,
        }
        st.zero_pages = int(ram.get("duplicate") or 0)
        st.normal_pages = int(ram.get("normal") or 0)
        st.current_round = self.round = int(ram.get("dirty-sync-count") or 0)


# --------------------------------------------------------------------------
# Destination


class DestinationEngine:
    """Checks and applies an incoming migration; never READY unless all verifies."""

    def __init__(
        self,
        make_vm: Callable[[Message], HostedVM],
        store: HandoffStore,
        signing: SigningKey,
        peer_name: str,
        peer_static: bytes,
        peer_sign: bytes,
        plain_session: bool,
        max_pages: int,
        admit: Callable[[bytes, int], Callable[[], None]] | None = None,
    ) -> None:
        """``admit(peer_static, bytes)`` takes this migration's place in the
        agent's limits or raises MigrationFailure; it returns the release."""
        self.proto = SessionProtocol(Role.DESTINATION)
        self.make_vm = make_vm
        self.admit = admit
        self.release: Callable[[], None] | None = None  # our admission, until the session is settled
        self.row_created = False  # the store row of this migration is ours (not a replayed id's)
        self.store = store
        self.signing = signing
        self.peer = (peer_name, peer_static, peer_sign)
        self.plain_session = plain_session
        self.max_pages = max_pages
        self.vm: HostedVM | None = None
        self.vm_name: str | None = None
        self.stream = False  # a stream backend (QEMU): STREAM records instead of pages
        self.stream_end: int | None = None  # STREAM_END's byte count
        self.npages = 0
        self.expected_protected = 0
        self.applied: array[int] = array("Q")
        self.received = bytearray()
        self.page_records = 0
        self.round = 0
        self.cpu_state_seen = False
        self.want_digest = False
        self.context = bytearray()
        self.context_total = 0
        self.context_limit = 0
        self.outcome: str | None = None  # prepared, committed, aborted
        self.error: MigrationFailure | None = None

    @property
    def mid(self) -> bytes | None:
        return self.proto.mid

    @property
    def state(self) -> State:
        return self.proto.state

    def receive(self, data: bytes, transcript_before: bytes, records_before: int,
                authenticated: bool = True) -> list[bytes]:
        """Handles one message; returns the replies.  Raises ProtocolError or
        MigrationFailure, after which the shell calls ``fail``."""
        msg = self.proto.receive(data, authenticated)
        handler = self._handlers.get(msg.type)
        if handler is None:  # the session protocol lets through only what a destination handles
            raise MigrationFailure("out-of-state", f"{msg.type} is not for a destination")
        return handler(self, msg, transcript_before, records_before)

    def _pages(self) -> Backend:
        # The session protocol admits page messages only after a page backend's BEGIN.
        assert self.vm is not None and not self.stream
        return cast(Backend, self.vm)

    def _streamer(self) -> StreamBackend:
        assert self.vm is not None and self.stream
        return cast(StreamBackend, self.vm)

    # -- handlers

    def _on_begin(self, msg: Message, *_: Any) -> list[bytes]:
        """Checks, then admission, then the VM, then the store row: a refused
        BEGIN writes nothing and holds nothing (no row, no slot, no memory)."""
        b = msg.body
        if b["plain"] != self.plain_session:
            raise MigrationFailure("mode-mismatch", "BEGIN's plain flag disagrees with the session mode")
        if b["plain"] and b["protected_pages"]:
            raise MigrationFailure("plain-refused", "a VM with protected processes cannot use the plain mode")
        if not 1 <= b["pages"] <= self.max_pages:
            raise MigrationFailure("too-large", f"VM of {b['pages']} pages exceeds this agent's limit")
        if b["protected_pages"] > b["pages"] or b["processes"] > b["protected_pages"]:
            raise MigrationFailure("malformed", "inconsistent protected page counts")
        self.stream = bool(self.proto.stream)
        if self.stream and b["protected_pages"]:
            raise MigrationFailure("malformed", "a stream backend carries no protected processes")
        if self.store.get(msg.mid) is not None:  # a replayed, committed or aborted-forever id
            raise MigrationFailure("replay", "migration id already used on this agent")
        name, static, sign = self.peer
        if self.admit is not None:
            self.release = self.admit(static, b["pages"] * PAGE_SIZE)
        try:
            self.vm = self.make_vm(msg)  # may raise MigrationFailure (name taken, no room)
        except BaseException:
            self._release()
            raise
        try:
            self.store.create(msg.mid, "destination", b["vm"], b["vm_id"], name, "", static, sign, "receiving")
        except Exception:  # the same id BEGUN concurrently in another session
            raise MigrationFailure("replay", "migration id already used on this agent") from None
        self.row_created = True
        self.vm_name = b["vm"]
        self.npages = b["pages"]
        self.expected_protected = b["protected_pages"]
        self.want_digest = b["digest"]
        if self.stream:
            return [self.proto.send("ACCEPT")]
        self.applied = array("Q", bytes(8 * self.npages))
        self.received = bytearray(self.npages)
        # gfn u32 + version u64 + tag 16 per protected page, plus keys and thread contexts.
        self.context_limit = 28 * b["protected_pages"] + 2048 * b["processes"] + 65536
        return [self.proto.send("ACCEPT")]

    def _release(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None

    def _on_keys(self, msg: Message, *_: Any) -> list[bytes]:
        vm = self._pages()
        if self.page_records:
            raise MigrationFailure("out-of-state", "KEYS after the first page record")
        vm.import_keys(msg.body["data"])
        if vm.info.protected_pages != self.expected_protected:
            raise MigrationFailure("malformed", "key layout disagrees with BEGIN's protected page count")
        return []

    def _on_pages(self, msg: Message, *_: Any) -> list[bytes]:
        b = msg.body
        gb, kinds, vb, data = b["gfns"], b["kinds"], b["vers"], b["data"]
        n = len(kinds)
        if n == 0 or len(gb) != 8 * n or len(vb) != 8 * n:
            raise MigrationFailure("malformed", "PAGES arrays disagree in length")
        if b["round"] < self.round:
            raise MigrationFailure("rollback", f"page record of round {b['round']} after round {self.round}")
        self.round = b["round"]
        gfns, vers = array("Q", gb), array("Q", vb)
        ndata = n - kinds.count(KIND_ZERO)
        if kinds.count(KIND_NORMAL) + kinds.count(KIND_PROTECTED) != ndata:
            raise MigrationFailure("malformed", "unknown page kind")
        if len(data) != ndata * PAGE_SIZE:
            raise MigrationFailure("malformed", "PAGES data length disagrees with its kinds")
        if len(b["tags"]) != 16 * kinds.count(KIND_PROTECTED):
            raise MigrationFailure("malformed", "PAGES tags disagree with its protected pages")
        # One pass checks and records; if the batch then fails to apply, the
        # session is over anyway and these arrays are discarded with it.
        applied, received, npages = self.applied, self.received, self.npages
        for gfn, ver in zip(gfns, vers):
            if gfn >= npages:
                raise MigrationFailure("malformed", f"gfn {gfn} outside the VM")
            if ver < applied[gfn]:
                raise MigrationFailure("rollback", f"page {gfn} version {ver} older than applied {applied[gfn]}")
            applied[gfn] = ver
            received[gfn] = 1
        try:
            self._pages().write_pages(PageBatch(gfns, kinds, vers, data, b["tags"]))
        except IntegrityError as exc:
            raise MigrationFailure("integrity", str(exc)) from None
        self.page_records += 1
        return []

    def _on_round_end(self, msg: Message, *_: Any) -> list[bytes]:
        return []

    def _on_stream(self, msg: Message, *_: Any) -> list[bytes]:
        try:
            self._streamer().stream_in(msg.body["data"])
        except HypervisorError as exc:
            raise MigrationFailure("hypervisor", str(exc)) from None
        self.page_records += 1
        return []

    def _on_stream_end(self, msg: Message, *_: Any) -> list[bytes]:
        vm = self._streamer()
        if msg.body["bytes"] != vm.stream_received:
            raise MigrationFailure("incomplete", f"{vm.stream_received} stream bytes received, "
                                                 f"{msg.body['bytes']} sent")
        try:
            vm.end_stream()  # the hypervisor loaded all of it and holds the guest paused
        except HypervisorError as exc:
            raise MigrationFailure("hypervisor", str(exc)) from None
        self.stream_end = msg.body["bytes"]
        return []

    def _on_cpu_state(self, msg: Message, *_: Any) -> list[bytes]:
        self._pages().import_cpu_state(msg.body["state"])
        self.cpu_state_seen = True
        return []

    def _on_context(self, msg: Message, *_: Any) -> list[bytes]:
        if len(self.context) + len(msg.body["data"]) > self.context_limit:
            raise MigrationFailure("oversize", "protected-context blob larger than the VM can need")
        self.context += msg.body["data"]
        self.context_total = msg.body["total"]
        return []

    def _on_complete(self, msg: Message, transcript_before: bytes, records_before: int) -> list[bytes]:
        b = msg.body
        assert self.vm is not None
        if not hmac.compare_digest(b["transcript"], transcript_before) or b["records"] != records_before:
            raise MigrationFailure("incomplete", "record count or running hash differs from what was received")
        if b["page_records"] != self.page_records:
            raise MigrationFailure("incomplete", f"{self.page_records} page records applied, "
                                                 f"{b['page_records']} sent")
        if self.stream:
            if self.stream_end is None:
                raise MigrationFailure("incomplete", "the stream never ended")
        else:
            self._check_pages_complete()
        assert self.mid is not None
        self.vm.sync()
        if not self.store.transition(self.mid, ("receiving",), "prepared"):
            raise MigrationFailure("state", "migration is no longer receiving (aborted?)")
        self.outcome = "prepared"
        digest = bytes.fromhex(self.vm.digest()) if self.want_digest else b""
        return [self.proto.send("READY", digest=digest)]

    def _check_pages_complete(self) -> None:
        vm = self._pages()
        if self.proto.context_parts != self.context_total:
            raise MigrationFailure("incomplete", "protected-context blob is missing chunks")
        if self.received.count(0):
            raise MigrationFailure("incomplete", f"{self.received.count(0)} pages never received")
        if not self.cpu_state_seen:
            raise MigrationFailure("incomplete", "no CPU state")
        # Every protected page was verified against its MAC on arrival (and only
        # ciphertext was accepted on protected gfns); the final metadata must
        # name exactly those versions and MACs.
        try:
            vm.import_protection(bytes(self.context))
        except IntegrityError as exc:
            raise MigrationFailure("integrity", str(exc)) from None
        self.context = bytearray()
        if vm.info.protected_pages != self.expected_protected:
            raise MigrationFailure("incomplete", "protected page count differs from BEGIN")

    def _on_commit(self, msg: Message, *_: Any) -> list[bytes]:
        assert self.mid is not None and self.vm is not None
        if not self.store.transition(self.mid, ("prepared",), "committed"):
            # We already aborted (timeout, shutdown, a recovery query): the promise stands.
            self._discard("commit after abort")
            return [self.proto.send("ABORT", code="aborted", reason=public_reason("aborted"),
                                    token=self._abort_token())]
        self.outcome = "committed"
        self.vm.activate()
        return [self.proto.send("DONE")]

    def _on_abort(self, msg: Message, *_: Any) -> list[bytes]:
        self._discard(f"source aborted: {msg.body['code']}: {msg.body['reason']}")
        return []

    def _abort_token(self) -> bytes:
        """The destination's signed promise never to activate this migration:
        only for a migration recorded here as aborted, from this very peer."""
        if self.mid is None:
            return b""
        row = self.store.get(self.mid)
        if (row is None or row.role != "destination" or row.state != "aborted"
                or not hmac.compare_digest(row.peer_static, self.peer[1])):
            return b""
        return make_abort_token(self.signing, self.mid)

    def _discard(self, error: str) -> None:
        if self.mid is not None and self.row_created:  # never another session's row (a replayed id)
            self.store.transition(self.mid, ("receiving", "prepared"), "aborted", error=error[:500])
        if self.vm is not None:
            self.vm.scrub()
            self.vm = None
        self.outcome = "aborted"

    def fail(self, code: str, reason: str) -> bytes | None:
        """After an error: scrub what was received, persist aborted, and return
        ABORT for the source if the state machine still allows it (the reason
        on the wire is the code's generic text; ``reason`` stays in our log)."""
        if self.outcome == "committed":
            return None  # the VM runs here; a late error changes nothing
        self._discard(f"{code}: {reason}")
        self.error = MigrationFailure(code, reason)
        if self.proto.state in (State.IDLE, State.DONE, State.ABORTED, State.CLOSED):
            return None
        try:
            return self.proto.send("ABORT", code=code[:64], reason=public_reason(code), token=self._abort_token())
        except ProtocolError:
            return None

    _handlers: dict[str, Callable[[DestinationEngine, Message, bytes, int], list[bytes]]] = {
        "BEGIN": _on_begin, "KEYS": _on_keys, "PAGES": _on_pages, "ROUND_END": _on_round_end,
        "STREAM": _on_stream, "STREAM_END": _on_stream_end, "CPU_STATE": _on_cpu_state, "CONTEXT": _on_context,
        "COMPLETE": _on_complete, "COMMIT": _on_commit, "ABORT": _on_abort,
    }
