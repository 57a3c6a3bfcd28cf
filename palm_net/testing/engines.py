"""Drive the migration engines without sockets, threads or a clock: what the
trio shells do, done synchronously, for tests that feed exact inputs.

``source_messages`` plays a source's rounds against a model VM (its records:
messages, and the data records after PAGES; ``units`` groups them);
``DestinationDriver`` feeds a destination engine message by message and
performs its effects with a real VM and store (palm_net.migration.runner's
DestinationHost), returning the messages it would send.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from nacl.signing import SigningKey

from palm_net.channel.records import Record
from palm_net.hypervisor.backend import Backend, HostedVM
from palm_net.migration.destination import DestinationEngine
from palm_net.migration.effects import Effect, Opened, OpenIncoming, Send
from palm_net.migration.handoff import HandoffStore, Peer
from palm_net.migration.params import MigrationParams
from palm_net.migration.runner import DestinationHost, session_error
from palm_net.migration.source import SourceEngine
from palm_net.wire import messages
from palm_net.wire.messages import DATA_RECORD, MAX_DATA_PAGES, PAGE_SIZE, Accept, Begin, Message
from palm_net.wire.protocol import State

PEER = Peer("src", bytes(32), bytes(32))


def read_round(engine: SourceEngine, vm: Backend) -> Iterator[bytes]:
    """The records of PAGES messages (and their data) for the engine's pending gfns,
    read from ``vm`` as the shell would."""
    gfns, i = engine.pending, 0
    out = np.empty((MAX_DATA_PAGES, PAGE_SIZE), np.uint8)
    while i < len(gfns):
        batch, i = vm.read_pages(gfns, i, engine.round, out)
        yield from map(bytes, engine.pages(batch, len(gfns) - i))  # copies: ``out`` is read into again


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


def source_stream(vm: Backend, engine: SourceEngine, rounds: int,
                  between: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """A page migration's messages, BEGIN to the last CONTEXT, made lazily (a guest may
    write between any two): ``rounds`` pre-copy rounds (``between(r)`` runs after
    each), then stop-and-copy.  ACCEPT is played here."""
    yield engine.begin()
    engine.accepted(engine.on_record(Record(messages.encode(Message(engine.mid, 0, Accept())), 0, bytes(32))))
    vm.enable_dirty_log()
    yield engine.keys(vm.export_keys())
    for r in range(rounds):
        yield from read_round(engine, vm)
        if between is not None:
            between(r)
        end, stop, _ = engine.end_round(0.01, 1 << 20, vm.collect_dirty())
        yield end
        if stop:
            break
    vm.pause()
    engine.stop_and_copy(0.0, vm.collect_dirty())
    vm.disable_dirty_log()
    yield from read_round(engine, vm)
    yield from engine.final_state(vm.export_cpu_state(), vm.export_protection())


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
        return self.perform(self.engine.fail(session_error(error)))

    @property
    def state(self) -> State:
        return self.engine.state
