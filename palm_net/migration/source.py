"""The source engine (sans-IO): the steps of an outgoing migration, in order, as effects.

It owns the session protocol of one outgoing migration and every step of
the source: BEGIN; the pre-copy rounds (read the pending pages, collect the
dirty log, decide whether to iterate or stop and copy); the catch-up wait;
the pause and the last copy; the CPU state and protected-context blob (or a
stream backend's own stream); COMPLETE; READY and the digest; the durable
hand-off, then COMMIT; DONE.  It takes records (``on_record``), the results
of what it asked (``on_result``) and the time (``on_timer``, with ``timer``
saying when it is next due), each with ``now``, and returns effects
(palm_net.migration.effects).  It reads no clock, touches no VM, socket or
store: the shell (palm_net.migration.runner) performs the effects, and
palm_net.testing.engines.SourceDriver does so with no sockets or threads.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import numpy as np

from palm_net.channel.records import Record
from palm_net.errors import ErrorCode, LocalProtocolError, MigrationFailure, RemoteProtocolError, public_reason
from palm_net.migration import postcopy_source
from palm_net.migration.effects import (
    ChannelsOpened,
    CollectDirty,
    Digested,
    DigestMemory,
    Dirty,
    Effect,
    ExportFinalState,
    FinalState,
    FinishStream,
    HandedOff,
    HandOff,
    Metadata,
    Note,
    OpenChannels,
    PagesSent,
    Pause,
    Paused,
    ReadTranscript,
    Result,
    Send,
    SendPages,
    SendStream,
    Served,
    SetThrottle,
    Started,
    StartPrecopy,
    StartStream,
    StreamFinished,
    StreamSent,
    StreamStarted,
    Transcript,
)
from palm_net.migration.handoff import InDoubt, check_abort_token
from palm_net.migration.params import (
    DOWNTIME_PHASES,
    MigrationParams,
    MigrationStats,
    Phase,
    RoundStats,
    Status,
    Step,
)
from palm_net.migration.postcopy import PageServer
from palm_net.wire.messages import (
    MAX_BLOB,
    PAGE_SIZE,
    Abort,
    Accept,
    Begin,
    Bind,
    Body,
    Channels,
    Commit,
    Complete,
    Context,
    CpuState,
    Done,
    Fetch,
    Keys,
    Message,
    Pulled,
    Ready,
    RoundDone,
    RoundEnd,
    Running,
    StreamEnd,
    Want,
    timings_s,
)
from palm_net.wire.pages import (
    KIND_PROTECTED,
    KIND_ZERO,
    Buffer,
    Gfns,
    PageBatch,
    PageRange,
    RoundGfns,
    union_gfns,
)
from palm_net.wire.protocol import Role, SessionProtocol, State, StreamLease

DOWNTIME_GOAL_DIVISOR = 100  # iterate on while shrinking, until expected downtime <= limit / 100
CONTEXT_CHUNK = MAX_BLOB
CATCH_UP_WAIT = 2.0  # at most this long for the destination to write the last round before the pause


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


def plain_refusal(params: MigrationParams, info: Any) -> MigrationFailure | None:
    """A VM with protected processes never migrates over the plain benchmark mode (proto 7.6)."""
    if params.plain and info.protected_pages:
        return MigrationFailure(ErrorCode.PLAIN_REFUSED, "a VM with protected processes never uses the plain "
                                                         "benchmark mode")
    return None


class SourceEngine:
    """One outgoing migration: BEGIN, the VM's memory (page rounds, or a stream),
    COMPLETE, and the handoff messages.  ``info``: the VM's VmInfo;
    ``peer_sign_pub``: the destination's signing key (its abort tokens)."""

    def __init__(self, mid: bytes, info: Any, params: MigrationParams, stream: bool = False, spec: bytes = b"",
                 stats: MigrationStats | None = None, peer_sign_pub: bytes = b"") -> None:
        self.proto = SessionProtocol(Role.SOURCE, mid)
        self.info, self.params, self.stream, self.spec = info, params, stream, spec
        self.peer_sign_pub = peer_sign_pub
        self.stats = stats or MigrationStats()
        self.stats.downtime_limit = params.downtime_limit
        self.step = Step.OPENING
        self.started = 0.0
        self.round = 0
        self.sent_bytes = 0  # message bytes of the VM's memory (before tags and framing)
        self.pending: RoundGfns = PageRange(info.npages)  # gfns of the current round; round 0: all
        self.paused_at: float | None = None
        self.digest: str | None = None
        self.committed = False  # COMMIT was made: from here only the destination's word settles it
        self.abort_token: bytes | None = None  # a valid one from the destination, after COMMIT
        self.written_round = -1  # the last round the destination says it has written (ROUND_DONE)
        self._awaiting: type[Result] | None = None  # the result the last request will bring
        # Results of effects performed beside the rest (Effect.beside), not yet in:
        # the hand-off waits for them and READY.
        self._beside_due: set[type[Result]] = set()
        self._ready: Ready | None = None  # READY, while a result performed beside is still due
        self._deadline: float | None = None  # when ``on_timer`` acts (a reply's timeout, the catch-up wait's end)
        self._round_started = (0.0, 0)  # (now, bytes transferred) when the current round began
        self._last_dirty: int | None = None
        self._hot_rounds = 0
        # More channels (proto 7.8): channel 0 is this session, each other a DATA session
        # (a stream backend: each carries one of the hypervisor's streams).
        self.channels = params.channels
        self.lanes = [SessionProtocol(Role.SOURCE, mid, data=True, stream=stream) for _ in range(self.channels - 1)]
        self.channel_records = [0] * self.channels  # PAGES (or STREAM) messages sent on each channel
        self.channel_bytes = [0] * self.channels  # a stream backend's bytes sent on each channel
        self.stats.channels = self.channels
        self.switching = False  # post-copy (proto 7.9): switching instead of the stop-and-copy, then serving
        self.missing: Gfns | None = None  # the pages left to the serving phase
        self.announced: Gfns = np.zeros(0, np.uint64)  # of them, named by MISSING before the pause
        self.unnamed: Gfns = np.zeros(0, np.uint64)  # and those named after it
        self.protected_ranges: tuple[tuple[int, int], ...] = ()  # each process's gfns (first, count)
        self.server: PageServer | None = None
        self.pulled: Pulled | None = None  # the destination has every page (its digest, if asked)
        self._wanted: list[Gfns] = []  # a recovery session's WANTs so far, and the highest gfn they named:
        self._wanted_last = -1
        self._early_fetches: list[Gfns] = []  # FETCHes before SERVING was durable
        self._early_pulled: Pulled | None = None  # and a PULLED

    def __repr__(self) -> str:
        return f"SourceEngine({self.step.value}, {self.proto.state.value}, round={self.round})"

    @classmethod
    def recovering(cls, proto: SessionProtocol, info: Any, params: MigrationParams) -> SourceEngine:
        """A RECOVERY session answered ``postcopy`` (proto 7.9 item 6): the destination's
        WANTs, then serving them as after RUNNING."""
        assert proto.mid is not None and proto.state is State.SERVING
        eng = cls(proto.mid, info, params)
        eng.proto, eng.committed, eng.step = proto, True, Step.WANTING
        return eng

    @property
    def mid(self) -> bytes:
        assert self.proto.mid is not None
        return self.proto.mid

    @property
    def stream_bytes(self) -> int:
        """A stream backend's bytes sent, on every channel."""
        return sum(self.channel_bytes)

    def sent(self, size: int) -> None:
        """``size`` bytes went on the wire (framing and tags included): counted."""
        self.stats.transferred += size

    # -- events

    def start(self, now: float) -> list[Effect]:
        """BEGIN; ACCEPT is due within the reply timeout."""
        p, i = self.params, self.info
        self.started = now
        if self.step is Step.WANTING:  # a recovery session: the destination speaks first
            self._reply_due(now)
            return []
        refused = plain_refusal(p, i)
        if refused is not None:
            raise refused
        begin = self.proto.send(Begin(i.name, i.vm_id, i.npages, i.protected_pages, i.processes, i.vcpus, p.plain,
                                      p.verify_digest, "qemu" if self.stream else "model", self.spec))
        self._reply_due(now)
        return [Send(begin)]

    def on_record(self, rec: Record, now: float) -> list[Effect]:
        """A message from the destination.  An ABORT before the handoff point ends the
        migration (MigrationFailure with the destination's code); after COMMIT, only one
        with a valid token does (MigrationFailure, ``abort_token`` set), any other leaves
        the outcome in doubt (InDoubt)."""
        msg = self.proto.receive_message(rec.data, rec.authenticated)
        body = msg.body
        if isinstance(body, Abort):
            if not self.committed:
                raise MigrationFailure(body.error_code, "destination aborted: " + body.reason)
            if check_abort_token(self.peer_sign_pub, self.mid, body.token):
                self.abort_token = body.token
                raise MigrationFailure(ErrorCode.ABORTED, "destination refused the commit: " + body.reason)
            raise InDoubt("an abort without a valid token after COMMIT")
        if isinstance(body, (Fetch, Pulled)):  # post-copy's serving (the state machine lets them through only then)
            return postcopy_source.on_message(self, body, now)
        if isinstance(body, RoundDone):
            self.written_round = max(self.written_round, body.round)
            if self.step is Step.CATCHING_UP and self.written_round >= self.round - 1:
                return self._pause()
            return []
        handler, step = self._on_message.get(type(body), (None, None))
        if handler is None or step is not self.step:
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, f"{msg.type} while {self.step.value}")
        self._deadline = None
        return handler(self, msg, now)

    def on_result(self, result: Result, now: float) -> list[Effect]:
        """What the shell learned by performing a request."""
        if type(result) in self._beside_due:
            self._beside_due.discard(type(result))
            out = self._on_result[type(result)](self, result, now)
            return out + self._verified() if self._ready is not None and not self._beside_due else out
        if self._awaiting is None or not isinstance(result, self._awaiting):
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"unexpected {type(result).__name__} while "
                                                             f"{self.step.value}")
        self._awaiting = None
        return self._on_result[type(result)](self, result, now)

    def timer(self) -> float | None:
        """When ``on_timer`` is next due (None: nothing is timed)."""
        return self._deadline

    def on_timer(self, now: float) -> list[Effect]:
        """The time came: a reply that did not arrive fails the migration; the catch-up
        wait ends with the pause (a slow destination is not waited for long)."""
        if self._deadline is None or now < self._deadline:
            return []
        self._deadline = None
        if self.step is Step.CATCHING_UP:
            return self._pause()
        raise RemoteProtocolError(ErrorCode.TIMEOUT, "the session ran out of time")

    def _request(self, step: Step, effect: Effect, result: type[Result]) -> list[Effect]:
        self.step = step
        self._awaiting = result
        return [effect]

    def _reply_due(self, now: float) -> None:
        self._deadline = now + self.params.reply_timeout

    def _send(self, body: Body) -> Send:
        return Send(self.proto.send(body))

    # -- opening

    def _on_accept(self, msg: Message, now: float) -> list[Effect]:
        self.stats.setup_time = now - self.started
        if self.stream:  # the data sessions first: the destination's hypervisor listens for them all
            self.stats.status, self.stats.phase = Status.ACTIVE, Phase.STREAM
            return self._open_channels([], now)
        return self._request(Step.STARTING, StartPrecopy(self.params.verify_digest), Started)

    def _open_channels(self, out: list[Effect], now: float) -> list[Effect]:
        """CHANNELS and the data sessions, bound, if there are more channels than one."""
        if self.channels > 1:  # the data sessions bind once the destination knows how many
            out.append(self._send(Channels(self.channels)))
            binds = tuple(lane.send(Bind(i + 1, self.channels)) for i, lane in enumerate(self.lanes))
            return out + self._request(Step.STARTING, OpenChannels(binds), ChannelsOpened)
        return out + self._channels_opened(ChannelsOpened(), now)

    def _channels_opened(self, result: ChannelsOpened, now: float) -> list[Effect]:
        if self.stream:
            p = self.params
            return [Note("migration started", {"phase": "stream", "pages": self.info.npages,
                                               "channels": self.channels}),
                    *self._request(Step.STARTING, StartStream(p.downtime_limit, p.bandwidth, p.auto_converge,
                                                              self.channels), StreamStarted)]
        started = Note("migration started", {"phase": "round", "round": 0, "pages": self.info.npages,
                                             "channels": self.channels})
        if self.params.postcopy and self.params.postcopy_after == 0:  # pure post-copy: every page follows
            self.switching, self.stats.stop_reason = True, "postcopy"
            return [started, *self._pause()]
        return [started, *self._next_round(now)]

    # -- a page backend: keys, rounds, stop-and-copy

    def _started(self, result: Started, now: float) -> list[Effect]:
        """Dirty logging is on: the process keys, then round 0 (every page)."""
        self.stats.status, self.stats.phase = Status.ACTIVE, Phase.ROUND
        self.protected_ranges = result.protected
        return self._open_channels([self._send(Keys(result.keys))], now)

    def _next_round(self, now: float) -> list[Effect]:
        self._round_started = (now, self.stats.transferred)
        self.stats.round_pages = self.stats.remaining = len(self.pending)  # the progress knows the round's size
        return self._request(Step.ROUND, SendPages(self.pending, self.round), PagesSent)

    def pages(self, batch: PageBatch, remaining: int, channel: int = 0) -> list[Buffer]:
        """A PAGES message for a batch the shell read from the current round's gfns,
        then its data records (views of the batch's data): the bulk path of SendPages,
        on ``channel`` (its gfns are that channel's, wire.messages.lane_of)."""
        if self.step not in (Step.ROUND, Step.STOP_AND_COPY, Step.SERVING):
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"pages while {self.step.value}")
        st = self.stats
        kinds = batch.kinds
        zero, prot = kinds.count(KIND_ZERO), kinds.count(KIND_PROTECTED)  # bytes.count: C speed
        st.zero_pages += zero
        st.protected_pages += prot
        st.normal_pages += len(kinds) - zero - prot
        st.page_records += 1
        self.channel_records[channel] += 1
        st.remaining = remaining
        st.round_pages = len(self.pending)
        proto = self.lanes[channel - 1] if channel else self.proto
        msg = proto.send(batch.message(self.round))
        data = b"".join(batch.data) if isinstance(batch.data, list) else batch.data
        self.sent_bytes += len(msg) + len(data)
        return [msg, *proto.send_data(data)] if data else [msg]

    def channel_end(self, channel: int, pages: int, records: int, transcript: bytes) -> bytes:
        """A data session's last message of the round (``pages`` of its own): its ROUND_END,
        or in the stop-and-copy (or at its stream's end) its COMPLETE, binding its
        ``records`` and ``transcript``."""
        lane = self.lanes[channel - 1]
        if self.step in (Step.STOP_AND_COPY, Step.STREAMING):
            return lane.send(Complete(records, self.channel_records[channel], transcript))
        return lane.send(RoundEnd(self.round, pages, 0))

    def _pages_sent(self, result: PagesSent, now: float) -> list[Effect]:
        if self.step in (Step.SERVING, Step.DONE):  # (PULLED may overtake the last slice's result)
            return postcopy_source.push(self, now) if self.step is Step.SERVING else []
        if self.step is Step.STOP_AND_COPY:
            return self._request(Step.EXPORTING, ExportFinalState(), FinalState)
        return self._request(Step.COLLECTING, CollectDirty(), Dirty)

    def _dirty(self, result: Dirty, now: float) -> list[Effect]:
        """The round is over: ROUND_END, then the next round or the catch-up wait."""
        t0, b0 = self._round_started
        ended = self.round
        end, stop, throttle = self._end_round(now - t0, self.stats.transferred - b0, result.gfns)
        r = self.stats.rounds[-1]
        out: list[Effect] = [] if throttle is None else [SetThrottle(throttle)]
        out += [Note("round done", {"phase": "round", "round": r.round, "pages": r.pages, "dirty": r.dirty_pages,
                                    "seconds": round(r.duration, 4),
                                    "expected_downtime": self.stats.expected_downtime}), end]
        if not stop:
            return out + self._next_round(now)
        out += postcopy_source.announce(self)  # (post-copy: what is known before the pause goes first)
        # Pause once the destination has written this round: what it still had to
        # write would be downtime.  The guest runs meanwhile (its writes go to the
        # last copy); a slow destination is not waited for long.
        self.step = Step.CATCHING_UP
        if self.written_round >= ended:
            return out + self._pause()
        self._deadline = now + CATCH_UP_WAIT
        return out

    def _end_round(self, duration: float, wire_bytes: int, dirty: Gfns) -> tuple[Send, bool, float | None]:
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
        msg = self._send(RoundEnd(self.round, len(self.pending), n))
        # QEMU/Xen stop as soon as the rest fits the limit.  We also go on while
        # a round at least halves the dirty set and the expected downtime is
        # above a hundredth of the limit (3 ms by default, about what a pause
        # costs anyway here): a round that halves the rest is short, and the
        # pause then holds little more than its fixed costs.  (At a thirtieth, a
        # guest writing 5000 pages/s paused with 400-800 pages: 9-21 ms; now
        # after one round more, with 40-120: 7 ms.)
        fits = expected <= p.downtime_limit
        shrinking = self._last_dirty is None or n <= self._last_dirty // 2
        converged = fits and (expected <= p.downtime_limit / DOWNTIME_GOAL_DIVISOR or not shrinking)
        memory = self.info.npages * PAGE_SIZE
        cap = ("max-rounds" if self.round + 1 >= p.max_rounds
               else "max-factor" if self.sent_bytes >= p.max_factor * memory else None)
        stop = converged or (cap is not None and p.downtime_policy != "continue")
        self._last_dirty = n
        throttle = None
        # Post-copy switches (proto 7.9) after postcopy_after rounds whatever the expected
        # downtime, or else where the stop-and-copy would not fit: at a cap, in place of
        # the downtime policy.
        self.switching = p.postcopy and (self.round + 1 >= p.postcopy_after if p.postcopy_after is not None
                                         else not converged and cap is not None)
        if self.switching:
            stop, cap, st.stop_reason = True, None, "postcopy"
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
        if stop and not self.switching:
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

    def _pause(self) -> list[Effect]:
        self._deadline = None
        return self._request(Step.PAUSING, Pause(), Paused)

    def _paused(self, result: Paused, now: float) -> list[Effect]:
        """The guest is paused: the last copy holds the last round's dirty set plus
        whatever the guest wrote until the pause."""
        self.stats.phase = Phase.STOP_AND_COPY
        self.paused_at = result.at
        self.stats.current_round = self.round
        self._round_started = (result.at, self.stats.transferred)
        if self.switching and (len(self.pending) or len(result.dirty)):
            return postcopy_source.switch(self, result.dirty)
        if self.switching:  # nothing left to follow: the stop-and-copy is empty
            self.switching, self.stats.stop_reason = False, "converged"
        self.pending = union_gfns(self.pending, result.dirty)
        return [Note("stop-and-copy", {"phase": "stop-and-copy", "round": self.round, "pages": len(self.pending)}),
                *self._request(Step.STOP_AND_COPY, SendPages(self.pending, self.round), PagesSent)]

    def _final_state(self, result: FinalState, now: float) -> list[Effect]:
        """CPU_STATE and the protected-context blob in CONTEXT chunks (the guest is paused)."""
        out: list[Effect] = [self._send(CpuState(result.cpu_state))]
        blob = result.blob
        chunks = [blob[i : i + CONTEXT_CHUNK] for i in range(0, len(blob), CONTEXT_CHUNK)] or [b""]
        out += [self._send(Context(i, len(chunks), chunk)) for i, chunk in enumerate(chunks)]
        return out + self._request(Step.COMPLETING, ReadTranscript(), Transcript)

    # -- a stream backend: the hypervisor's own stream

    def _stream_started(self, result: StreamStarted, now: float) -> list[Effect]:
        return self._request(Step.STREAMING, SendStream(), StreamSent)

    def lease_stream(self, channel: int = 0) -> StreamLease:
        """``channel``'s STREAM messages, made by its relay (SendStream's bulk path) until ``stream_returned``."""
        if self.step is not Step.STREAMING:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"stream bytes while {self.step.value}")
        return (self.lanes[channel - 1] if channel else self.proto).lease_stream()

    def stream_returned(self, channel: int, lease: StreamLease) -> None:
        """``channel``'s relay is done with its lease: what it made is counted."""
        (self.lanes[channel - 1] if channel else self.proto).end_lease(lease)
        self.channel_bytes[channel] += lease.data_bytes
        self.stats.page_records += lease.messages
        self.channel_records[channel] += lease.messages
        self.sent_bytes += lease.bytes

    def _stream_sent(self, result: StreamSent, now: float) -> list[Effect]:
        """The hypervisor's stream ended: STREAM_END and COMPLETE at once.  Its
        completion (its guest paused, its figures) is awaited beside the destination's
        load and checks, not before them: the hand-off still waits for it."""
        self.stats.marks["last-byte"] = now  # the hypervisor's last byte read and sent on
        self.stats.phase = Phase.STOP_AND_COPY
        self._beside_due.add(StreamFinished)
        return [self._send(StreamEnd(self.channel_bytes[0])), FinishStream(self.params.verify_digest),
                *self._request(Step.COMPLETING, ReadTranscript(), Transcript)]

    def _stream_finished(self, result: StreamFinished, now: float) -> list[Effect]:
        """The hypervisor completed (its guest paused at ``paused_at``), with its figures."""
        self.paused_at, st, fig = result.paused_at, self.stats, result.figures
        st.hypervisor = {**fig, "stream_bytes": self.stream_bytes}
        st.zero_pages, st.normal_pages = int(fig.get("duplicate_pages") or 0), int(fig.get("normal_pages") or 0)
        st.current_round = self.round = int(fig.get("rounds") or 0)
        note = Note("stream done", {"phase": "stop-and-copy", "rounds": self.round, "stream_bytes": self.stream_bytes,
                                    "hypervisor_downtime_ms": fig.get("downtime_ms")})
        # Our digest still due: COMPLETE came first and left it to now (_transcript).
        return [note, DigestMemory()] if Digested in self._beside_due else [note]

    def _digested(self, result: Digested, now: float) -> list[Effect]:
        self.digest = self.stats.digest = result.digest
        return []

    # -- verification and the handoff

    def _transcript(self, result: Transcript, now: float) -> list[Effect]:
        """COMPLETE, with the channel's count and hash of every record before it."""
        st = self.stats
        if not self.stream:  # the last round, CPU state and blob are sent
            st.marks.setdefault("last-byte", now)
            t0, b0 = self._round_started
            duration, wire = now - t0, st.transferred - b0
            st.rounds.append(RoundStats(self.round, len(self.pending), wire, duration, 0, 0.0,
                                        wire / duration if duration > 0 else 0.0, paused=True))
        st.phase = Phase.VERIFY
        out: list[Effect] = [self._send(Complete(result.records, self.channel_records[0], result.hash))]
        st.marks["complete"] = now
        paused_ms = round((now - self.paused_at) * 1000, 1) if self.paused_at is not None else None
        out.append(Note("complete sent", {"phase": "verify", "round": self.round, "paused_ms": paused_ms}))
        self.step = Step.VERIFYING
        self._reply_due(now)
        if self.params.verify_digest and not self.switching:  # ours while the destination verifies
            self._beside_due.add(Digested)
            # A stream backend's leaves out what its stream's CPU state names (proto 7.7),
            # known once the hypervisor completed: asked for at StreamFinished, not before.
            out += [] if StreamFinished in self._beside_due else [DigestMemory()]
        return out

    def _on_ready(self, msg: Message, now: float) -> list[Effect]:
        st = self.stats
        st.marks["ready"] = now
        st.ready_wait = now - st.marks["complete"]  # READY and our digest, if asked
        self._ready = ready = msg.get(Ready)
        load, prepare = timings_s(ready.timings)
        st.destination_phases = {"load": load, "prepare": prepare}
        return [] if self._beside_due else self._verified()

    def _verified(self) -> list[Effect]:
        """READY and what was performed beside (the hypervisor completed; with
        verify_digest the destination's memory equals ours at pause): the handoff point next."""
        assert self._ready is not None
        if self.params.verify_digest and not self.switching:  # (post-copy: PULLED's, proto 7.9)
            theirs, ours = self._ready.digest, self.digest
            if ours is None or not hmac.compare_digest(theirs, bytes.fromhex(ours)):
                raise MigrationFailure(ErrorCode.DIGEST_MISMATCH, "destination memory differs from the source at "
                                                                  "pause")
        return self._request(Step.HANDING_OFF, HandOff(), HandedOff)

    def _handed_off(self, result: HandedOff, now: float) -> list[Effect]:
        """Durable before COMMIT leaves; from COMMIT on, only the destination's word settles it."""
        if not result.ok:
            raise MigrationFailure(ErrorCode.CANCELLED, "migration was cancelled before the handoff")
        self.stats.marks["handed-off"] = now
        return [Note("handed off", {"phase": "commit", "round": self.round}), *self._commit(now)]

    def _commit(self, now: float) -> list[Effect]:
        """COMMIT: from here only the destination's word settles it."""
        self.stats.phase = Phase.COMMIT
        commit = self._send(Commit())
        self.committed = True
        self.step = Step.COMMITTING
        self._reply_due(now)
        return [commit]

    def _on_done(self, msg: Message, now: float) -> list[Effect]:
        """DONE: the destination runs the VM."""
        st = self.stats
        self._running(msg.get(Done).timings, now)
        self.step = Step.DONE
        st.total_time = now - self.started
        st.status, st.phase = Status.COMPLETED, Phase.COMPLETED
        return []

    def _running(self, timings: bytes, now: float) -> None:
        """The VM runs at the destination (DONE, or post-copy's RUNNING): the downtime is over."""
        st = self.stats
        commit, activate = timings_s(timings)
        st.destination_phases = {**(st.destination_phases or {}), "commit": commit, "activate": activate}
        st.downtime = now - (self.paused_at if self.paused_at is not None else now)
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

    # (message, the step it is due in) -> handler; ABORT and ROUND_DONE are taken in any step.
    _on_message: dict[type[Body], tuple[Callable[[SourceEngine, Message, float], list[Effect]], Step]] = {
        Accept: (_on_accept, Step.OPENING), Ready: (_on_ready, Step.VERIFYING), Done: (_on_done, Step.COMMITTING),
        Running: (postcopy_source.on_running, Step.COMMITTING), Want: (postcopy_source.on_want, Step.WANTING),
    }
    _on_result: dict[type[Result], Callable[[SourceEngine, Any, float], list[Effect]]] = {
        Started: _started, ChannelsOpened: _channels_opened, PagesSent: _pages_sent, Dirty: _dirty,
        Paused: _paused, FinalState: _final_state, StreamStarted: _stream_started, StreamSent: _stream_sent,
        StreamFinished: _stream_finished,
        Transcript: _transcript, HandedOff: _handed_off, Digested: _digested, Metadata: postcopy_source.metadata,
        Served: postcopy_source.served,
    }
