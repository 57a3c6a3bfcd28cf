"""Drive the migration engines without sockets, threads or a clock: what the
trio shells do, done synchronously, for tests that feed exact inputs.

``SourcePlayer`` performs a source engine's effects on a model VM
(palm_net.migration.hosts.SourceHost) and yields its records; with it,
``source_messages`` plays a source's rounds (its records: messages, and the
data records after PAGES; ``units`` groups them).  ``DestinationDriver``
feeds a destination engine record by record and performs its effects with
a real VM and store (DestinationHost), returning the messages it would
send.  ``SourceDriver`` runs a whole migration between the two.  None of
this imports trio.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from palm_net.channel.records import Record
from palm_net.errors import PalmError
from palm_net.hypervisor.backend import Backend, HostedVM
from palm_net.migration.destination import DestinationEngine
from palm_net.migration.effects import (
    CollectDirty,
    Effect,
    Note,
    Opened,
    OpenIncoming,
    PagesSent,
    ReadTranscript,
    Result,
    Send,
    SendPages,
    Transcript,
)
from palm_net.migration.handoff import HandoffStore, Peer
from palm_net.migration.hosts import DestinationHost, SourceHost, error_of
from palm_net.migration.params import MigrationParams, Step
from palm_net.migration.source import SourceEngine
from palm_net.wire import messages
from palm_net.wire.messages import DATA_RECORD, MAX_DATA_PAGES, PAGE_SIZE, Accept, Begin, Message
from palm_net.wire.protocol import State

PEER = Peer("src", bytes(32), bytes(32))
PEER_DEST = Peer("dst", bytes(32), bytes(32))


class Unit:
    """A message and its data records (a PAGES or STREAM message's bulk), as tests
    drop, repeat, reorder or alter them whole."""

    def __init__(self, msg: Message, data: list[bytes]) -> None:
        self.msg = msg
        self.data = data

    def __repr__(self) -> str:
        return f"Unit({self.msg!r}, {len(self.data)} data records)"

    @property
    def body(self) -> Any:
        return self.msg.body

    def records(self) -> list[bytes]:
        return [messages.encode(self.msg), *self.data]


def units(records: list[bytes]) -> list[Unit]:
    """Records grouped into units (the data records after each message that announced them)."""
    out: list[Unit] = []
    i = 0
    while i < len(records):
        msg = messages.decode(records[i])
        n = -(-msg.body.bulk // DATA_RECORD)
        out.append(Unit(msg, records[i + 1 : i + 1 + n]))
        i += 1 + n
    return out


def renumber(us: list[Unit]) -> list[bytes]:
    """The records of ``us``, re-sequenced (after a test removed or added units)."""
    out: list[bytes] = []
    for i, u in enumerate(us):
        out += Unit(Message(u.msg.mid, i, u.msg.body), u.data).records()
    return out


def split_data(data: bytes) -> list[bytes]:
    return [data[i : i + DATA_RECORD] for i in range(0, len(data), DATA_RECORD)]


def _hash_chain(h: bytes, record: bytes) -> bytes:
    """A stand-in for the channel's running transcript hash (only its equality matters here)."""
    return hashlib.blake2b(h + record, digest_size=32).digest()


class SourcePlayer:
    """A source engine and a synchronous stand-in for its shell (palm_net.migration.runner's
    SourceRun): it performs the engine's effects on a model VM and a store with a
    virtual clock that moves ``TICK`` an effect, and yields the records the engine
    sends.  ``reply(record, transcript_before)`` answers each (the destination's
    records, if any);
    ``between(r)`` runs after round r's pages are read (a guest may write then)."""

    TICK = 0.001

    def __init__(self, vm: Backend, engine: SourceEngine, store: HandoffStore | None = None,
                 reply: Callable[[bytes, bytes], list[bytes]] | None = None,
                 between: Callable[[int], None] | None = None) -> None:
        self.vm = vm
        self.engine = engine
        self.store = store
        self.reply = reply
        self.between = between
        self.now = 0.0
        self.transcript = bytes(32)
        self.records_sent = 0
        self.queue: deque[Effect] = deque()
        self.host = SourceHost(vm, store, engine.mid, lambda: self.now)
        self.started = False
        self.effects: list[Effect] = []  # every effect performed, in order (what a test may check)

    def _sent(self, records: list[bytes]) -> Iterator[bytes]:
        for r in records:
            self.engine.sent(len(r) + 16)  # its tag
            before, self.transcript = self.transcript, _hash_chain(self.transcript, r)
            self.records_sent += 1
            yield r
            if self.reply is not None:
                for answer in self.reply(r, before):
                    self.queue.extend(self.engine.on_record(Record(answer, 0, bytes(32)), self.now))

    def run(self, until: type[Effect] | None = None) -> Iterator[bytes]:
        """The records sent, from BEGIN to DONE, or to just before the first effect of type ``until``."""
        eng = self.engine
        if not self.started:
            self.started = True
            self.queue.extend(eng.start(self.now))
        while eng.step is not Step.DONE:
            if not self.queue:
                due = eng.timer()
                assert due is not None, f"{eng!r} waits for nothing"
                self.now = max(self.now, due)
                self.queue.extend(eng.on_timer(self.now))
                continue
            if until is not None and isinstance(self.queue[0], until):
                return
            eff = self.queue.popleft()
            self.effects.append(eff)
            self.now += self.TICK
            result: Result | None = None
            if isinstance(eff, Send):
                yield from self._sent([eff.data])
            elif isinstance(eff, SendPages):
                yield from self._pages(eff)
                result = PagesSent()
            else:
                result = self._perform(eff)
            if result is not None:
                self.queue.extend(eng.on_result(result, self.now))

    def _pages(self, eff: SendPages) -> Iterator[bytes]:
        gfns, i = eff.gfns, 0
        out = np.empty((MAX_DATA_PAGES, PAGE_SIZE), np.uint8)
        while i < len(gfns):
            batch, i = self.vm.read_pages(gfns, i, eff.round, out)
            yield from self._sent([bytes(r) for r in self.engine.pages(batch, len(gfns) - i)])  # ``out`` is reused

    def _perform(self, eff: Effect) -> Result | None:
        if isinstance(eff, Note):
            return None
        if isinstance(eff, ReadTranscript):
            return Transcript(self.records_sent, self.transcript)
        if isinstance(eff, CollectDirty) and self.between is not None:
            self.between(self.engine.round)
        return self.host.perform(eff)


def _accept(engine: SourceEngine) -> Callable[[bytes, bytes], list[bytes]]:
    """A destination that only answers BEGIN, with ACCEPT."""
    def reply(record: bytes, _: bytes) -> list[bytes]:
        return [messages.encode(Message(engine.mid, 0, Accept()))] if engine.step is Step.OPENING else []
    return reply


def source_stream(vm: Backend, engine: SourceEngine, rounds: int,
                  between: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """A page migration's records, BEGIN to the last CONTEXT, made lazily (a guest may
    write between any two): pre-copy rounds as the engine decides, at most ``rounds``
    (``between(r)`` runs after each round's pages), then stop-and-copy.  ACCEPT is
    played here; ROUND_DONE is not (the catch-up wait runs out on the virtual clock)."""
    engine.params = replace(engine.params, max_rounds=min(engine.params.max_rounds, rounds))
    player = SourcePlayer(vm, engine, reply=_accept(engine), between=between)
    return player.run(until=ReadTranscript)


def source_messages(vm: Backend, params: MigrationParams, rounds: int = 1,
                    between: Callable[[int], None] | None = None) -> tuple[SourceEngine, list[bytes]]:
    engine = SourceEngine(os.urandom(16), vm.info, params)
    return engine, list(source_stream(vm, engine, rounds, between))


class DestinationDriver:
    """A destination engine and a synchronous stand-in for its shell."""

    def __init__(self, store: HandoffStore, make_vm: Callable[[bytes, Begin], HostedVM],
                 plain: bool = False, max_pages: int = 1 << 20) -> None:
        self.engine = DestinationEngine(plain, max_pages)
        self.host = DestinationHost(store, SigningKey.generate(), PEER)
        self.store = store
        self.make_vm = make_vm
        self.index = 0

    @property
    def vm(self) -> HostedVM | None:
        return self.host.vm

    def feed(self, data: bytes, transcript_before: bytes = b"T" * 32, authenticated: bool = True) -> list[bytes]:
        """One record; the messages the destination sends in answer."""
        rec = Record(data, self.index, transcript_before, authenticated)
        self.index += 1
        return self.perform(self.engine.on_record(rec))

    def perform(self, effects: list[Effect]) -> list[bytes]:
        sent: list[bytes] = []
        for eff in effects:
            if isinstance(eff, Send):
                sent.append(eff.data)
                continue
            if isinstance(eff, OpenIncoming):
                vm = self.make_vm(eff.mid, eff.begin)
                if eff.begin.digest:
                    vm.start_page_digest()
                self.store.open_incoming(eff.mid, eff.begin.vm, eff.begin.vm_id, PEER)
                self.host.vm = vm
                result = Opened(vm.info.protected_pages)
            else:
                result = self.host.perform(eff, self.engine.mid)  # type: ignore[assignment]
            if result is not None:
                sent += self.perform(self.engine.on_result(result))
        return sent

    def fail(self, error: Exception) -> list[bytes]:
        return self.perform(self.engine.fail(error_of(error)))

    @property
    def state(self) -> State:
        return self.engine.state


class SourceDriver:
    """A whole migration between the two engines, each with its synchronous shell, a
    model VM and a store on either side: no sockets, no threads, no clock (as
    aioquic's tests connect a client and a server).  ``deliver(record)`` may alter
    or drop (None) each record on its way to the destination."""

    def __init__(self, src: Backend, src_store: HandoffStore, dest: DestinationDriver, params: MigrationParams,
                 between: Callable[[int], None] | None = None,
                 deliver: Callable[[bytes], bytes | None] | None = None) -> None:
        self.dest = dest
        self.deliver = deliver
        mid = os.urandom(16)
        src_store.open_outgoing(mid, src, PEER_DEST)
        self.engine = SourceEngine(mid, src.info, params,
                                   peer_sign_pub=bytes(dest.host.signing.verify_key))
        self.player = SourcePlayer(src, self.engine, src_store, self._reply, between)
        self.replies: list[bytes] = []  # every message the destination sent

    def _reply(self, record: bytes, transcript_before: bytes) -> list[bytes]:
        if self.deliver is not None:
            altered = self.deliver(record)
            if altered is None:
                return []
            record = altered
        try:
            answers = self.dest.feed(record, transcript_before)
        except PalmError as exc:  # the destination's shell: abort forever, ABORT
            answers = self.dest.fail(exc)
        self.replies += answers
        return answers

    def run(self) -> list[bytes]:
        """The migration to DONE (or what an engine raised); the records the source sent."""
        return list(self.player.run())
