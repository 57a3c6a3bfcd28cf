"""The session state machine (sans-IO), in the manner of h11's _state.py.

One ``SessionProtocol`` object lives at each end of a session and sees every
record in both directions: messages, and the data records that follow a
PAGES or STREAM message (``Data`` events, by position: the bulk the message
announced, DATA_RECORD bytes a record until the last).  A message is allowed only if the table below has
an entry for (current state, sender role, message class); the entry gives the
next state.  Sequence numbers count up by one per direction from 0, and the
migration id is fixed by the first message: replayed, reordered, foreign or
out-of-state messages are RemoteProtocolErrors (our own mistakes,
LocalProtocolErrors).  proto/PROTOCOL.md 6.1 is this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from palm_net.errors import ErrorCode, LocalProtocolError, PalmError, RemoteProtocolError
from palm_net.wire import messages
from palm_net.wire.messages import (
    DATA_RECORD,
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
    Outcome,
    Pages,
    Pulled,
    Query,
    Ready,
    RecoveryOutcome,
    RoundDone,
    RoundEnd,
    Running,
    Stream,
    StreamEnd,
    Want,
)


class Role(enum.Enum):
    SOURCE = "source"  # the initiator
    DESTINATION = "destination"


class State(enum.Enum):
    IDLE = "idle"  # a MIGRATION session, before BEGIN
    RECOVERY = "recovery"  # a RECOVERY session, before QUERY
    BEGUN = "begun"  # BEGIN sent, waiting for ACCEPT
    STREAMING = "streaming"  # pre-copy rounds and stop-and-copy pages
    STOPPED = "stopped"  # CPU state sent: only the context blob may follow
    SEALED = "sealed"  # stream backends: the stream ended, COMPLETE follows
    VERIFYING = "verifying"  # COMPLETE sent, destination checks
    PREPARED = "prepared"  # READY: destination verified and persisted
    COMMITTING = "committing"  # COMMIT sent: the handoff point has passed
    DONE = "done"
    ABORTED = "aborted"
    QUERIED = "queried"  # recovery session: QUERY sent
    CLOSED = "closed"  # recovery session answered
    DATA = "data"  # a DATA session (proto 7.8), before BIND
    BOUND = "bound"  # a DATA session carrying its channel's pages
    SWITCHING = "switching"  # post-copy (proto 7.9): MISSING sent, CPU state next
    SERVING = "serving"  # post-copy: the VM runs at the destination, its missing pages follow


SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION

TRANSITIONS: dict[tuple[State, Role, type[Body]], State] = {
    (State.IDLE, SOURCE, Begin): State.BEGUN,
    (State.RECOVERY, SOURCE, Query): State.QUERIED,
    (State.BEGUN, DESTINATION, Accept): State.STREAMING,
    (State.STREAMING, SOURCE, Keys): State.STREAMING,
    (State.STREAMING, SOURCE, Pages): State.STREAMING,
    (State.STREAMING, SOURCE, RoundEnd): State.STREAMING,
    # The destination answers each ROUND_END once the round is written; the
    # answer may cross the source's next messages on the wire.
    (State.STREAMING, DESTINATION, RoundDone): State.STREAMING,
    (State.STOPPED, DESTINATION, RoundDone): State.STOPPED,
    (State.VERIFYING, DESTINATION, RoundDone): State.VERIFYING,
    (State.STREAMING, SOURCE, CpuState): State.STOPPED,
    (State.STREAMING, SOURCE, Stream): State.STREAMING,
    (State.STREAMING, SOURCE, StreamEnd): State.SEALED,
    (State.SEALED, SOURCE, Complete): State.VERIFYING,
    (State.STOPPED, SOURCE, Context): State.STOPPED,
    (State.STOPPED, SOURCE, Complete): State.VERIFYING,
    (State.VERIFYING, DESTINATION, Ready): State.PREPARED,
    (State.PREPARED, SOURCE, Commit): State.COMMITTING,
    (State.COMMITTING, DESTINATION, Done): State.DONE,
    (State.QUERIED, DESTINATION, Outcome): State.CLOSED,
    # More channels (proto 7.8): announced on the main session, each a DATA session
    # that carries its share of the pages (or one of the hypervisor's streams) and
    # ends with its own COMPLETE.
    (State.STREAMING, SOURCE, Channels): State.STREAMING,
    (State.DATA, SOURCE, Bind): State.BOUND,
    (State.BOUND, SOURCE, Pages): State.BOUND,
    (State.BOUND, SOURCE, RoundEnd): State.BOUND,
    (State.BOUND, SOURCE, Stream): State.BOUND,
    (State.BOUND, SOURCE, Complete): State.DONE,
    # Post-copy (proto 7.9): the switch, then the destination runs the VM and pulls
    # the pages it misses (OUTCOME postcopy leads a RECOVERY session here too).
    (State.STREAMING, SOURCE, Missing): State.SWITCHING,
    (State.SWITCHING, SOURCE, Missing): State.SWITCHING,
    (State.SWITCHING, DESTINATION, RoundDone): State.SWITCHING,
    (State.SWITCHING, SOURCE, CpuState): State.STOPPED,
    (State.COMMITTING, DESTINATION, Running): State.SERVING,
    (State.SERVING, SOURCE, Pages): State.SERVING,
    (State.SERVING, DESTINATION, Fetch): State.SERVING,
    (State.SERVING, DESTINATION, Want): State.SERVING,
    (State.SERVING, DESTINATION, Pulled): State.DONE,
}
# ABORT may end the session from any state before the handoff completes, by
# either side; after COMMIT only the destination may abort (with a token).
for _state in (State.BEGUN, State.STREAMING, State.SWITCHING, State.STOPPED, State.SEALED, State.VERIFYING,
               State.PREPARED):
    TRANSITIONS[(_state, SOURCE, Abort)] = State.ABORTED
    TRANSITIONS[(_state, DESTINATION, Abort)] = State.ABORTED
TRANSITIONS[(State.COMMITTING, DESTINATION, Abort)] = State.ABORTED

FINAL = frozenset({State.DONE, State.ABORTED, State.CLOSED})
# Seconds a side waits for its peer's reply, and at most for its peer to take what it
# sends (proto 1): the source's default, `palm migrate --reply-timeout`.
REPLY_TIMEOUT = 30.0
# What carries the VM depends on BEGIN's backend: page records, or a stream.
PAGE_ONLY: frozenset[type[Body]] = frozenset({Keys, Pages, RoundEnd, RoundDone, CpuState, Context, Missing, Running,
                                               Fetch, Want, Pulled})
STREAM_ONLY: frozenset[type[Body]] = frozenset({Stream, StreamEnd})
# The only messages that may travel unauthenticated (CLEAR records of the
# plain benchmark mode, proto/PROTOCOL.md 5): bulk data, never a handoff step.
CLEAR_ALLOWED: frozenset[type[Body]] = frozenset({Pages, Stream})


Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, repr=False)
class Data:
    """A data record: the next bytes of the bulk its PAGES or STREAM message announced."""

    data: Buffer
    index: int  # 0, 1, ... within the message's data records
    last: bool

    def __repr__(self) -> str:
        return f"Data(index={self.index}, {len(self.data)} bytes, last={self.last})"


class _Bulk:
    __slots__ = ("due", "index")

    def __init__(self) -> None:
        self.due = 0
        self.index = 0


class StreamLease:
    """Our STREAM messages and their data records, made by whoever holds the lease (a
    relay's worker thread, palm_net.migration.relay) instead of the session's owner.
    Only where a STREAM leaves the state as it is, so each is the message ``send``
    would have made; the session sends nothing else until the lease comes back
    (``SessionProtocol.end_lease``), which takes on its sequence numbers."""

    __slots__ = ("bytes", "data_bytes", "messages", "mid", "seq")

    def __init__(self, mid: bytes, seq: int) -> None:
        self.mid, self.seq = mid, seq
        self.messages = 0  # STREAM messages made
        self.data_bytes = 0  # the stream's bytes they announced
        self.bytes = 0  # those and the messages' own (before framing and tags)

    def frame(self, data: Buffer) -> list[Buffer]:
        """A STREAM message announcing ``data`` (1..MAX_BULK bytes), then its data records."""
        view = memoryview(data).cast("B")
        msg = messages.encode(Message(self.mid, self.seq, Stream(len(view))))
        self.seq += 1
        self.messages += 1
        self.data_bytes += len(view)
        self.bytes += len(msg) + len(view)
        return [msg, *(view[i : i + DATA_RECORD] for i in range(0, len(view), DATA_RECORD))]


class SessionProtocol:
    def __init__(self, role: Role, mid: bytes | None = None, recovery: bool = False, data: bool = False,
                 stream: bool = False) -> None:
        """``recovery``: a RECOVERY session (QUERY and OUTCOME only); ``data``: a DATA
        session (BIND, then pages, or with ``stream`` a stream backend's STREAM
        messages); else a MIGRATION session."""
        self.role = role
        self.state = State.RECOVERY if recovery else State.DATA if data else State.IDLE
        self.mid = mid
        self._next_seq = {SOURCE: 0, DESTINATION: 0}
        # Per sender: bulk bytes still to come in data records, and the next one's index.
        self._bulk = {SOURCE: _Bulk(), DESTINATION: _Bulk()}
        self._context_parts = 0
        self.stream: bool | None = stream if data else None  # set by BEGIN: a stream backend
        self.data = data
        self.recovery = recovery
        self.postcopy = False  # a MISSING went (or OUTCOME postcopy came): RUNNING, not DONE (proto 7.9)
        self._lease: StreamLease | None = None

    def __repr__(self) -> str:
        return f"SessionProtocol({self.role.value}, {self.state.value})"

    @property
    def context_parts(self) -> int:
        """CONTEXT chunks accepted so far."""
        return self._context_parts

    @property
    def peer_role(self) -> Role:
        return DESTINATION if self.role is SOURCE else SOURCE

    def _advance(self, sender: Role, msg: Message) -> None:
        """Checks ``msg`` from ``sender`` against the table; raises the code proto 6.1 names
        (the caller makes it a local or a remote error)."""
        body = msg.body
        nxt = TRANSITIONS.get((self.state, sender, type(body)))
        if nxt is None:
            raise PalmError(ErrorCode.OUT_OF_STATE,
                            f"{body.TYPE} from {sender.value} not allowed in state {self.state.value}")
        if self.mid is None:
            self.mid = msg.mid
        elif msg.mid != self.mid:
            raise PalmError(ErrorCode.WRONG_MIGRATION, "message for another migration on this session")
        expected = self._next_seq[sender]
        if msg.seq != expected:
            raise PalmError(ErrorCode.SEQUENCE,
                            f"{body.TYPE} seq {msg.seq}, expected {expected} (replayed, reordered or dropped)")
        stream = self.stream
        if isinstance(body, Begin):
            if body.backend not in messages.PAGE_BACKENDS | messages.STREAM_BACKENDS:
                raise PalmError(ErrorCode.UNSUPPORTED, f"unknown backend {body.backend[:16]!r}")
            if (body.backend in messages.STREAM_BACKENDS) != bool(body.spec):
                raise PalmError(ErrorCode.MALFORMED, "BEGIN's spec must be set exactly for a stream backend")
            stream = body.backend in messages.STREAM_BACKENDS
        if type(body) in (STREAM_ONLY if not stream else PAGE_ONLY):
            raise PalmError(ErrorCode.OUT_OF_STATE, f"{body.TYPE} is not part of a "
                                                    f"{'stream' if stream else 'page'} migration")
        postcopy = self.postcopy or isinstance(body, Missing)
        if isinstance(body, Outcome) and body.outcome == RecoveryOutcome.POSTCOPY:
            nxt, postcopy = State.SERVING, True  # the one value-dependent move: serving resumes
        if (isinstance(body, Running) and not postcopy) or (isinstance(body, Done) and postcopy):
            raise PalmError(ErrorCode.OUT_OF_STATE, f"{body.TYPE} answers a {'pre' if postcopy else 'post'}-copy "
                                                    "migration's COMMIT")
        if isinstance(body, Want) and not self.recovery:
            raise PalmError(ErrorCode.OUT_OF_STATE, "WANT outside a recovery session")
        parts = self._context_parts
        if isinstance(body, Context):
            # Context chunks arrive in order, each naming the same total.
            if body.index != parts or body.index >= body.total:
                raise PalmError(ErrorCode.SEQUENCE, "protected-context chunks out of order")
            parts += 1
        if isinstance(body, Complete) and not stream and not self.data and parts == 0:
            raise PalmError(ErrorCode.OUT_OF_STATE, "COMPLETE before the protected-context blob")
        self.stream, self._context_parts, self.postcopy = stream, parts, postcopy
        self._next_seq[sender] = expected + 1
        self._bulk[sender].due, self._bulk[sender].index = body.bulk, 0
        self.state = nxt

    @staticmethod
    def _data(bulk: _Bulk, size: int) -> tuple[int, bool]:
        """A data record of ``size`` bytes: its index and whether it is the last."""
        due = bulk.due
        if due == 0:
            raise PalmError(ErrorCode.OUT_OF_STATE, "a data record without a message announcing it")
        if size != min(DATA_RECORD, due):
            raise PalmError(ErrorCode.MALFORMED, f"a data record of {size} bytes, {min(DATA_RECORD, due)} due")
        index = bulk.index
        bulk.due, bulk.index = due - size, index + 1
        return index, due == size

    @property
    def data_due(self) -> bool:
        """Data records must come next from the peer (not a message)."""
        return self._bulk[self.peer_role].due > 0

    def send(self, body: Body) -> bytes:
        """Checks and encodes our next message (LocalProtocolError if we may not send it)."""
        if self.mid is None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "no migration id set")
        if self._bulk[self.role].due:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "the data records of the last message are due")
        if self._lease is not None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "our STREAM messages are leased out")
        msg = Message(self.mid, self._next_seq[self.role], body)
        try:
            self._advance(self.role, msg)
        except PalmError as exc:
            raise LocalProtocolError(exc.code, exc.detail) from None
        return messages.encode(msg)

    def send_data(self, data: Buffer) -> list[memoryview]:
        """The whole bulk the last message announced, as the plaintexts of its data records."""
        view = memoryview(data).cast("B")
        bulk = self._bulk[self.role]
        if len(view) != bulk.due:
            raise LocalProtocolError(ErrorCode.MALFORMED, f"{len(view)} bytes of data, {bulk.due} due")
        parts = [view[i : i + DATA_RECORD] for i in range(0, len(view), DATA_RECORD)]
        for part in parts:
            self._data(bulk, len(part))
        return parts

    def can_send(self, cls: type[Body]) -> bool:
        return (self.state, self.role, cls) in TRANSITIONS and not self._bulk[self.role].due and self._lease is None

    def lease_stream(self) -> StreamLease:
        """Our next STREAM messages, to be made elsewhere (StreamLease); only in a stream
        session's state that a STREAM keeps, with nothing due or leased already."""
        if self.mid is None or not self.stream or TRANSITIONS.get((self.state, self.role, Stream)) is not self.state:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"no STREAM to lease in state {self.state.value}")
        if self._bulk[self.role].due or self._lease is not None:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "the last message's data, or a lease, is still out")
        self._lease = StreamLease(self.mid, self._next_seq[self.role])
        return self._lease

    def end_lease(self, lease: StreamLease) -> None:
        """The lease is back: what it made was sent (or the session is failing anyway)."""
        if lease is not self._lease:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "not this session's lease")
        self._next_seq[self.role], self._lease = lease.seq, None

    def receive_message(self, data: Buffer, authenticated: bool = True) -> Message:
        """As ``receive``, where a message must come (the destination sends no data)."""
        ev = self.receive(data, authenticated)
        if not isinstance(ev, Message):
            raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "a data record where a message was due")
        return ev

    def receive(self, data: Buffer, authenticated: bool = True) -> Message | Data:
        """The peer's next record, checked: a message (decoded), or a data record
        (``authenticated``: it came sealed)."""
        bulk = self._bulk[self.peer_role]
        if bulk.due:
            try:
                index, last = self._data(bulk, len(data))
            except PalmError as exc:
                raise RemoteProtocolError(exc.code, exc.detail) from None
            return Data(data, index, last)  # only PAGES and STREAM have data: CLEAR_ALLOWED
        msg = messages.decode(data)
        if not authenticated and type(msg.body) not in CLEAR_ALLOWED:
            raise RemoteProtocolError(ErrorCode.UNAUTHENTICATED, f"{msg.type} arrived in a clear record")
        try:
            self._advance(self.peer_role, msg)
        except PalmError as exc:
            raise RemoteProtocolError(exc.code, exc.detail) from None
        return msg
