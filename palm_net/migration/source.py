"""The source engine (sans-IO): what the source sends, in what order, and when to stop iterating.

It owns the session protocol of one outgoing migration and turns what the
shell read from the hypervisor (page batches, dirty sets, the CPU state and
protected-context blob, a stream backend's bytes) into the messages of
proto/PROTOCOL.md 7.1-7.4 and 7.7.  After each pre-copy round it decides
whether to iterate or stop and copy.  It reads no clock (the shell passes
``now``), touches no VM, socket or store.
"""

from __future__ import annotations

import hmac
from typing import Any

import numpy as np

from palm_net.channel.records import Record
from palm_net.migration.params import DOWNTIME_PHASES, MigrationParams, MigrationStats, RoundStats
from palm_net.wire.errors import ErrorCode, LocalProtocolError, MigrationFailure, public_reason
from palm_net.wire.messages import (
    MAX_BLOB,
    PAGE_SIZE,
    Abort,
    Accept,
    Begin,
    Body,
    Commit,
    Complete,
    Context,
    CpuState,
    Done,
    Keys,
    Message,
    Ready,
    RoundEnd,
    Stream,
    StreamEnd,
)
from palm_net.wire.pages import KIND_PROTECTED, KIND_ZERO, Buffer, Gfns, PageBatch, PageRange, RoundGfns
from palm_net.wire.protocol import Role, SessionProtocol

DOWNTIME_GOAL_DIVISOR = 30  # iterate on while shrinking, until expected downtime <= limit / 30
CONTEXT_CHUNK = MAX_BLOB


PACING_BURST = 0.05  # seconds of the bandwidth cap an idle sender may save up


class Pacer:
    """The bandwidth cap as a token bucket: the bytes let through never run ahead of
    ``cap`` a second, and an idle sender saves up at most PACING_BURST seconds of
    it.  Sans-IO: it says how long to wait."""

    def __init__(self, cap: float, now: float) -> None:
        self.cap = cap
        self.ahead = 0.0  # seconds the bytes let through are ahead of the cap (negative: credit)
        self.last = now

    def sent(self, size: int, now: float) -> float:
        """``size`` bytes went out at ``now``: the seconds to wait before the next send."""
        self.ahead = max(self.ahead - (now - self.last), -PACING_BURST) + size / self.cap
        self.last = now
        return max(self.ahead, 0.0)


class SourceEngine:
    """One outgoing migration: BEGIN, the VM's memory (page rounds, or a stream),
    COMPLETE, and the handoff messages.  ``info``: the VM's VmInfo."""

    def __init__(self, mid: bytes, info: Any, params: MigrationParams, stream: bool = False, spec: bytes = b"",
                 stats: MigrationStats | None = None) -> None:
        self.proto = SessionProtocol(Role.SOURCE, mid)
        self.info = info
        self.params = params
        self.stream = stream
        self.spec = spec
        self.stats = stats or MigrationStats()
        self.stats.downtime_limit = params.downtime_limit
        self.round = 0
        self.sent_bytes = 0  # message bytes of the VM's memory (before tags and framing)
        self.stream_bytes = 0
        self.pending: RoundGfns = PageRange(info.npages)  # gfns of the current round; round 0: all
        self.paused_at: float | None = None
        self.digest: str | None = None
        self.committed = False  # COMMIT was made: from here only the destination's word settles it
        self._last_dirty: int | None = None
        self._hot_rounds = 0

    def __repr__(self) -> str:
        return f"SourceEngine({self.proto.state.value}, round={self.round})"

    @property
    def mid(self) -> bytes:
        assert self.proto.mid is not None
        return self.proto.mid

    # -- the session

    def begin(self) -> bytes:
        p, i = self.params, self.info
        if p.plain and i.protected_pages:
            raise MigrationFailure(ErrorCode.PLAIN_REFUSED,
                                   "a VM with protected processes never migrates over the plain benchmark mode")
        return self.proto.send(Begin(i.name, i.vm_id, i.npages, i.protected_pages, i.processes, i.vcpus, p.plain,
                                     p.verify_digest, "qemu" if self.stream else "model", self.spec))

    def on_record(self, rec: Record) -> Message:
        """A message from the destination.  An ABORT before the handoff point ends
        the migration (MigrationFailure with the destination's code)."""
        msg = self.proto.receive_message(rec.data, rec.authenticated)
        if isinstance(msg.body, Abort) and not self.committed:  # after COMMIT: the token decides (runner)
            raise MigrationFailure(_code(msg.body.code), "destination aborted: " + msg.body.reason)
        return msg

    def expect(self, msg: Message, cls: type[Body]) -> None:
        if not isinstance(msg.body, cls):
            raise MigrationFailure(ErrorCode.OUT_OF_STATE, f"expected {cls.TYPE}, got {msg.type}")

    def accepted(self, msg: Message) -> None:
        self.expect(msg, Accept)

    # -- a page backend: keys, rounds, stop-and-copy

    def keys(self, blob: bytes) -> bytes:
        """The first message after ACCEPT (dirty logging is on): the process keys."""
        self.stats.status, self.stats.phase = "active", "round"
        return self.proto.send(Keys(blob))

    def pages(self, batch: PageBatch, remaining: int) -> list[Buffer]:
        """A PAGES message for a batch the shell read from the current round's gfns,
        then its data records (views of the batch's data)."""
        st = self.stats
        kinds = batch.kinds
        zero, prot = kinds.count(KIND_ZERO), kinds.count(KIND_PROTECTED)  # bytes.count: C speed
        st.zero_pages += zero
        st.protected_pages += prot
        st.normal_pages += len(kinds) - zero - prot
        st.page_records += 1
        st.remaining = remaining
        st.round_pages = len(self.pending)
        msg = self.proto.send(batch.message(self.round))
        data = b"".join(batch.data) if isinstance(batch.data, list) else batch.data
        self.sent_bytes += len(msg) + len(data)
        return [msg, *self.proto.send_data(data)] if data else [msg]

    def end_round(self, duration: float, wire_bytes: int, dirty: Gfns) -> tuple[bytes, bool, float | None]:
        """Closes the round: ROUND_END, whether to stop and copy now, and a new
        throttle for the guest (auto-converge) or None."""
        p, st = self.params, self.stats
        n = len(dirty)
        bandwidth = wire_bytes / duration if duration > 0 else float("inf")
        if p.bandwidth:
            bandwidth = min(bandwidth, p.bandwidth)
        st.rounds.append(RoundStats(self.round, len(self.pending), wire_bytes, duration, n,
                                    n / duration if duration > 0 else 0.0, bandwidth))
        st.bandwidth = bandwidth
        expected = n * PAGE_SIZE / bandwidth if bandwidth > 0 else float("inf")
        st.expected_downtime = expected
        msg = self.proto.send(RoundEnd(self.round, len(self.pending), n))
        # QEMU/Xen stop as soon as the rest fits the limit.  We also go on while
        # a round at least halves the dirty set and the expected downtime is
        # above a thirtieth of the limit (10 ms by default, about what a pause
        # costs anyway): a round that halves the rest is short, and the pause
        # then holds little more than its fixed costs.
        fits = expected <= p.downtime_limit
        shrinking = self._last_dirty is None or n <= self._last_dirty // 2
        converged = fits and (expected <= p.downtime_limit / DOWNTIME_GOAL_DIVISOR or not shrinking)
        memory = self.info.npages * PAGE_SIZE
        cap = ("max-rounds" if self.round + 1 >= p.max_rounds
               else "max-factor" if self.sent_bytes >= p.max_factor * memory else None)
        stop = converged or (cap is not None and p.downtime_policy != "continue")
        self._last_dirty = n
        throttle = None
        if cap and not fits and p.downtime_policy == "abort":
            raise MigrationFailure(ErrorCode.CANCELLED, f"expected downtime {expected * 1000:.0f} ms is above the "
                                   f"{p.downtime_limit * 1000:.0f} ms limit at {cap} (downtime policy abort)")
        if cap and not fits and p.downtime_policy == "throttle":
            # Past the cap: one throttle step a round until the rest fits; at the
            # last step, pause anyway.
            if st.throttle <= 0.01:
                stop, cap = True, "max-throttle"
            else:
                stop, throttle = False, max(0.01, st.throttle - (0.2 if st.throttle == 1.0 else 0.1))
                st.throttle = throttle
        if stop:
            st.stop_reason = "converged" if fits else (cap or "converged")
        if p.auto_converge and not stop and throttle is None:
            # QEMU's rule: throttle when the guest dirtied over half of what we sent, twice running.
            self._hot_rounds = self._hot_rounds + 1 if n * PAGE_SIZE > wire_bytes / 2 else 0
            if self._hot_rounds >= 2:
                step = 0.2 if st.throttle == 1.0 else 0.1
                throttle = st.throttle = max(0.01, st.throttle - step)
                self._hot_rounds = 0
        self.pending = dirty
        self.round += 1
        st.current_round = self.round
        return msg, stop, throttle

    def stop_and_copy(self, now: float, dirty_at_pause: Gfns) -> Gfns:
        """The guest is paused (at ``now``): the gfns of the last copy, which are the
        last round's dirty set plus whatever the guest wrote until the pause."""
        self.stats.phase = "stop-and-copy"
        self.paused_at = now
        pending = np.union1d(np.asarray(self.pending), dirty_at_pause).astype(np.uint64)
        self.pending = pending
        self.stats.current_round = self.round
        return pending

    def end_final_round(self, duration: float, wire_bytes: int) -> None:
        """The stop-and-copy round is sent (its pages, CPU state and blob): counted as a round."""
        bandwidth = wire_bytes / duration if duration > 0 else 0.0
        self.stats.rounds.append(RoundStats(self.round, len(self.pending), wire_bytes, duration, 0, 0.0, bandwidth,
                                            paused=True))

    def final_state(self, cpu_state: bytes, blob: bytes) -> list[bytes]:
        """CPU_STATE and the protected-context blob in CONTEXT chunks (the guest is paused)."""
        out = [self.proto.send(CpuState(cpu_state))]
        chunks = [blob[i : i + CONTEXT_CHUNK] for i in range(0, len(blob), CONTEXT_CHUNK)] or [b""]
        out += [self.proto.send(Context(i, len(chunks), chunk)) for i, chunk in enumerate(chunks)]
        return out

    # -- a stream backend: the hypervisor's own stream

    def stream_chunk(self, data: Buffer) -> list[Buffer]:
        """The next bytes of the hypervisor's stream: a STREAM message, then its data records."""
        st = self.stats
        st.status, st.phase = "active", "stream"
        self.stream_bytes += len(data)
        st.page_records += 1
        msg = self.proto.send(Stream(len(data)))
        self.sent_bytes += len(msg) + len(data)
        return [msg, *self.proto.send_data(data)]

    def stream_end(self, paused_at: float | None, hypervisor_stats: dict[str, Any]) -> bytes:
        """The hypervisor completed (its guest paused at ``paused_at``): STREAM_END."""
        self.paused_at = paused_at
        self.stats.phase = "stop-and-copy"
        self._merge_stats(hypervisor_stats)
        return self.proto.send(StreamEnd(self.stream_bytes))

    def _merge_stats(self, info: dict[str, Any]) -> None:
        """QEMU's query-migrate figures into the migration record."""
        ram = info.get("ram") or {}
        st = self.stats
        st.hypervisor = {
            "status": info.get("status"), "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"), "rounds": ram.get("dirty-sync-count"),
            "transferred": ram.get("transferred"), "duplicate_pages": ram.get("duplicate"),
            "normal_pages": ram.get("normal"), "mbps": ram.get("mbps"), "stream_bytes": self.stream_bytes,
            "digest_excluded": info.get("palm-digest-excluded") or [],  # kvmclock areas (proto 7.7)
        }
        st.zero_pages = int(ram.get("duplicate") or 0)
        st.normal_pages = int(ram.get("normal") or 0)
        st.current_round = self.round = int(ram.get("dirty-sync-count") or 0)

    # -- verification and the handoff

    def complete(self, records_sent: int, transcript: bytes) -> bytes:
        self.stats.phase = "verify"
        return self.proto.send(Complete(records_sent, self.stats.page_records, transcript))

    def check_ready(self, msg: Message, digest: str | None) -> None:
        """READY, and with verify_digest the destination's memory equals ours at pause."""
        self.expect(msg, Ready)
        self.digest = self.stats.digest = digest
        if self.params.verify_digest:
            theirs = msg.get(Ready).digest
            if digest is None or not hmac.compare_digest(theirs, bytes.fromhex(digest)):
                raise MigrationFailure(ErrorCode.DIGEST_MISMATCH, "destination memory differs from the source at "
                                                                  "pause")

    def commit(self) -> bytes:
        self.stats.phase = "commit"
        msg = self.proto.send(Commit())
        self.committed = True
        return msg

    def done(self, msg: Message, now: float, started: float) -> None:
        """DONE: the destination runs the VM."""
        self.expect(msg, Done)
        st = self.stats
        st.downtime = now - (self.paused_at if self.paused_at is not None else now)
        st.total_time = now - started
        st.status = st.phase = "completed"
        st.marks["done"] = now
        if self.paused_at is not None and all(m in st.marks for _, m in DOWNTIME_PHASES):
            prev, phases = self.paused_at, {}
            for name, mark in DOWNTIME_PHASES:
                phases[name] = max(0.0, st.marks[mark] - prev)
                prev = max(prev, st.marks[mark])
            st.downtime_phases = phases

    def abort(self, code: ErrorCode) -> bytes | None:
        """ABORT if the state machine still allows the source to send one (the reason
        on the wire is the code's generic text)."""
        if not self.proto.can_send(Abort):
            return None
        try:
            return self.proto.send(Abort(code.value, public_reason(code), b""))
        except LocalProtocolError:
            return None


def _code(text: str) -> ErrorCode:
    """A code the destination sent (printable, at most 64 characters); one we do not know is out-of-state."""
    try:
        return ErrorCode(text)
    except ValueError:
        return ErrorCode.OUT_OF_STATE
