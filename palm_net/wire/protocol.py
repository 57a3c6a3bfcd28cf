"""The session state machine (sans-IO), in the manner of h11's _state.py.

One ``SessionProtocol`` object lives at each end of a session and sees every
message in both directions.  A message is allowed only if the table below has
an entry for (current state, sender role, type); the entry gives the next
state.  Sequence numbers count up by one per direction from 0, and the
migration id is fixed by the first message: replayed, reordered, foreign or
out-of-state messages are ProtocolErrors.
"""

from __future__ import annotations

import enum
from typing import Any

from palm_net.wire import messages
from palm_net.wire.errors import ProtocolError
from palm_net.wire.messages import Message


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


S, D = Role.SOURCE, Role.DESTINATION

TRANSITIONS: dict[tuple[State, Role, str], State] = {
    (State.IDLE, S, "BEGIN"): State.BEGUN,
    (State.RECOVERY, S, "QUERY"): State.QUERIED,
    (State.BEGUN, D, "ACCEPT"): State.STREAMING,
    (State.STREAMING, S, "KEYS"): State.STREAMING,
    (State.STREAMING, S, "PAGES"): State.STREAMING,
    (State.STREAMING, S, "ROUND_END"): State.STREAMING,
    (State.STREAMING, S, "CPU_STATE"): State.STOPPED,
    (State.STREAMING, S, "STREAM"): State.STREAMING,
    (State.STREAMING, S, "STREAM_END"): State.SEALED,
    (State.SEALED, S, "COMPLETE"): State.VERIFYING,
    (State.STOPPED, S, "CONTEXT"): State.STOPPED,
    (State.STOPPED, S, "COMPLETE"): State.VERIFYING,
    (State.VERIFYING, D, "READY"): State.PREPARED,
    (State.PREPARED, S, "COMMIT"): State.COMMITTING,
    (State.COMMITTING, D, "DONE"): State.DONE,
    (State.QUERIED, D, "OUTCOME"): State.CLOSED,
}
# ABORT may end the session from any state before the handoff completes, by
# either side; after COMMIT only the destination may abort (with a token).
for _state in (State.BEGUN, State.STREAMING, State.STOPPED, State.SEALED, State.VERIFYING, State.PREPARED):
    TRANSITIONS[(_state, S, "ABORT")] = State.ABORTED
    TRANSITIONS[(_state, D, "ABORT")] = State.ABORTED
TRANSITIONS[(State.COMMITTING, D, "ABORT")] = State.ABORTED

TERMINAL = frozenset({State.DONE, State.ABORTED, State.CLOSED})
# What carries the VM depends on BEGIN's backend: page records, or a stream.
PAGE_ONLY = frozenset({"KEYS", "PAGES", "ROUND_END", "CPU_STATE", "CONTEXT"})
STREAM_ONLY = frozenset({"STREAM", "STREAM_END"})
# The only messages that may travel unauthenticated (CLEAR records of the
# plain benchmark mode, proto/PROTOCOL.md 5): bulk data, never a handoff step.
CLEAR_ALLOWED = frozenset({"PAGES", "STREAM"})


class SessionProtocol:
    def __init__(self, role: Role, mid: bytes | None = None, recovery: bool = False) -> None:
        """``recovery``: a RECOVERY session (QUERY and OUTCOME only), else a MIGRATION session."""
        self.role = role
        self.state = State.RECOVERY if recovery else State.IDLE
        self.last_sent: str | None = None  # type of the last message we sent
        self.mid = mid
        self._next_seq = {S: 0, D: 0}
        self._context_parts = 0
        self.stream: bool | None = None  # set by BEGIN: a stream backend

    def __repr__(self) -> str:
        return f"SessionProtocol({self.role.value}, {self.state.value})"

    @property
    def context_parts(self) -> int:
        """CONTEXT chunks accepted so far."""
        return self._context_parts

    @property
    def peer_role(self) -> Role:
        return D if self.role is S else S

    def _advance(self, sender: Role, msg: Message) -> None:
        key = (self.state, sender, msg.type)
        nxt = TRANSITIONS.get(key)
        if nxt is None:
            raise ProtocolError("out-of-state",
                                f"{msg.type} from {sender.value} not allowed in state {self.state.value}")
        if self.mid is None:
            self.mid = msg.mid
        elif msg.mid != self.mid:
            raise ProtocolError("wrong-migration", "message for another migration on this session")
        expected = self._next_seq[sender]
        if msg.seq != expected:
            raise ProtocolError("sequence",
                                f"{msg.type} seq {msg.seq}, expected {expected} (replayed, reordered or dropped)")
        if msg.type == "BEGIN":
            backend = msg.body["backend"]
            if backend not in messages.PAGE_BACKENDS | messages.STREAM_BACKENDS:
                raise ProtocolError("unsupported", f"unknown backend {backend[:16]!r}")
            if (backend in messages.STREAM_BACKENDS) != bool(msg.body["spec"]):
                raise ProtocolError("malformed", "BEGIN's spec must be set exactly for a stream backend")
            self.stream = backend in messages.STREAM_BACKENDS
        if msg.type in (STREAM_ONLY if not self.stream else PAGE_ONLY):
            raise ProtocolError("out-of-state", f"{msg.type} is not part of a "
                                                f"{'stream' if self.stream else 'page'} migration")
        if msg.type == "CONTEXT":
            # Context chunks arrive in order, each naming the same total.
            if msg.body["index"] != self._context_parts or msg.body["index"] >= msg.body["total"]:
                raise ProtocolError("sequence", "protected-context chunks out of order")
            self._context_parts += 1
        if msg.type == "COMPLETE" and not self.stream and self._context_parts == 0:
            raise ProtocolError("out-of-state", "COMPLETE before the protected-context blob")
        self._next_seq[sender] = expected + 1
        self.state = nxt

    def send(self, mtype: str, **body: Any) -> bytes:
        """Makes, checks and encodes our next message."""
        if self.mid is None:
            raise ProtocolError("out-of-state", "no migration id set")
        msg = Message(mtype, self.mid, self._next_seq[self.role], body)
        self._advance(self.role, msg)
        self.last_sent = mtype
        return messages.encode(msg)

    def receive(self, data: bytes, authenticated: bool = True) -> Message:
        """Decodes and checks the peer's next message (``authenticated``: it came sealed)."""
        msg = messages.decode(data)
        if not authenticated and msg.type not in CLEAR_ALLOWED:
            raise ProtocolError("unauthenticated", f"{msg.type} arrived in a clear record")
        self._advance(self.peer_role, msg)
        return msg
