"""The destination engine (sans-IO): checks an incoming migration, never READY unless all verifies.

It takes records (``on_record``) and the results of what it asked
(``on_result``), and returns effects (palm_net.migration.effects); it owns
the session protocol and every check of proto/PROTOCOL.md 7.1-7.5 and 7.7:
what BEGIN may claim, the order of keys, pages and blob, page versions
(rollback), every page received, the CPU state, COMPLETE's counts and
transcript, the protected page count.  It touches no socket, store, VM or
clock: the shell (palm_net.migration.runner) performs the effects.  A record
that breaks a rule is the peer's error (RemoteProtocolError); a valid request
this agent refuses (too large, plain mode) is a MigrationFailure.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from palm_net.channel.records import Record
from palm_net.errors import (
    ErrorCode,
    LocalProtocolError,
    MigrationFailure,
    PalmError,
    RemoteProtocolError,
    public_reason,
)
from palm_net.migration import postcopy_destination
from palm_net.migration.applied import Applied
from palm_net.migration.effects import (
    Aborted,
    AbortForever,
    ApplyPages,
    CommitAndActivate,
    Committed,
    Effect,
    EndStream,
    FinishPulling,
    ImportCpuState,
    ImportKeys,
    ImportProtection,
    KeysImported,
    ListenStream,
    Opened,
    OpenIncoming,
    Prepare,
    Prepared,
    ProtectionImported,
    PullFinished,
    Result,
    Send,
    Settle,
    Settled,
    StreamIn,
    StreamListening,
    StreamLoaded,
)
from palm_net.migration.postcopy import Puller
from palm_net.units import format_bytes
from palm_net.wire.messages import (
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
    Missing,
    Pages,
    Ready,
    RoundDone,
    RoundEnd,
    Running,
    Stream,
    StreamEnd,
    lane_of,
    timings,
)
from palm_net.wire.pages import MAX_VERSION, IncomingPages
from palm_net.wire.protocol import FINAL, Data, Role, SessionProtocol, State

BEGIN_TIMEOUT = 30.0  # BEGIN within this of the session's start
SESSION_BASE = 120.0  # then: this, plus DEADLINE_PER_GIB for each GiB of the VM's data received so far
DEADLINE_PER_GIB = 150.0  # (a floor of about 7 MiB/s), up to MAX_RESEND times the VM's memory
MAX_RESEND = 8


class SessionOutcome(enum.StrEnum):
    """How far an incoming session got, as the engine knows it (the durable row decides)."""

    PREPARED = "prepared"  # READY sent
    COMMITTED = "committed"  # DONE sent, or the row said committed when an abort was asked
    ABORTED = "aborted"


def context_limit(protected_pages: int, processes: int) -> int:
    """The largest protected-context blob a VM of this shape can need (proto 7.3):
    gfn u32 + version u64 + tag 16 per protected page, plus keys and thread contexts."""
    return 28 * protected_pages + 2048 * processes + 65536


class Lane:
    """A session's share of the pages (proto 7.8): the main session's (channel 0) or a data
    session's, with its own session protocol, the PAGES message whose data comes next, its
    round and counts (``round_ended`` and ``complete``: a data session's)."""

    def __init__(self, index: int, proto: SessionProtocol) -> None:
        self.index = index
        self.proto = proto
        self.pages: IncomingPages | None = None
        self.round = 0
        self.round_ended = -1  # its last ROUND_END's round
        self.page_records = 0
        self.stream_bytes = 0  # a stream backend's: its bytes received
        self.complete = False  # its COMPLETE checked: every record it carried was received
        self.fill = False  # post-copy's serving phase: its pages go into missing ones (proto 7.9)
        self.lent = False  # a stream's data session read by its relay (DestinationEngine.lend_lane)

    def lend(self, stream: bool) -> SessionProtocol:
        """This data session (a ``stream``'s only) read from here by its relay (a worker
        thread) as far as its STREAM messages and their data go: its protocol is the
        relay's, and no record of it reaches the engine, until ``returned``."""
        if not stream or self.lent or not self.index or self.proto.state in FINAL:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"channel {self.index} cannot be lent to a relay")
        self.lent = True
        return self.proto

    def carried(self, messages: int, data: int) -> None:
        """Its relay took ``messages`` more STREAM messages and wrote ``data`` more bytes."""
        self.page_records += messages
        self.stream_bytes += data

    def returned(self) -> None:
        self.lent = False

    def __repr__(self) -> str:
        return f"Lane({self.index}, {self.proto.state.value}, round={self.round})"


class DestinationEngine:
    """One incoming migration session, from BEGIN to DONE or ABORT."""

    def __init__(self, plain_session: bool, max_pages: int, deadline_per_gib: float = DEADLINE_PER_GIB) -> None:
        self.proto = SessionProtocol(Role.DESTINATION)
        self.plain_session = plain_session
        self.max_pages = max_pages
        self.deadline_per_gib = deadline_per_gib
        self.begin: Begin | None = None
        self.npages = 0
        self.stream = False  # a stream backend (QEMU): STREAM records instead of pages
        self.stream_loaded = False
        self.listening = False  # the incoming hypervisor listens for the stream (ListenStream done)
        self._end_due = False  # STREAM_END checked: the hypervisor loads once every channel is complete
        self.load_time = 0.0  # seconds the hypervisor took to load the stream's end (for READY)
        self.applied = Applied(0)  # each page's arrival, each protected page's version
        self.main = Lane(0, self.proto)  # this session's pages (PAGES or STREAM messages: page_records)
        self._round_ended = 0  # the last ROUND_END's round, for its ROUND_DONE
        self.progress = 0  # bytes of the VM's memory received (zero pages count as whole pages)
        self.cpu_state_seen = False
        self.context = bytearray()
        self.context_total = 0
        self.context_limit = 0
        self.complete: Complete | None = None
        self.outcome: SessionOutcome | None = None
        self.error: PalmError | None = None
        self._awaiting: type[Result] | None = None  # the result the last request will bring
        self.keys_imported = False
        self.channels = 1  # sessions carrying pages (CHANNELS): this one and its data sessions
        self.lanes: dict[int, Lane] = {}  # the data sessions bound so far, by channel
        self._settle_due = False  # ROUND_DONE waits for every channel's ROUND_END of its round
        self._complete_due = False  # COMPLETE's checks wait for every data session's COMPLETE
        # Post-copy (proto 7.9): MISSING's pages (gfns, versions), then the serving phase.
        self.switch_round: int | None = None
        self._missing: list[tuple[np.ndarray, np.ndarray]] = []
        self._missing_tags: list[bytes] = []  # the MACs of those not yet marked
        self._marked = 0  # how many of _missing are marked in the VM
        self._unmarked = 0  # pages of the rest
        self._missing_runs = 0  # ascending runs of MISSING so far (before the pause, after it: two at most)
        self._named: npt.NDArray[np.bool_] | None = None  # each page MISSING named (once at most)
        self.puller: Puller | None = None
        self._pulling_done = False  # every missing page accepted and asked to be written: PULLED next

    def __repr__(self) -> str:
        return f"DestinationEngine({self.proto.state.value}, outcome={self.outcome})"

    @classmethod
    def pulling(cls, proto: SessionProtocol, npages: int, switch_round: int, missing: npt.NDArray[np.uint64],
                vers: npt.NDArray[np.uint64]) -> tuple[DestinationEngine, list[Effect]]:
        """A RECOVERY session answered ``postcopy`` (proto 7.9 item 6) for a VM that runs
        here and misses ``missing``: its WANTs first, then the serving phase as after
        RUNNING (no digest: what the first session wrote is not hashed again)."""
        assert proto.state is State.SERVING
        eng = cls(False, npages)
        eng.proto, eng.npages, eng.switch_round = proto, npages, switch_round
        eng.main = Lane(0, proto)
        eng.main.fill = True
        eng.outcome = SessionOutcome.COMMITTED  # the VM is this agent's: nothing here aborts it
        eng.puller = Puller(switch_round, missing, vers)
        return eng, [eng._send(w) for w in eng.puller.wants()] + eng._pulled_if_due()

    @property
    def mid(self) -> bytes | None:
        return self.proto.mid

    @property
    def state(self) -> State:
        return self.proto.state

    @property
    def round(self) -> int:
        return self.main.round

    @property
    def page_records(self) -> int:
        """PAGES (or STREAM) messages received on this session."""
        return self.main.page_records

    def deadline(self, started: float) -> float:
        """When this session must be over if nothing more arrives: BEGIN soon; then
        time in proportion to the VM's data received (a peer that trickles, or
        sends only ROUND_ENDs, falls behind), up to MAX_RESEND times its memory."""
        if not self.npages:
            return started + BEGIN_TIMEOUT
        progress = min(self.progress, MAX_RESEND * self.npages * PAGE_SIZE)
        return started + SESSION_BASE + self.deadline_per_gib * progress / (1 << 30)

    def _send(self, body: Body) -> Send:
        return Send(self.proto.send(body))

    def _request(self, effect: Effect, result: type[Result]) -> list[Effect]:
        self._awaiting = result
        return [effect]

    # -- events

    def on_record(self, rec: Record) -> list[Effect]:
        """One record from the source; raises PalmError, after which the shell calls ``fail``."""
        if self._awaiting is not None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"a record while {self._awaiting.__name__} is due")
        if self.puller is not None and self.error is not None:  # post-copy: the session failed, recovery takes it
            raise self.error
        msg = self.proto.receive(rec.data, rec.authenticated)
        if isinstance(msg, Data):
            return self._on_data(msg)
        handler = self._on_message.get(type(msg.body))
        if handler is None:  # the session protocol lets through only what a destination handles
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, f"{msg.type} is not for a destination")
        return handler(self, msg, rec)

    def on_result(self, result: Result) -> list[Effect]:
        """What the shell learned by performing the last request."""
        if self._awaiting is None or not isinstance(result, self._awaiting):
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"unexpected {type(result).__name__}")
        self._awaiting = None
        return self._on_result[type(result)](self, result)

    def fail(self, error: PalmError) -> list[Effect]:
        """After an error: abort forever and scrub (then ABORT with the code's generic
        reason, if the state machine still allows it).  A committed VM stays as it is."""
        if self.outcome in (SessionOutcome.COMMITTED, SessionOutcome.ABORTED):
            self.error = self.error or error  # (post-copy: nothing more is taken on this session)
            return []
        if error.code is ErrorCode.CLOSED and self.mid is not None:
            # A cancel at the source ends the session so, as its failure or a lost link
            # does: said as what happened here and where the VM is, not as our error.
            why = f" ({error.detail})" if error.detail else ""
            error = type(error)(ErrorCode.CLOSED,
                                f"the session ended before the handoff{why}; the VM stays on the source")
        self.error = error
        self._awaiting = None
        return self._request(AbortForever(f"{error.code}: {error.detail}", self.npages > 0), Aborted)

    # -- messages

    def _on_begin(self, msg: Message, _: Record) -> list[Effect]:
        b = msg.get(Begin)
        if b.plain != self.plain_session:
            raise RemoteProtocolError(ErrorCode.MODE_MISMATCH, "BEGIN's plain flag disagrees with the session mode")
        if b.plain and b.protected_pages:
            raise MigrationFailure(ErrorCode.PLAIN_REFUSED, "a VM with protected processes cannot use the plain mode")
        if not 1 <= b.pages <= self.max_pages:
            raise MigrationFailure(ErrorCode.TOO_LARGE, f"a VM of {format_bytes(b.pages * PAGE_SIZE)} ({b.pages} "
                                   f"pages) exceeds this agent's limit of {format_bytes(self.max_pages * PAGE_SIZE)}")
        if b.protected_pages > b.pages or b.processes > b.protected_pages:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "inconsistent protected page counts")
        self.stream = bool(self.proto.stream)
        if self.stream and b.protected_pages:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "a stream backend carries no protected processes")
        self.begin = b
        return self._request(OpenIncoming(msg.mid, b), Opened)

    def _opened(self, result: Opened) -> list[Effect]:
        assert self.begin is not None
        self.npages = self.begin.pages
        if not self.stream:
            self.applied = Applied(self.npages)
            self.context_limit = context_limit(self.begin.protected_pages, self.begin.processes)
        return [self._send(Accept())]

    def _on_keys(self, msg: Message, _: Record) -> list[Effect]:
        if self.page_records:
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "KEYS after the first page record")
        return self._request(ImportKeys(msg.get(Keys).data), KeysImported)

    def _keys_imported(self, result: KeysImported) -> list[Effect]:
        assert self.begin is not None
        self.applied.set_layout(result.ranges)
        if self.applied.protected_pages != self.begin.protected_pages:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "key layout disagrees with BEGIN's protected page count")
        self.keys_imported = True
        return []

    def _on_pages(self, msg: Message, _: Record) -> list[Effect]:
        return self._lane_pages(self.main, msg.get(Pages))

    def _lane_pages(self, lane: Lane, p: Pages) -> list[Effect]:
        """A PAGES message on a session, checked: its zero pages at once, its data as it comes."""
        if self.puller is not None:  # post-copy's serving phase: only missing pages, as announced
            batch = self.puller.take(p)
            self.progress += len(batch) * PAGE_SIZE
        else:
            batch = self._check_pages(p, lane.index, lane.round)
            lane.round = p.round
            lane.page_records += 1
        lane.pages = batch if lane.proto.data_due else None
        zero = batch.zero()
        out: list[Effect] = [ApplyPages(zero, lane.fill)] if zero is not None else []
        return out + (self._pulled_if_due() if lane.pages is None else [])

    def _check_pages(self, p: Pages, channel: int, last_round: int) -> IncomingPages:
        """A PAGES message's checks (on any channel), and its versions taken as applied."""
        batch = IncomingPages(p)
        if p.round < last_round:
            raise RemoteProtocolError(ErrorCode.ROLLBACK, f"page record of round {p.round} after round {last_round}")
        gfns, vers = batch.gfns, batch.vers
        outside = gfns >= self.npages
        if outside.any():
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"gfn {gfns[outside][0]} outside the VM")
        if self.channels > 1:  # each gfn has one channel: its versions arrive in order on it
            elsewhere = lane_of(gfns, self.channels) != channel
            if elsewhere.any():
                raise RemoteProtocolError(ErrorCode.MALFORMED, f"gfn {gfns[elsewhere][0]} on channel {channel}, "
                                                             f"not its own")
        if int(vers.max()) >= MAX_VERSION:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "a page version out of range")
        self.applied.take(gfns, vers, batch.protected, p.round)
        self.progress += len(batch) * PAGE_SIZE
        return batch

    def _on_data(self, d: Data) -> list[Effect]:
        """A data record: the next pages of the last PAGES message, or stream bytes."""
        return self._lane_data(self.main, d)

    def _lane_data(self, lane: Lane, d: Data) -> list[Effect]:
        if self.stream:  # the next bytes of that channel's stream
            lane.stream_bytes += len(d.data)
            self.progress += len(d.data)
            return [StreamIn(d.data, lane.index)]
        assert lane.pages is not None  # the protocol announced this record
        lane.pages.add(d.data)
        return self.flush(lane) + self._pulled_if_due() if d.last else []

    def flush(self, lane: Lane | None = None) -> list[Effect]:
        """The pages of data records received and not yet asked to be written (the
        shell calls this at the end of each buffer it opened, so that the buffer's
        data is written before the buffer is reused); ``lane``: a data session's."""
        lane = lane or self.main
        if lane.pages is None:
            return []
        batch = lane.pages.take()
        if not lane.proto.data_due:
            lane.pages = None
        return [ApplyPages(batch, lane.fill)] if batch is not None else []

    def _on_round_end(self, msg: Message, _: Record) -> list[Effect]:
        # Answered once everything before is written (the shell performs a request
        # only then) and the memory is all reserved: the source pauses for the last
        # copy once we have caught up, so none of this is downtime.
        self._round_ended = msg.get(RoundEnd).round
        self._settle_due = True
        return self._settle_if_due()

    def _settle_if_due(self) -> list[Effect]:
        """Settle (then ROUND_DONE) once every channel ended the round."""
        r = self._round_ended
        if not self._settle_due or not all(c in self.lanes and self.lanes[c].round_ended >= r
                                           for c in range(1, self.channels)):
            return []
        self._settle_due = False
        return self._request(Settle(), Settled)

    def _settled(self, result: Settled) -> list[Effect]:
        if self._pulling_done:  # post-copy: every page written
            return self._request(FinishPulling(self.begin is not None and self.begin.digest), PullFinished)
        return [self._send(RoundDone(self._round_ended))]

    def _on_stream(self, msg: Message, _: Record) -> list[Effect]:
        self.main.page_records += 1  # its bytes follow in data records
        if not self.listening:  # one channel: the hypervisor listens for it now
            return self._listen(1)
        return []

    def _listen(self, channels: int) -> list[Effect]:
        self.listening = True
        return self._request(ListenStream(channels), StreamListening)

    def _stream_listening(self, result: StreamListening) -> list[Effect]:
        return []

    @property
    def stream_bytes(self) -> int:
        """STREAM data received on this session."""
        return self.main.stream_bytes

    def _on_stream_end(self, msg: Message, _: Record) -> list[Effect]:
        claimed = msg.get(StreamEnd).bytes
        if claimed != self.stream_bytes:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE,
                                      f"{self.stream_bytes} stream bytes received, {claimed} sent")
        self._end_due = True
        return self._end_if_due()

    def _end_if_due(self) -> list[Effect]:
        """The hypervisor loads the stream's end once every channel is complete: all its
        streams' bytes are written (QEMU's main stream waits for its multifd ones)."""
        if not self._end_due or not self.lanes_complete:
            return []
        self._end_due = False
        return self._request(EndStream(), StreamLoaded)

    def _stream_loaded(self, result: StreamLoaded) -> list[Effect]:
        self.stream_loaded = True
        self.load_time = result.took
        return self._prepare() if self.complete is not None else []

    # -- more channels (proto 7.8)

    def _on_channels(self, msg: Message, _: Record) -> list[Effect]:
        if self.page_records or self.channels > 1:
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "CHANNELS after the first page record, or twice")
        self.channels = msg.get(Channels).count
        return self._listen(self.channels) if self.stream else []

    @property
    def binding(self) -> bool:
        """Data sessions may bind now: CHANNELS and the keys (a stream backend: its
        hypervisor listening) are in, COMPLETE not yet checked."""
        return (self.channels > 1 and (self.listening if self.stream else self.keys_imported)
                and not self.stream_loaded and self.outcome is None
                and self.state in (State.STREAMING, State.STOPPED, State.SEALED, State.VERIFYING))

    def bind(self, rec: Record, plain_session: bool) -> Lane:
        """A data session's first record (its BIND), for this migration's source: its lane
        (``plain_session``: the data session's mode, which must be this session's)."""
        proto = SessionProtocol(Role.DESTINATION, data=True, stream=self.stream)
        b = proto.receive_message(rec.data, rec.authenticated).get(Bind)  # (the state machine: BIND only)
        if proto.mid != self.mid:
            raise RemoteProtocolError(ErrorCode.WRONG_MIGRATION, "a data session for another migration")
        if plain_session != self.plain_session:  # (a protected VM's pages never in the clear)
            raise RemoteProtocolError(ErrorCode.MODE_MISMATCH, "a data session's mode differs from the migration's")
        if not self.binding or b.count != self.channels:
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, f"BIND of channel {b.channel} of {b.count}: "
                                                           f"{self.channels} announced, or not while streaming")
        if b.channel in self.lanes:
            raise RemoteProtocolError(ErrorCode.REPLAY, f"channel {b.channel} bound twice")
        lane = self.lanes[b.channel] = Lane(b.channel, proto)
        return lane

    def lend_lane(self, lane: Lane) -> SessionProtocol:
        """A stream's data session to its relay (Lane.lend); what it carries is counted in (``lane_carried``)."""
        return lane.lend(self.stream)

    def lane_carried(self, lane: Lane, messages: int, data: int) -> None:
        lane.carried(messages, data)
        self.progress += data

    def on_lane_record(self, lane: Lane, rec: Record) -> list[Effect]:
        """One record of a data session: its pages, ROUND_END or COMPLETE."""
        if lane.lent:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"a record of channel {lane.index}, lent to its relay")
        if self._awaiting is not None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"a record while {self._awaiting.__name__} is due")
        if self.state in FINAL:
            return []
        msg = lane.proto.receive(rec.data, rec.authenticated)
        if isinstance(msg, Data):
            return self._lane_data(lane, msg)
        body = msg.body
        if isinstance(body, Pages):  # (the last round's may come after the main session's CPU_STATE)
            return self._lane_pages(lane, body)
        if isinstance(body, Stream):  # its bytes follow in data records
            lane.page_records += 1
            return []
        if isinstance(body, RoundEnd):
            lane.round_ended = body.round
            return self._settle_if_due()
        c = msg.get(Complete)
        if not hmac.compare_digest(c.transcript, rec.transcript_before) or c.records != rec.index:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, f"channel {lane.index}: record count or running hash "
                                                         "differs from what was received")
        if c.page_records != lane.page_records:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, f"channel {lane.index}: {lane.page_records} page "
                                                         f"records applied, {c.page_records} sent")
        lane.complete = True
        return self._end_if_due() if self.stream else self._complete_if_due()

    def _on_cpu_state(self, msg: Message, _: Record) -> list[Effect]:
        self.cpu_state_seen = True
        return [*postcopy_destination.mark_missing(self), ImportCpuState(msg.get(CpuState).state)]

    def _on_context(self, msg: Message, _: Record) -> list[Effect]:
        c = msg.get(Context)
        if len(self.context) + len(c.data) > self.context_limit:
            raise RemoteProtocolError(ErrorCode.OVERSIZE, "protected-context blob larger than the VM can need")
        self.context += c.data
        self.context_total = c.total
        return []

    def _on_complete(self, msg: Message, rec: Record) -> list[Effect]:
        c = msg.get(Complete)
        if not hmac.compare_digest(c.transcript, rec.transcript_before) or c.records != rec.index:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, "record count or running hash differs from what was "
                                                         "received")
        if c.page_records != self.page_records:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, f"{self.page_records} page records applied, "
                                                         f"{c.page_records} sent")
        self.complete = c
        if self.stream:  # (after STREAM_END: the state machine) READY once the hypervisor loaded it
            return self._prepare() if self.stream_loaded else []
        self._complete_due = True
        return self._complete_if_due()

    @property
    def lanes_complete(self) -> bool:
        """Every data session's COMPLETE is in (proto 7.8)."""
        return sum(lane.complete for lane in self.lanes.values()) >= self.channels - 1

    def _complete_if_due(self) -> list[Effect]:
        """COMPLETE's checks of the whole VM, once every data session's COMPLETE is in."""
        if not self._complete_due or not self.lanes_complete:
            return []
        self._complete_due = False
        if self.proto.context_parts != self.context_total:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, "protected-context blob is missing chunks")
        missing = self.applied.missing
        if missing:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, f"{missing} pages never received")
        if not self.cpu_state_seen:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, "no CPU state")
        # Every protected page was verified against its MAC on arrival (and only
        # ciphertext was accepted on protected gfns); the final metadata must
        # name exactly those versions and MACs (the hypervisor checks it).
        blob, self.context = bytes(self.context), bytearray()
        return self._request(ImportProtection(blob), ProtectionImported)

    def _protection_imported(self, result: ProtectionImported) -> list[Effect]:
        assert self.begin is not None
        if result.protected_pages != self.begin.protected_pages:
            raise RemoteProtocolError(ErrorCode.INCOMPLETE, "protected page count differs from BEGIN")
        return self._prepare()

    def _prepare(self) -> list[Effect]:
        assert self.begin is not None  # (post-copy: the digest comes with PULLED, proto 7.9)
        return self._request(Prepare(self.begin.digest and self.switch_round is None), Prepared)

    def _prepared(self, result: Prepared) -> list[Effect]:
        if not result.persisted:
            raise MigrationFailure(ErrorCode.ABORTED, "the migration was aborted before READY (a recovery query?)")
        self.outcome = SessionOutcome.PREPARED
        return [self._send(Ready(result.digest, timings(self.load_time, result.took)))]

    def _on_commit(self, msg: Message, _: Record) -> list[Effect]:
        return self._request(CommitAndActivate(self.switch_round is not None), Committed)

    def _committed(self, result: Committed) -> list[Effect]:
        if result.committed:
            self.outcome = SessionOutcome.COMMITTED
            took = timings(result.took - result.activating, result.activating)
            if self.switch_round is None:
                return [self._send(Done(took))]
            # Post-copy: PULLING is durable and the VM runs here; its missing pages follow.
            gfns, vers = (np.concatenate([p[i] for p in self._missing]) for i in (0, 1))
            self._missing, self._named = [], None
            self.puller = Puller(self.switch_round, gfns, vers)  # (in gfn order when first used)
            self.main.fill = True
            return [self._send(Running(took)), *self._pulled_if_due()]
        # We already aborted (timeout, shutdown, a recovery query): the promise stands.
        return self.fail(MigrationFailure(ErrorCode.ABORTED, "commit after abort"))

    # -- post-copy (proto 7.9)

    def _pulled_if_due(self) -> list[Effect]:
        """Once every missing page is taken and asked to be written: settle, then PULLED."""
        if self.puller is None or self.puller.remaining or self._pulling_done:
            return []
        self._pulling_done = True
        return self._request(Settle(), Settled)

    def on_fault(self, gfns: list[int]) -> list[Effect]:
        """vCPUs wait for these pages: FETCH those not yet asked for (post-copy's serving
        phase), MAX_FETCH a message (a recovery's re-asked waits may be more)."""
        out: list[Effect] = []
        while self.puller is not None and self.state is State.SERVING and (body := self.puller.faults(gfns)):
            out.append(self._send(Fetch(body)))
        return out

    def _on_abort(self, msg: Message, _: Record) -> list[Effect]:
        a = msg.get(Abort)
        # The source's decision, not a failure here: said as what happened and where the VM is.
        why = ("cancelled at the source; the VM stays there" if a.error_code is ErrorCode.CANCELLED else
               f"the source gave up ({a.code}: {a.reason}); the VM stays there")
        self.error = MigrationFailure(ErrorCode.CANCELLED, why)
        return self._request(AbortForever(why, self.npages > 0), Aborted)

    def _aborted(self, result: Aborted) -> list[Effect]:
        if not result.aborted:  # committed before the failure: the durable row stands
            self.outcome = SessionOutcome.COMMITTED
            return []
        self.outcome = SessionOutcome.ABORTED
        if self.error is None or not self.proto.can_send(Abort):
            return []  # the source ended it, or the session is past answering
        code = self.error.code
        return [self._send(Abort(code.value, public_reason(code), result.token))]

    _on_message: dict[type[Body], Callable[[DestinationEngine, Message, Record], list[Effect]]] = {
        Begin: _on_begin, Keys: _on_keys, Channels: _on_channels, Pages: _on_pages, RoundEnd: _on_round_end,
        Stream: _on_stream, StreamEnd: _on_stream_end, CpuState: _on_cpu_state, Context: _on_context,
        Complete: _on_complete, Commit: _on_commit, Abort: _on_abort, Missing: postcopy_destination.on_missing,
    }
    _on_result: dict[type[Result], Callable[[DestinationEngine, Any], list[Effect]]] = {
        Opened: _opened, KeysImported: _keys_imported, StreamListening: _stream_listening,
        StreamLoaded: _stream_loaded, Settled: _settled,
        ProtectionImported: _protection_imported, Prepared: _prepared, Committed: _committed, Aborted: _aborted,
        PullFinished: postcopy_destination.pull_finished,
    }
