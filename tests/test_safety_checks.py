"""One test for each safety check the rest of the suite did not notice missing (issue 27).

Each test sits where its check lives and fails with that check removed (the
issue's closing note says how each was removed to see it fail); the checks
that guard against an attack or a loss with nothing else behind them (1-3)
are also tested end to end, between agents.

1. the authority's signature on a certificate;
2. the source's durable hand-off before COMMIT leaves;
3. recovery asks only the recorded destination;
4. an ABORT after COMMIT with an invalid token leaves the source in doubt;
5. a clear record on the message path is refused by the channel itself;
6. no clear record is sealed in secure mode;
7. ``max_incoming`` refuses a session however much memory is free;
8. a peer allowed only by the cluster's allowlist completes the handshake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import time
from types import SimpleNamespace

import msgpack
import pytest
import trio
import trio.testing
from nacl.signing import SigningKey

from palm_net import faults
from palm_net.agent.errors import AgentError
from palm_net.agent.incoming import IncomingLimits, IncomingService, Session
from palm_net.agent.limits import Admission
from palm_net.channel.handshake import AttestedHandshake, ChannelConfig, PeerInfo, Purpose, TransportMode
from palm_net.channel.records import Record, RecordSender
from palm_net.channel.transport import accept, connect
from palm_net.cluster.gate import Lists
from palm_net.crypto.identity import (
    CERT_DOMAIN,
    AgentIdentity,
    AttestationError,
    Authority,
    Certificate,
    validate_name,
)
from palm_net.crypto.noise import CHACHAPOLY, CipherState
from palm_net.errors import ErrorCode, HandshakeError, MigrationFailure, PalmError, RemoteProtocolError
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError
from palm_net.hypervisor.model import ModelVM
from palm_net.migration import handoff, orchestrate
from palm_net.migration.effects import Effect, Result, Send
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, check_abort_token, make_abort_token
from palm_net.migration.orchestrate import MigrationResult, answer_query, override_resume, recover_once
from palm_net.migration.params import MigrationParams, MigrationStats, Phase, Status
from palm_net.migration.runner import SourceRun
from palm_net.migration.source import InDoubt, Step
from palm_net.testing.cluster import LocalCluster
from palm_net.testing.engines import DestinationDriver, SourceDriver
from palm_net.testing.hostile import HostilePeer
from palm_net.testing.proxy import DONE, FaultProxy, Rule
from palm_net.wire import messages
from palm_net.wire.messages import Abort, Begin, Commit, Message, Outcome
from palm_net.wire.protocol import Role, SessionProtocol
from tests.test_handshake import pump

# --------------------------------------------------------------------------
# 1. The authority's signature on a certificate (crypto/identity.py, Certificate.verify)

KEY = bytes(range(32))  # the model hypervisor's host key


def _rewrite(cert: Certificate, signer: Authority | None, **changes) -> Certificate:
    """``cert`` with its body changed; signed by ``signer``, or keeping its old signature."""
    body = msgpack.unpackb(cert.body, raw=False)
    body.update(changes)
    new_body = msgpack.packb(body)
    sig = signer.signing.sign(CERT_DOMAIN + new_body).signature if signer else cert.signature
    return Certificate.decode(msgpack.packb({"body": new_body, "sig": sig}))


def forgeries(authority: Authority, ident: AgentIdentity, measurement: bytes) -> dict[str, Certificate]:
    """Certificates naming ``authority`` as their issuer that it never signed."""
    real = authority.issue(ident.name, ident.static.public, ident.sign_pub, measurement)
    rogue = Authority.generate()
    return {
        # Issued by another key, with the real authority's key id written in.
        "signed by another key": _rewrite(rogue.issue(ident.name, ident.static.public, ident.sign_pub, measurement),
                                          rogue, iss=authority.key_id),
        # Genuine, then altered: each signed field in turn.
        "measurement altered": _rewrite(real, None, measurement=os.urandom(32)),
        "validity extended": _rewrite(real, None, naf=real.not_after + 86400 * 3650),
        "roles altered": _rewrite(real, None, roles=["source"]),
        "name altered": _rewrite(real, None, name="someone-else"),
        "signature of another body": Certificate.decode(msgpack.packb(
            {"body": real.body,  # (its last byte flipped: never the body itself)
             "sig": authority.signing.sign(CERT_DOMAIN + real.body[:-1] + bytes([real.body[-1] ^ 1])).signature})),
    }


def test_a_certificate_the_authority_did_not_sign_is_refused():
    authority, ident = Authority.generate(), AgentIdentity.generate("dst")
    m = os.urandom(32)
    authority.issue(ident.name, ident.static.public, ident.sign_pub, m).verify(authority.public)  # the real one
    for what, forged in forgeries(authority, ident, m).items():
        assert forged.issuer == authority.key_id, what  # the issuer check alone lets it through
        with pytest.raises(AttestationError) as info:
            forged.verify(authority.public)
        assert info.value.reason is ErrorCode.BAD_CERTIFICATE, what


def test_a_forged_certificate_is_refused_at_the_handshake(pki):
    for responder_forges in (True, False):
        ident = AgentIdentity.generate("forger")
        for what, forged in forgeries(pki.authority, ident, pki.measurement).items():
            cfg = ChannelConfig(ident, forged, pki.authority.public, pki.measurement,
                                frozenset({pki.measurement}))
            honest = pki.config("honest")
            init, resp = (honest, cfg) if responder_forges else (cfg, honest)
            a, b = AttestedHandshake(init, True), AttestedHandshake(resp, False)
            with pytest.raises(HandshakeError) as info:
                pump(a, b)
            assert info.value.code == "bad-certificate", what
            assert (a if responder_forges else b).result is None, what  # the honest side never completed


async def test_an_agent_refuses_a_forged_certificate(cluster):
    """End to end: a forger with the real authority's key id as issuer connects to a running agent."""
    b = cluster["b"]
    ident = AgentIdentity.generate("forger")
    for i, (what, forged) in enumerate(forgeries(cluster.authority, ident, cluster.measurement).items()):
        evil = HostilePeer(cluster.authority, cluster.measurement, name="forger")
        evil.config = ChannelConfig(ident, forged, cluster.authority.public, cluster.measurement,
                                    frozenset({cluster.measurement}))
        # The initiator's part of the handshake ends with its last message: it learns
        # of the refusal as the connection closing, the agent counts the reason.
        with pytest.raises((PalmError, trio.BrokenResourceError)):  # closed, or reset
            await evil.try_begin(cluster.members["b"].port, name="forged", pages=16)
        assert b.incoming.counters.get("refused-bad-certificate") == i + 1, (what, b.incoming.counters)
        assert "forged" not in b.vms and b.store.list() == [], what
    # The same peer with the certificate the authority did issue gets in: the refusal was the signature's.
    good = HostilePeer(cluster.authority, cluster.measurement, name="forger")
    ch, _, reply = await good.try_begin(cluster.members["b"].port, name="genuine", pages=16)
    await ch.aclose()
    assert reply.type == "ACCEPT"


# --------------------------------------------------------------------------
# 4. ABORT after COMMIT: only a valid token lets the source resume (runner.py, SourceRun._finish)


def _source_after_commit(shm) -> SourceDriver:
    """Two engines, sans-IO, run until COMMIT has left the source (and was lost)."""
    shm.mkdir(mode=0o700)
    src = ModelVM.create(shm / "src", "vm", 64, KEY, protected_processes=1, protected_pages=8, fill="random")
    dest = DestinationDriver(HandoffStore(shm / "dst.db"), lambda mid, b: ModelVM.create_incoming(
        shm / "dst", b.vm, b.vm_id, b.pages, b.vcpus, KEY, migration=mid))
    drv = SourceDriver(src, HandoffStore(shm / "src.db"), dest, MigrationParams(),
                       deliver=lambda r: None if drv.engine.step is Step.COMMITTING else r)
    for _ in drv.player.run():
        if drv.engine.step is Step.COMMITTING:
            break
    assert drv.engine.committed
    return drv


def _abort(drv: SourceDriver, token: bytes) -> None:
    msg = Message(drv.engine.mid, len(drv.replies), Abort("aborted", "refused", token))
    drv.engine.on_record(Record(messages.encode(msg), 0, bytes(32)), 1.0)


def test_an_abort_after_commit_needs_a_valid_token_to_resume_the_source(shm):
    for what in ("none", "garbage", "another key's", "another migration's"):
        drv = _source_after_commit(shm / what.replace(" ", "-").replace("'", ""))
        dest, mid = drv.dest.host.signing, drv.engine.mid
        token = {"none": b"", "garbage": os.urandom(64), "another key's": make_abort_token(SigningKey.generate(), mid),
                 "another migration's": make_abort_token(dest, os.urandom(16))}[what]
        with pytest.raises(InDoubt):
            _abort(drv, token)
        assert drv.engine.abort_token is None, what  # nothing the store could be asked to resume with
    drv = _source_after_commit(shm / "good")
    good = make_abort_token(drv.dest.host.signing, drv.engine.mid)
    with pytest.raises(MigrationFailure) as info:
        _abort(drv, good)
    assert info.value.code is ErrorCode.ABORTED and drv.engine.abort_token == good


# --------------------------------------------------------------------------
# 5. A clear record on the message path is refused by the channel (transport.py, SecureChannel.receive)


async def test_the_channel_refuses_a_clear_record_on_the_message_path(pki):
    s1, s2 = trio.testing.memory_stream_pair()
    out = {}
    async with trio.open_nursery() as n:
        async def server():
            out["b"] = await accept(s2, pki.config("dst", allow_plain=True))
        n.start_soon(server)
        a = await connect(s1, pki.config("src", allow_plain=True), mode=TransportMode.PLAIN_BENCHMARK)
    b = out["b"]
    assert a.plain and b.plain
    # A well-formed message, the first of a session: the protocol would take it.
    begin = SessionProtocol(Role.SOURCE, os.urandom(16)).send(
        Begin("v", os.urandom(16), 16, 0, 0, 1, True, False, "model", b""))
    SessionProtocol(Role.DESTINATION).receive_message(begin)
    await a.send_sealed(a._sender.seal(begin, clear=True))  # in the clear: only bulk data may be
    with pytest.raises(RemoteProtocolError) as info:
        await b.receive()
    assert info.value.code is ErrorCode.UNAUTHENTICATED
    await a.send(b"sealed, after")  # and the receiver stays failed: nothing more is taken
    with pytest.raises(RemoteProtocolError):  # whichever refusal: not a record
        await b.receive()


# --------------------------------------------------------------------------
# 6. No clear record in secure mode (records.py, RecordSender.seal_parts and seal_into)


def test_a_secure_sender_never_seals_a_clear_record():
    tx = RecordSender(CipherState(CHACHAPOLY, b"K" * 32))
    with pytest.raises(ValueError, match="plain benchmark mode"):
        tx.seal(b"secret page", clear=True)
    with pytest.raises(ValueError, match="plain benchmark mode"):
        tx.seal_parts(b"secret page", clear=True)
    out = bytearray(64)
    with pytest.raises(ValueError, match="plain benchmark mode"):
        tx.seal_into(b"secret page", memoryview(out), clear=True)
    assert out == bytearray(64) and tx.count == 0  # nothing written, nothing counted
    assert b"secret page" not in tx.seal(b"secret page")  # and the same record, sealed


# --------------------------------------------------------------------------
# 7. max_incoming with plenty of memory (agent/limits.py, Admission.admit)


def test_max_incoming_refuses_a_second_peer_with_memory_to_spare():
    adm = Admission(max_sessions=1, max_memory=1 << 40, max_per_peer=4, max_memory_per_peer=1 << 40)
    release = adm.admit(b"p1", 1 << 20)
    with pytest.raises(MigrationFailure) as info:
        adm.admit(b"p2", 1 << 20)
    assert info.value.code is ErrorCode.BUSY and "limit 1" in str(info.value)
    assert adm.sessions == 1 and adm.memory == 1 << 20 and b"p2" not in adm.per_peer  # nothing taken
    release()
    adm.admit(b"p2", 1 << 20)()  # a place again once the first is settled


async def test_an_agent_at_max_incoming_tells_the_second_peer_busy(nursery):
    c = LocalCluster(("b",), max_incoming=1)
    c.nursery = nursery
    try:
        b = await c.start("b")
        assert b.incoming.admission.max_memory >= 1 << 30  # memory is not what refuses
        first, second = (HostilePeer(c.authority, c.measurement, name=n) for n in ("p1", "p2"))
        ch1, _, reply1 = await first.try_begin(c.members["b"].port, name="v1", pages=16)
        ch2, _, reply2 = await second.try_begin(c.members["b"].port, name="v2", pages=16)
        await ch1.aclose()
        await ch2.aclose()
        assert reply1.type == "ACCEPT"
        assert reply2.type == "ABORT" and reply2.body.code == "busy", reply2.body
    finally:
        await c.stop("b")
        c.cleanup()


# --------------------------------------------------------------------------
# 2. The source's hand-off is durable before COMMIT leaves (runner.py, SourceRun._run)


def _is_commit(data: bytes) -> bool:
    try:
        return isinstance(messages.decode(data).body, Commit)
    except PalmError:
        return False


def _watch_commit(monkeypatch, on_commit_sent=None) -> list[HandoffState | None]:
    """The source's row state at the moment its COMMIT is put on the wire; then
    ``await on_commit_sent(mid)`` (e.g. a crash) right after it left."""
    seen: list[HandoffState | None] = []
    real_perform = SourceRun._perform

    async def perform(self: SourceRun, eff: Effect) -> Result | None:
        is_commit = isinstance(eff, Send) and _is_commit(eff.data)
        if is_commit:
            row = self.store.get(self.engine.mid)
            seen.append(row.state if row else None)
        result = await real_perform(self, eff)
        if is_commit and on_commit_sent is not None:
            await on_commit_sent(self.engine.mid)
        return result

    monkeypatch.setattr(SourceRun, "_perform", perform)
    return seen


def test_the_engines_hand_off_before_commit_leaves(shm):
    """Sans-IO: COMMIT reaches the destination only once the source's row says HANDED_OFF."""
    src = ModelVM.create(shm / "src", "vm", 64, KEY, fill="random")
    store = HandoffStore(shm / "src.db")
    dest = DestinationDriver(HandoffStore(shm / "dst.db"), lambda mid, b: ModelVM.create_incoming(
        shm / "dst", b.vm, b.vm_id, b.pages, b.vcpus, KEY, migration=mid))
    seen: list[HandoffState] = []

    def deliver(record: bytes) -> bytes:
        if _is_commit(record):
            seen.append(store.get(drv.engine.mid).state)
        return record

    drv = SourceDriver(src, store, dest, MigrationParams(), deliver=deliver)
    drv.run()
    assert seen == [HandoffState.HANDED_OFF] and drv.engine.step is Step.DONE


async def test_the_hand_off_is_durable_before_commit_leaves(cluster, monkeypatch):
    seen = _watch_commit(monkeypatch)
    a = cluster["a"]
    a.registry.create_model("vm1", 1024 * 4096, fill="random")
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok, res.error
    assert seen == [HandoffState.HANDED_OFF]


class SourceCrash(BaseException):
    """The source agent dies here: nothing of the migration's own error handling applies."""


async def test_a_source_crash_right_after_commit_leaves_one_copy(cluster, monkeypatch):
    """End to end: the source agent goes down the moment COMMIT is on the wire,
    restarts, and settles with the destination: the VM runs there only."""

    a, b = cluster["a"], cluster["b"]

    async def crash(mid: bytes) -> None:
        # Once the destination has committed (a crash closes the socket: with bytes
        # unread, a reset could drop the COMMIT before it is read, and nothing is at stake).
        with trio.fail_after(10):
            while (row := b.store.get(mid)) is None or row.state is not HandoffState.COMMITTED:
                await trio.sleep(0.01)
        raise SourceCrash

    seen = _watch_commit(monkeypatch, crash)
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="random")
    digest, mid = vm.digest(), os.urandom(16)
    with pytest.raises(SourceCrash):
        await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(), mid=mid)
    assert len(seen) == 1 and b.store.get(mid).state is HandoffState.COMMITTED
    await cluster.stop("a")
    a = await cluster.start("a")
    with trio.fail_after(10):  # the restarted source settles what it left
        while a.store.get(mid).state is HandoffState.HANDED_OFF:
            await trio.sleep(0.02)
    assert cluster.running_copies("vm1") == ["b"], (a.store.get(mid).state, a.vms.get("vm1"))
    assert "vm1" not in a.vms and a.store.get(mid).state is HandoffState.DONE
    assert b.vms["vm1"].digest() == digest


@pytest.mark.slow
def test_the_source_agent_killed_right_after_commit_leaves_one_copy():
    """End to end with real agent processes and kill -9: the source's store is frozen
    (another connection holds its write lock) from the moment READY reaches it, so
    the source stops at its hand-off. Hand-off first, COMMIT never leaves: killed
    there, the source runs the VM again after its restart, the destination aborts.
    Were COMMIT sent first, it would leave, the destination commit, and the source,
    killed before its hand-off is durable, run the VM again: two copies."""
    import signal
    import sqlite3
    import threading

    from palm_net.testing.proxy import READY, ProxyThread, sealed
    from tests.test_reliability import Pair, _wait_for

    p = Pair()
    frozen: list[sqlite3.Connection] = []
    commit_left = threading.Event()

    def freeze_source_store() -> None:
        db = sqlite3.connect(p.root / "a" / "state.db", timeout=10, isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        frozen.append(db)

    rules = [Rule("s2c", 0, "call", match=READY, callback=freeze_source_store),
             Rule("c2s", 0, "call", match=sealed("COMMIT"), callback=commit_left.set)]
    try:
        p.a.request("vm.create", name="vm1", memory="32MiB", protected=1, fill="random")
        digest = p.a.request("vm.digest", name="vm1")["digest"]
        with ProxyThread(("127.0.0.1", p.b.port), rules) as proxy:
            t, _ = p.a.migrate_async("vm1", f"127.0.0.1:{proxy.port}", timeout=120)
            _wait_for(lambda: rules[0].fired, what="READY on its way to the source")
            # The source's hand-off waits for the lock (sqlite's 5 s): well before that, it is killed.
            if commit_left.wait(1.5):  # only if COMMIT went out before the hand-off
                _wait_for(lambda: p.names(p.b).get("vm1") == "running", what="the destination to commit")
            p.a.stop(signal.SIGKILL)
            frozen[0].execute("ROLLBACK")
            frozen[0].close()
            p.a.start()
            t.join(60)
            assert p.one_copy("vm1") == "a"
            assert not commit_left.is_set(), "COMMIT left before the source's hand-off was durable"
        assert p.a.request("vm.digest", name="vm1")["digest"] == digest
    finally:
        for db in frozen:
            db.close()
        p.close()


# --------------------------------------------------------------------------
# 3. Recovery asks only the recorded destination (orchestrate.py, recover_once)


class _Answering:
    """A recovery channel to some certified agent, which answers every QUERY with ``outcome``."""

    def __init__(self, static_pub: bytes, outcome: Outcome) -> None:
        self.result = SimpleNamespace(peer=SimpleNamespace(name="other", static_pub=static_pub,
                                                           sign_pub=bytes(32)))
        self.peer_name = "other"
        self.proto = SessionProtocol(Role.DESTINATION, recovery=True)
        self.outcome = outcome
        self.queries = 0
        self._reply = b""

    async def send(self, data: bytes) -> int:
        self.proto.receive_message(data)
        self.queries += 1
        self._reply = self.proto.send(self.outcome)
        return len(data)

    async def receive(self) -> SimpleNamespace:
        return SimpleNamespace(data=self._reply)

    async def aclose(self) -> None:
        pass


def _in_doubt_source(shm, dest_static: bytes, dest_sign_pub: bytes | None = None
                     ) -> tuple[HandoffStore, ModelVM, bytes]:
    store = HandoffStore(shm / "src.db")
    vm = ModelVM.create(shm / "vm1", "vm1", 16, os.urandom(32))
    mid = os.urandom(16)
    sign_pub = dest_sign_pub if dest_sign_pub is not None else SigningKey.generate().verify_key.encode()
    store.open_outgoing(mid, vm, Peer("dst", dest_static, sign_pub, "127.0.0.1:7"))
    vm.pause()
    assert store.hand_off(mid)
    return store, vm, mid


async def test_recovery_believes_only_the_recorded_destination(shm):
    dest_static = os.urandom(32)
    store, vm, mid = _in_doubt_source(shm, dest_static)
    other = _Answering(os.urandom(32), Outcome("committed", b""))  # certified, but not the one recorded

    async def connect_recovery(addr: str):
        assert addr == "127.0.0.1:7"  # the recorded address: someone else answers there
        return other

    assert await recover_once(store, mid, vm, connect_recovery) is None
    assert store.get(mid).state is HandoffState.HANDED_OFF and vm.state == "paused"
    assert vm.digest()  # kept, not scrubbed
    # The recorded destination saying the same is believed (what the check lets through).
    (shm / "2").mkdir()
    store2, vm2, mid2 = _in_doubt_source(shm / "2", dest_static)
    same = _Answering(dest_static, Outcome("committed", b""))

    async def connect_same(addr: str):
        return same

    assert await recover_once(store2, mid2, vm2, connect_same) == "committed"
    assert store2.get(mid2).state is HandoffState.DONE
    vm.close()
    vm2.close()


async def test_another_agent_answering_recovery_at_the_recorded_address_is_not_believed(nursery, monkeypatch,
                                                                                         capsys):
    """End to end: COMMIT never reaches the destination (it aborts); at the address the
    source recorded, another agent of the cluster now answers, and says "committed".
    The source must stay in doubt with its VM kept: believing it would lose the VM."""
    from palm_net.migration import orchestrate

    c = LocalCluster(("a", "b", "c"), in_doubt_wait=0.01)
    c.nursery = nursery
    try:
        a, b, other = await c.start("a"), await c.start("b"), await c.start("c")
        real_answer = orchestrate.answer_query
        monkeypatch.setattr(orchestrate, "answer_query", lambda store, signing, mid, asker: (
            Outcome("committed", b"") if store is other.store else real_answer(store, signing, mid, asker)))
        vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
        digest = vm.digest()
        # COMMIT (c2s frame 10 for this VM, see test_migration_e2e's PHASES) is cut, and so are
        # the recovery sessions while the migration waits: the source is left in doubt.
        proxy = FaultProxy(("127.0.0.1", c.members["b"].port),
                           [Rule("c2s", 10, "cut")] + [Rule("c2s", 0, "cut", connection=i) for i in (1, 2, 3)])
        await nursery.start(proxy.serve)
        res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
        assert res.status == "in-doubt", res.error
        with trio.fail_after(10):  # the destination never saw COMMIT: it aborts for good (and forgets the VM)
            while (row := b.store.get(res.mid)) is None or row.state is not HandoffState.ABORTED or "vm1" in b.vms:
                await trio.sleep(0.02)
        proxy.rules.clear()
        asked = proxy.connections
        capsys.readouterr()
        proxy.target = ("127.0.0.1", c.members["c"].port)  # the recorded address now leads to c
        status = await a.outgoing.resolve(res.mid.hex(), override=False, reason="")
        assert proxy.connections > asked  # the recorded address was asked (c answered there)
        assert a.store.get(res.mid).state is HandoffState.HANDED_OFF, status
        assert "vm1" in a.vms and a.vms["vm1"].state == "paused" and a.vms["vm1"].digest() == digest
        assert "recovery reached another agent" in "".join(capsys.readouterr())
        assert "vm1" not in b.vms and "vm1" not in other.vms
        # And the destination it recorded, asked again, settles it: the VM runs on the source again.
        proxy.target = ("127.0.0.1", c.members["b"].port)
        assert await a.outgoing.resolve(res.mid.hex(), override=False, reason="") == "aborted"
        assert c.running_copies("vm1") == ["a"] and a.vms["vm1"].digest() == digest
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


# --------------------------------------------------------------------------
# 3b. Recovery's other decisions (orchestrate.py; the mutation run of issue 27 part 2,
# docs/MUTATION.md): what the source does with each answer, what the destination
# answers whom, the operator's override, and what the operator is told.


def _answering(dest_static: bytes, outcome: Outcome, asked: list[str]):
    channel = _Answering(dest_static, outcome)

    async def connect_recovery(addr: str):
        asked.append(addr)
        return channel
    return connect_recovery


async def test_recovery_acts_on_the_row_first_then_only_on_a_commit_or_a_valid_token(shm):
    dest_key, dest_static, asked = SigningKey.generate(), os.urandom(32), []
    store, vm, mid = _in_doubt_source(shm, dest_static, dest_key.verify_key.encode())
    # Nothing to ask about: no row, or a row of this agent as a destination (not "aborted").
    incoming = os.urandom(16)
    store.open_incoming(incoming, "in", b"I" * 16, Peer("src", dest_static, bytes(32), "127.0.0.1:7"))
    for other in (os.urandom(16), incoming):
        assert await recover_once(store, other, vm, _answering(dest_static, Outcome("committed", b""), asked)) is None
    assert asked == [] and store.state_of(incoming) is HandoffState.RECEIVING

    # The destination unreachable, or no usable answer: still in doubt, the VM paused and kept.
    async def unreachable(addr: str):
        raise OSError("connection refused")

    async def refused(addr: str):
        raise HandshakeError(ErrorCode.BAD_CERTIFICATE, "refused")

    for connect_recovery in (unreachable, refused, _answering(dest_static, Outcome("unknown", b""), asked),
                             _answering(dest_static, Outcome("aborted", b""), asked),  # without its token
                             _answering(dest_static, Outcome("aborted", make_abort_token(SigningKey.generate(), mid)),
                                        asked),  # another key's
                             _answering(dest_static, Outcome("aborted", make_abort_token(dest_key, os.urandom(16))),
                                        asked)):  # another migration's
        assert await recover_once(store, mid, vm, connect_recovery) is None
        assert store.state_of(mid) is HandoffState.HANDED_OFF and vm.state == "paused" and vm.dir.exists()
    assert asked == ["127.0.0.1:7"] * 4
    # A valid token beside another word: a contradiction, not acted on.
    token = make_abort_token(dest_key, mid)
    assert await recover_once(store, mid, vm, _answering(dest_static, Outcome("unknown", token), asked)) is None
    assert store.state_of(mid) is HandoffState.HANDED_OFF and vm.state == "paused"
    # A valid token: the VM runs here again.
    assert await recover_once(store, mid, vm, _answering(dest_static, Outcome("aborted", token), asked)) == "aborted"
    row = store.get(mid)
    assert row.state is HandoffState.ABORTED and row.token == token and vm.state == "running"
    assert row.error == "aborted by destination token"
    # Settled: the row answers, no one is asked.
    asked.clear()
    assert await recover_once(store, mid, vm, _answering(dest_static, Outcome("committed", b""), asked)) == "aborted"
    assert asked == [] and vm.state == "running"
    vm.close()
    # "committed": DONE, and this copy is scrubbed; asked again, the row answers.
    (shm / "2").mkdir()
    store2, vm2, mid2 = _in_doubt_source(shm / "2", dest_static)
    assert await recover_once(store2, mid2, vm2, _answering(dest_static, Outcome("committed", b""), asked)) \
        == "committed"
    assert store2.state_of(mid2) is HandoffState.DONE and not vm2.dir.exists()
    asked.clear()
    assert await recover_once(store2, mid2, None, _answering(dest_static, Outcome("aborted", token), asked)) \
        == "committed"
    assert asked == []


def test_the_destination_answers_a_query_only_to_the_source_it_recorded(shm):
    store, signing = HandoffStore(shm / "dst.db"), SigningKey.generate()
    src = Peer("src", os.urandom(32), os.urandom(32))
    other = Peer("other", os.urandom(32), os.urandom(32))
    verify = signing.verify_key.encode()

    def aborted_with_its_token(answer: Outcome, mid: bytes) -> bool:
        return answer.outcome == "aborted" and check_abort_token(verify, mid, answer.token)

    # In flight: the recorded source's query aborts it for good, with the token.
    mid = os.urandom(16)
    store.open_incoming(mid, "vm1", b"V" * 16, src)
    answer = answer_query(store, signing, mid, other)  # another agent: told nothing, nothing changes
    assert answer == Outcome("unknown", b"") and store.state_of(mid) is HandoffState.RECEIVING
    answer = answer_query(store, signing, mid, src)
    assert aborted_with_its_token(answer, mid) and store.state_of(mid) is HandoffState.ABORTED
    assert store.get(mid).error == "aborted on recovery query"
    assert answer_query(store, signing, mid, other) == Outcome("unknown", b"")  # still nothing for another
    # Committed: "committed", to the recorded source only; the row stays committed.
    done = os.urandom(16)
    store.open_incoming(done, "vm2", b"W" * 16, src)
    assert store._move(done, Role.DESTINATION, handoff.Step.PREPARE)
    assert store._move(done, Role.DESTINATION, handoff.Step.COMMIT)
    assert answer_query(store, signing, done, other) == Outcome("unknown", b"")
    assert answer_query(store, signing, done, src) == Outcome("committed", b"")
    assert store.state_of(done) is HandoffState.COMMITTED
    # Never seen: recorded aborted for the one who asked (a late BEGIN is refused), its token to it.
    unseen = os.urandom(16)
    assert aborted_with_its_token(answer_query(store, signing, unseen, src), unseen)
    row = store.get(unseen)
    assert row.role is Role.DESTINATION and row.state is HandoffState.ABORTED and row.is_peer(src.static_pub)
    # A BEGIN of another peer with that id wins the race to the row: not the asker's, nothing handed out.
    raced = os.urandom(16)
    real_record_unknown = store.record_unknown

    def begun_meanwhile(mid: bytes, peer: Peer) -> None:
        store.open_incoming(mid, "vm4", b"X" * 16, other)
        real_record_unknown(mid, peer)  # (the id exists: it records nothing)

    store.record_unknown = begun_meanwhile
    assert answer_query(store, signing, raced, src) == Outcome("unknown", b"")
    assert store.state_of(raced) is HandoffState.RECEIVING and store.get(raced).is_peer(other.static_pub)
    store.record_unknown = real_record_unknown
    # This agent's own outgoing migration with that id: not a destination's to answer.
    out = os.urandom(16)
    vm = ModelVM.create(shm / "vm3", "vm3", 16, KEY)
    store.open_outgoing(out, vm, src)
    assert answer_query(store, signing, out, src) == Outcome("unknown", b"")
    assert store.state_of(out) is HandoffState.SENDING
    vm.close()


def test_the_operator_s_override_resumes_only_an_in_doubt_vm_and_says_so_in_its_row(shm):
    store, vm, mid = _in_doubt_source(shm, os.urandom(32))
    with pytest.raises(MigrationFailure) as info:  # no such migration
        override_resume(store, os.urandom(16), vm, "operator")
    assert info.value.code is ErrorCode.VM_STATE and vm.state == "paused"
    override_resume(store, mid, vm, "the destination host burned down")
    row = store.get(mid)
    assert row.state is HandoffState.ABORTED and vm.state == "running"
    assert row.error == "OPERATOR OVERRIDE: the destination host burned down"
    with pytest.raises(MigrationFailure) as info:  # settled: nothing more to override
        override_resume(store, mid, vm, "again")
    assert info.value.code is ErrorCode.VM_STATE
    vm.close()
    (shm / "2").mkdir()
    store2, vm2, mid2 = _in_doubt_source(shm / "2", os.urandom(32))
    assert store2.confirm(mid2)  # DONE: the destination runs it
    with pytest.raises(MigrationFailure) as info:
        override_resume(store2, mid2, vm2, "operator")
    assert info.value.code is ErrorCode.VM_STATE and vm2.state == "paused"
    vm2.close()


def test_a_settled_in_doubt_migration_is_reported_where_its_vm_runs():
    mid, started = os.urandom(16), time.monotonic() - 5
    stats = MigrationStats()
    assert orchestrate._recovered("committed", "vm1", mid, stats, started, "dst") == MigrationResult(
        True, mid, "vm1", "completed", stats, runs_on="destination", peer="dst", extra={"recovered": True})
    assert stats.status is Status.COMPLETED and 5 <= stats.total_time < 60
    stats = MigrationStats()
    assert orchestrate._recovered("aborted", "vm1", mid, stats, started, "dst") == MigrationResult(
        False, mid, "vm1", "failed", stats, "aborted: destination issued an abort token", "in-doubt", "source", "dst")
    assert stats.status is Status.FAILED and 5 <= stats.total_time < 60


class _Asking:
    """A recovery session as the destination sees it: one QUERY about ``mid`` from ``peer``; keeps the reply."""

    def __init__(self, peer: Peer, mid: bytes) -> None:
        self.result = SimpleNamespace(peer=SimpleNamespace(name=peer.name, static_pub=peer.static_pub,
                                                           sign_pub=peer.sign_pub), purpose=Purpose.RECOVERY)
        self.source = SessionProtocol(Role.SOURCE, mid, recovery=True)
        self._query = self.source.send(messages.Query())
        self.replies: list[bytes] = []

    async def receive(self) -> SimpleNamespace:
        return SimpleNamespace(data=self._query)

    async def send(self, data: bytes) -> int:
        self.replies.append(data)
        return len(data)


async def test_a_query_about_an_id_never_seen_is_recorded_against_the_asker_and_answered_with_its_token(shm):
    store, signing = HandoffStore(shm / "dst.db"), SigningKey.generate()
    src = Peer("src", os.urandom(32), os.urandom(32))
    mid = os.urandom(16)
    channel = _Asking(src, mid)
    assert await orchestrate.serve_incoming(channel, store, signing, None, 16) is None
    (reply,) = channel.replies
    answer = channel.source.receive_message(reply).get(Outcome)
    assert answer.outcome == "aborted" and check_abort_token(signing.verify_key.encode(), mid, answer.token)
    row = store.get(mid)  # a late BEGIN with this id is refused: the row is there, the asker's
    assert row.state is HandoffState.ABORTED and row.peer == Peer("src", src.static_pub, src.sign_pub)


async def test_an_incoming_session_s_run_gets_the_agent_s_bounds_and_key_and_is_listed_while_it_runs(shm, monkeypatch):
    """What the agent's recheck (a peer revoked in flight) and its stop (wait for a commit) look
    through: the runs listed while they run, and only then."""
    listed: list[dict] = []

    async def run(self) -> None:
        listed.append(dict(runs))

    monkeypatch.setattr(orchestrate.DestinationRun, "run", run)
    store, signing, runs = HandoffStore(shm / "dst.db"), SigningKey.generate(), {}
    channel = SimpleNamespace(peer_name="src", result=SimpleNamespace(
        peer=SimpleNamespace(name="src", static_pub=os.urandom(32), sign_pub=os.urandom(32)),
        purpose=Purpose.MIGRATION, mode=TransportMode.SECURE))
    got = await orchestrate.serve_incoming(channel, store, signing, None, 1234, 77.0, runs)
    assert listed == [{id(got): got}] and runs == {}
    assert (got.engine.max_pages, got.engine.deadline_per_gib, got.engine.plain_session) == (1234, 77.0, False)
    assert got.host.signing is signing and got.host.store is store


def _fails_with_eio() -> None:
    raise OSError(errno.EIO, "Input/output error")


async def test_a_failure_before_the_handoff_is_reported_with_its_phase_and_where_the_vm_runs(shm, monkeypatch):
    store = HandoffStore(shm / "src.db")
    peer = Peer("dst", os.urandom(32), os.urandom(32), "127.0.0.1:7")
    error = MigrationFailure(ErrorCode.TIMEOUT, "the destination went quiet")
    for resumes in (True, False):
        vm = ModelVM.create(shm / f"vm-{resumes}", "vm1", 16, KEY)
        mid = os.urandom(16)
        store.open_outgoing(mid, vm, peer)
        vm.pause()
        if not resumes:  # the row is written, the VM does not run: the agent retries it
            monkeypatch.setattr(vm, "resume_after_migration", _fails_with_eio)
        stats = MigrationStats()
        stats.phase = Phase.ROUND
        engine = SimpleNamespace(mid=mid, abort=lambda code: None)  # no session left to send ABORT on
        res = await orchestrate._resume_after_failure(vm, store, error, stats, time.monotonic() - 5, None, engine,
                                                      peer)
        runs_on = "source" if resumes else "source (paused: its resume failed, retried)"
        assert res == MigrationResult(False, mid, "vm1", "failed", stats, str(error), "round", runs_on, "dst")
        assert stats.status is Status.FAILED and 5 <= stats.total_time < 60
        row = store.get(mid)
        assert row.state is HandoffState.ABORTED and row.error == str(error)
        assert vm.running is resumes
        vm.close()


# --------------------------------------------------------------------------
# 3c. The source's whole migration (orchestrate.py migrate_out; the mutation run of
# issue 27, docs/MUTATION.md): the refusals before a page leaves, a cancel from
# outside before the handoff point, and what each ending after it reports.


async def test_a_migration_refused_before_its_first_message_says_why_and_leaves_the_vm_as_it_was(shm, monkeypatch):
    """No row: a VM that does not run, a protected VM in plain mode (neither connects), a
    destination that cannot be reached or fails the handshake, an attested destination
    the VM's policy does not allow, no room for the migration's row; each reported with
    its phase, the VM where it was, the channel closed."""
    store = HandoffStore(shm / "src.db")
    vm = ModelVM.create(shm / "vm1", "vm1", 16, KEY, protected_processes=1, protected_pages=2, policy="agents:b")
    connected: list[str] = []
    closed: list[str] = []

    class Attested:
        def __init__(self, name: str) -> None:
            self.result = SimpleNamespace(peer=PeerInfo(name, os.urandom(32), os.urandom(32), bytes(32)))

        async def aclose(self) -> None:
            closed.append(self.result.peer.name)

    answers = [ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
               HandshakeError(ErrorCode.BAD_CERTIFICATE, "refused"), Attested("c"), Attested("b")]

    async def connect(addr: str):
        connected.append(addr)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def no_recovery(addr: str):
        raise AssertionError("nothing to recover")

    async def migrate(params: MigrationParams) -> MigrationResult:
        mid = os.urandom(16)
        t0 = time.monotonic()
        res = await orchestrate.migrate_out(vm, store, "127.0.0.1:7", params, connect, no_recovery, mid=mid)
        assert res.mid == mid and res.stats.status is Status.FAILED
        assert 0 <= res.stats.total_time <= time.monotonic() - t0
        assert store.get(mid) is None  # refused before BEGIN: nothing recorded
        return res

    def failed(error: str, phase: str) -> MigrationResult:
        return MigrationResult(False, res.mid, "vm1", "failed", res.stats, error, phase, "source")

    vm.pause()
    res = await migrate(MigrationParams())
    assert res == failed("vm-state: VM 'vm1' is not running", "setup")
    assert connected == [] and vm.state == "paused"
    vm.resume()
    res = await migrate(MigrationParams(plain=True))
    assert (res.ok, res.status, res.phase, res.runs_on) == (False, "failed", "setup", "source")
    assert res.error.startswith("plain-refused: ") and connected == []
    res = await migrate(MigrationParams())
    assert res == failed("unreachable: destination 127.0.0.1:7 not reachable (Connection refused)", "connect")
    res = await migrate(MigrationParams())
    assert res == failed("bad-certificate: refused", "handshake")
    res = await migrate(MigrationParams())
    assert res == failed("policy: the VM's policy does not allow agent 'c'", "policy")

    def no_room(*args) -> None:
        raise MigrationFailure(ErrorCode.NO_SPACE, "no room for the migration's row")

    monkeypatch.setattr(store, "open_outgoing", no_room)
    res = await migrate(MigrationParams())
    assert res == failed("no-space: no room for the migration's row", "setup")
    assert connected == ["127.0.0.1:7"] * 4 and closed == ["c", "b"] and vm.running
    vm.close()


async def test_a_migration_cancelled_from_outside_before_the_handoff_resumes_the_vm_before_it_returns(cluster):
    """What a peer revoked in flight does (OutgoingService.cancel_before_handoff: the
    migration's cancel scope, not the operator's cancel between records): migrate_out's
    cancellation path records the abort and resumes the VM itself, from the row (SENDING),
    before the cancellation propagates; the agent then reports it cancelled, on the source.
    Asked during the rounds (the VM still runs) and once the VM is paused for stop-and-copy."""
    a = cluster["a"]
    for when in ("rounds", "paused"):
        a.registry.create_model(when, 16 << 20, fill="random", protected=1)
        cancelled: list[bool] = []

        def cancel() -> None:
            (lm,) = [lm for lm in a.outgoing.live.values() if lm.result is None]
            cancelled.append(a.outgoing.cancel_before_handoff(lm, "peer revoked"))

        def progress(stats: MigrationStats) -> None:
            if when == "rounds" and not cancelled and stats.transferred > (1 << 20):
                cancel()

        def at_the_pause(at: str) -> None:
            if when == "paused" and at == "source.Send" and a.vms[when].state == "paused" and not cancelled:
                cancel()  # the first message after the pause (its state, then READY's wait)

        params = MigrationParams(bandwidth=4 << 20) if when == "rounds" else MigrationParams()
        old = faults.install(at_the_pause)
        try:
            with trio.fail_after(30):
                res = await a.outgoing.migrate(when, cluster.addr("b"), params, on_progress=progress)
        finally:
            faults.install(old)
        assert cancelled == [True], when
        assert (res.ok, res.status, res.error, res.runs_on) == (False, "cancelled", "cancelled: peer revoked",
                                                                "source"), when
        row = a.store.get(res.mid)
        assert row.state is HandoffState.ABORTED and row.error == "cancelled: migration cancelled"
        assert a.vms[when].state == "running" and cluster.running_copies(when) == ["a"]
        assert a.registry.not_running == {}  # resumed by the migration, not left to the agent's retry


@contextlib.contextmanager
def _raising_once_at(errors: dict[str, BaseException]):
    """Each named fault point raises its error the first time it is reached."""
    fired: list[str] = []

    def inject(at: str) -> None:
        if at in errors and at not in fired:
            fired.append(at)
            raise errors[at]

    old = faults.install(inject)
    try:
        yield fired
    finally:
        faults.install(old)


async def test_a_completed_migration_says_where_the_vm_runs_and_records_its_figures(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 256 * 4096, fill="random", protected=1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res == MigrationResult(True, res.mid, "vm1", "completed", res.stats, runs_on="destination", peer="b")
    assert res.stats.status is Status.COMPLETED and 0 < res.stats.total_time < 30
    assert (res.stats.digest_at_pause, res.stats.digest_check) == (None, None)  # not asked: memory not read again
    row = a.store.get(res.mid)
    assert row.state is HandoffState.DONE and row.stats == json.loads(json.dumps(res.stats.as_dict()))
    assert "vm1" not in a.vms and cluster.running_copies("vm1") == ["b"]
    assert a.registry.to_scrub == {}  # scrubbed by the migration itself, not left to the agent's retry
    # Asked to, the source re-reads its paused copy after DONE: counted in the migration's time.
    res = await cluster["b"].outgoing.migrate("vm1", cluster.addr("a"), MigrationParams(verify_digest=True))
    assert res.ok and res.stats.digest_at_pause == "equal"
    assert 0 <= res.stats.digest_check <= res.stats.total_time < 30


async def test_a_failure_after_done_is_in_doubt_only_while_the_row_says_handed_off(cluster):
    """The destination committed and said DONE; then this side fails.  The DONE write
    failing leaves the row HANDED_OFF: reported in doubt (the VM runs on the
    destination; recovery confirms).  The scrub failing after DONE is durable: the
    migration completed (the copy goes at the agent's retry)."""
    a = cluster["a"]
    a.registry.create_model("vm1", 256 * 4096, fill="random", protected=1)
    with _raising_once_at({"source.store.confirm": sqlite3.OperationalError("disk I/O error")}) as fired:
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert fired == ["source.store.confirm"]
    assert res == MigrationResult(False, res.mid, "vm1", "in-doubt", res.stats,
                                  "committed on the destination; not recorded here (disk I/O error)",
                                  "in-doubt", "destination", "b")
    assert (res.stats.status, res.stats.phase) == (Status.IN_DOUBT, Phase.IN_DOUBT)
    assert 0 < res.stats.total_time < 30 and cluster.running_copies("vm1") == ["b"]
    with trio.fail_after(10):  # the agent's recovery asks, and confirms
        while a.store.state_of(res.mid) is not HandoffState.DONE:
            await trio.sleep(0.02)

    b = cluster["b"]
    with _raising_once_at({"source.vm.scrub": OSError(errno.EIO, "Input/output error")}) as fired:
        res = await b.outgoing.migrate("vm1", cluster.addr("a"), MigrationParams())
    assert fired == ["source.vm.scrub"]
    assert res == MigrationResult(True, res.mid, "vm1", "completed", res.stats, runs_on="destination", peer="a")
    assert b.store.state_of(res.mid) is HandoffState.DONE and cluster.running_copies("vm1") == ["a"]


async def test_an_in_doubt_source_reports_what_recovery_found_or_that_nothing_came(cluster):
    """DONE lost after the destination committed: the source's own recovery loop asks
    (again after an attempt that failed here); "committed" completes the migration
    (recovered); no answer within the wait leaves the VM paused, reported in doubt."""
    a = cluster["a"]
    a.registry.create_model("vm1", 256 * 4096, fill="random", protected=1)
    committed: list[str] = []

    def lose_done(at: str) -> None:  # DONE never leaves the destination; the first confirmation fails here
        if at == "destination.store.commit.done":
            committed.append(at)
        elif at == "destination.Send" and committed == ["destination.store.commit.done"]:
            committed.append(at)
            raise OSError(errno.EIO, "Input/output error")
        elif at == "source.store.confirm" and len(committed) == 2:
            committed.append(at)
            raise sqlite3.OperationalError("disk I/O error")

    old = faults.install(lose_done)
    try:
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert len(committed) == 3
    assert res == MigrationResult(True, res.mid, "vm1", "completed", res.stats, runs_on="destination", peer="b",
                                  extra={"recovered": True})
    assert a.store.state_of(res.mid) is HandoffState.DONE and cluster.running_copies("vm1") == ["b"]

    # No answer: DONE cut on the way back, and so is every recovery connection.
    b = cluster["b"]
    cluster.members["b"].config.in_doubt_wait = 0.3
    recovery_cut = [Rule("c2s", 0, "cut", connection=i) for i in range(1, 20)]
    proxy = FaultProxy(("127.0.0.1", cluster.members["a"].port), [Rule("s2c", 0, "cut", match=DONE), *recovery_cut])
    await cluster.nursery.start(proxy.serve)
    t0 = time.monotonic()
    res = await b.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert res == MigrationResult(False, res.mid, "vm1", "in-doubt", res.stats, res.error, "in-doubt",
                                  "none (paused, in doubt)", "a")
    assert res.error.endswith("; outcome unknown, VM paused until the destination answers") and res.error[0] != ";"
    assert (res.stats.status, res.stats.phase) == (Status.IN_DOUBT, Phase.IN_DOUBT)
    assert 0.3 <= res.stats.total_time <= time.monotonic() - t0
    assert b.store.state_of(res.mid) is HandoffState.HANDED_OFF and b.vms["vm1"].state == "paused"
    assert cluster.running_copies("vm1") == ["a"]


async def test_a_commit_the_destination_refused_with_its_token_resumes_the_vm_here(cluster):
    """The destination cannot record its commit and answers with an ABORT and its token:
    the source resumes at once, its row aborted with that token and the run's error."""
    a = cluster["a"]
    a.registry.create_model("vm1", 256 * 4096, fill="random", protected=1)
    with _raising_once_at({"destination.store.commit": sqlite3.OperationalError("disk I/O error")}) as fired:
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert fired == ["destination.store.commit"]
    assert res == MigrationResult(False, res.mid, "vm1", "failed", res.stats,
                                  "aborted: destination issued an abort token", "in-doubt", "source", "b")
    row = a.store.get(res.mid)
    assert row.state is HandoffState.ABORTED and row.token and check_abort_token(row.peer.sign_pub, res.mid, row.token)
    assert row.error.startswith("aborted: destination refused the commit: ")  # the error that ended the run
    assert cluster.running_copies("vm1") == ["a"]


async def test_a_commit_refused_with_a_token_that_does_not_verify_leaves_the_source_in_doubt(cluster, monkeypatch):
    """Item 4 end to end: the destination refuses the commit, and neither its ABORT nor
    its answers to recovery carry a token that verifies.  The source never resumes on
    them: reported in doubt, the VM paused, the row handed off, until a valid answer."""
    a, b = cluster["a"], cluster["b"]
    cluster.members["a"].config.in_doubt_wait = 0.3
    a.registry.create_model("vm1", 256 * 4096, fill="random", protected=1)
    monkeypatch.setattr(b.store, "abort_token", lambda mid, peer_static, signing: os.urandom(64))
    with _raising_once_at({"destination.store.commit": sqlite3.OperationalError("disk I/O error")}):
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res == MigrationResult(False, res.mid, "vm1", "in-doubt", res.stats,
                                  "out-of-state: an abort without a valid token after COMMIT; outcome unknown, "
                                  "VM paused until the destination answers", "in-doubt", "none (paused, in doubt)", "b")
    assert a.store.state_of(res.mid) is HandoffState.HANDED_OFF and a.vms["vm1"].state == "paused"
    monkeypatch.undo()  # the destination's answer now carries its real token: the agent's recovery resumes the VM
    with trio.fail_after(15):
        while a.store.state_of(res.mid) is not HandoffState.ABORTED or a.vms["vm1"].state != "running":
            await trio.sleep(0.05)
    assert cluster.running_copies("vm1") == ["a"]


# --------------------------------------------------------------------------
# 8. The cluster's allowlist reaches the handshake (agent/clustering.py apply_lists, cluster/gate.py)


async def test_a_peer_allowed_only_by_the_cluster_allowlist_completes_the_handshake(nursery):
    c = LocalCluster(("b",))
    c.nursery = nursery
    try:
        b = await c.start("b")
        port = c.members["b"].port
        elsewhere = os.urandom(32)  # a build only the cluster's list allows, not b's own
        assert elsewhere not in b.channel_config.allowed_measurements
        peer = HostilePeer(c.authority, elsewhere, name="newer")
        peer.config = dataclasses.replace(peer.config, allowed_measurements=frozenset({c.measurement}))
        with pytest.raises((PalmError, trio.BrokenResourceError)):  # refused: not allowed yet
            await peer.try_begin(port, name="v1", pages=16)
        assert b.incoming.counters.get("refused-measurement-not-allowed") == 1
        b.cluster.apply_lists(Lists(frozenset(), frozenset({elsewhere, c.measurement}), revision=1))
        assert b.cluster.gate.check(PeerInfo("newer", b"s" * 32, b"k" * 32, elsewhere), Purpose.MIGRATION) is None
        ch, _, reply = await peer.try_begin(port, name="v1", pages=16)
        await ch.aclose()
        assert reply.type == "ACCEPT", reply.body
        assert b.incoming.counters.get("refused-measurement-not-allowed") == 1  # no second refusal
        # And once the cluster's list no longer names it, neither the gate nor the handshake lets it in.
        b.cluster.apply_lists(Lists(frozenset(), None, revision=2))
        with pytest.raises((PalmError, trio.BrokenResourceError)):
            await peer.try_begin(port, name="v2", pages=16)
    finally:
        await c.stop("b")
        c.cleanup()


# --------------------------------------------------------------------------
# Admission and rate accounting (agent/limits.py): what the mutation run found untested


MiB = 1 << 20


def test_admission_counts_every_session_and_its_memory_and_releases_each_once():
    # A fresh peer has no session yet: with one allowed per peer, its first is admitted.
    adm = Admission(max_sessions=10, max_memory=1000 * MiB, max_per_peer=1, max_memory_per_peer=1000 * MiB)
    adm.admit(b"p1", 10 * MiB)
    with pytest.raises(MigrationFailure, match="this peer has 1"):
        adm.admit(b"p1", 10 * MiB)
    # The total: each session's memory adds up, across peers.
    adm = Admission(max_sessions=10, max_memory=100 * MiB, max_per_peer=10, max_memory_per_peer=100 * MiB)
    adm.admit(b"p1", 40 * MiB)
    adm.admit(b"p2", 40 * MiB)
    assert adm.memory == 80 * MiB
    with pytest.raises(MigrationFailure, match="exceeds 100 MiB"):
        adm.admit(b"p3", 40 * MiB)
    # A peer's share: its sessions' memory adds up, and only its own.
    adm = Admission(max_sessions=10, max_memory=1000 * MiB, max_per_peer=10, max_memory_per_peer=50 * MiB)
    r1 = adm.admit(b"p1", 20 * MiB)
    r2 = adm.admit(b"p1", 20 * MiB)
    adm.admit(b"p2", 50 * MiB)  # another peer's share is its own
    assert adm.memory_per_peer == {b"p1": 40 * MiB, b"p2": 50 * MiB} and adm.per_peer == {b"p1": 2, b"p2": 1}
    with pytest.raises(MigrationFailure, match="share of incoming memory"):
        adm.admit(b"p1", 20 * MiB)
    # Releasing one of a peer's two sessions leaves the other counted; a release is taken once.
    r1()
    assert adm.per_peer[b"p1"] == 1 and adm.memory_per_peer[b"p1"] == 20 * MiB
    r1()
    assert (adm.sessions, adm.memory, adm.per_peer[b"p1"]) == (2, 70 * MiB, 1)
    r2()
    assert b"p1" not in adm.per_peer and b"p1" not in adm.memory_per_peer and adm.sessions == 1


def test_token_buckets_refill_at_their_rate_and_forget_only_beyond_max_keys():
    from palm_net.agent.limits import TokenBuckets

    now = [1000.0]
    tb = TokenBuckets(rate=2.0, burst=3.0, max_keys=2, clock=lambda: now[0])
    assert [tb.take("a") for _ in range(4)] == [True, True, True, False]  # the burst, then none
    now[0] += 0.5  # one token back at 2 a second
    assert tb.take("a") and not tb.take("a")
    now[0] += 0.25  # half a token: not enough, and a refusal costs nothing
    assert not tb.take("a")
    now[0] += 0.25  # the other half: exactly one token
    assert tb.take("a") and not tb.take("a")
    now[0] += 100  # never more than the burst
    assert [tb.take("a") for _ in range(4)] == [True, True, True, False]
    tb.take("b")
    assert len(tb) == 2  # max_keys keys are kept...
    assert not tb.take("a")  # ...so "a" is still remembered empty
    tb.take("c")
    assert len(tb) == 2  # beyond: the least recently seen ("b") goes



def test_token_buckets_beyond_max_keys_forget_the_least_recently_seen_never_the_key_just_taken():
    """A full table forgets its oldest key: the key that just took a token stays counted.
    (Forgetting the newest instead, ``popitem(last=True)``, gave every new key a full
    bucket at each take once a flood had filled the table: no rate for new addresses.)"""
    from palm_net.agent.limits import TokenBuckets

    now = [1000.0]
    tb = TokenBuckets(rate=1.0, burst=3.0, max_keys=2, clock=lambda: now[0])
    assert tb.take("a") and tb.take("b")
    assert [tb.take("c") for _ in range(4)] == [True, True, True, False]  # "c" is counted, its burst spent
    assert len(tb) == 2
    assert [tb.take("a") for _ in range(4)] == [True, True, True, False]  # "a", the oldest, was forgotten: full

# ------------------------------------------------------------------ the incoming service's checks, alone
# (palm_net/agent/incoming.py under mutation: each test below fails with a mutant that
# survived the selection before it; docs/MUTATION.md)


def _incoming(accept_qemu: bool = True, store: object = None, registry: object = None) -> IncomingService:
    limits = IncomingLimits(4, 1 << 30, 2, 1 << 30, 1.0, 8, 100.0, 100.0)
    return IncomingService(None, store, None, registry, limits, accept_qemu)  # type: ignore[arg-type]


async def test_a_peer_refused_in_flight_ends_its_sessions_before_ready_and_only_those():
    svc = _incoming()
    code = ErrorCode.REVOKED
    evil = SimpleNamespace(name="evil")
    seen = []

    def gate(peer, purpose):
        seen.append(purpose)
        return PalmError(code, "now refused") if peer is evil else None

    svc.gate = gate  # type: ignore[assignment]

    def session(peer, outcome, with_run=True):
        ch = SimpleNamespace(result=SimpleNamespace(peer=peer, purpose=Purpose.MIGRATION), peer_name=peer.name)
        scope = trio.CancelScope()
        svc._live[object()] = (ch, scope)  # type: ignore[assignment]
        if with_run:
            svc.runs[len(svc.runs)] = SimpleNamespace(ch=ch, engine=SimpleNamespace(outcome=outcome, mid=b"\x01" * 16))  # type: ignore[assignment]
        return scope

    before_ready = session(evil, None)
    without_run = session(evil, None, with_run=False)  # before BEGIN: no run yet
    past_ready = session(evil, "ready")
    other = session(SimpleNamespace(name="good"), None)
    svc.recheck()
    assert before_ready.cancel_called and without_run.cancel_called
    assert not past_ready.cancel_called and not other.cancel_called
    assert seen == [Purpose.MIGRATION] * 4
    assert svc.counters == {f"ended-{code}": 2}


async def test_begin_refuses_a_used_id_and_a_qemu_vm_where_not_accepted_before_anything_is_taken():
    class Store:
        def get(self, mid):
            return "row" if mid == b"\x01" * 16 else None

    class Registry:
        reserved: list[tuple[str, str | None]] = []

        def reserve(self, name, vm_id=None):  # VmRegistry.reserve: the name, and the VM's identity
            self.reserved.append((name, vm_id))
            validate_name(name)
            raise AgentError("stop here")  # what follows is not under test

    peer = Peer("src", b"\x02" * 32, b"\x03" * 32)
    used, new = b"\x01" * 16, b"\x04" * 16
    for accept_qemu, mid, backend, name, code in ((True, used, "sim", "web", ErrorCode.REPLAY),
                                                  (False, new, "qemu", "web", ErrorCode.BACKEND),
                                                  (False, new, "sim", "web", ErrorCode.EXISTS),
                                                  (True, new, "qemu", "web", ErrorCode.EXISTS),
                                                  (True, new, "sim", "web", ErrorCode.EXISTS),
                                                  (True, new, "sim", "../x", ErrorCode.MALFORMED)):
        registry = Registry()
        registry.reserved = []
        svc = _incoming(accept_qemu, Store(), registry)
        begin = SimpleNamespace(backend=backend, pages=1, vm=name, vm_id="aa" * 16)
        with pytest.raises(MigrationFailure) as info:
            await svc._open(Session(), mid, begin, peer)  # type: ignore[arg-type]
        assert info.value.code == code, (accept_qemu, backend, name)
        # the name is reserved with the VM's identity (a VM hosted here already is refused)
        assert registry.reserved == ([] if code in (ErrorCode.REPLAY, ErrorCode.BACKEND) else [(name, "aa" * 16)])


async def test_begin_makes_the_vm_under_its_migration_id(tmp_path):
    made = []

    class Registry:
        memory_dir = tmp_path

        def reserve(self, name, vm_id=None):
            pass

        def make_incoming(self, *args):
            made.append(args)
            raise HypervisorError("no room")  # what follows is not under test

    class Store:
        def get(self, mid):
            return None

    svc = _incoming(True, Store(), Registry())
    begin = SimpleNamespace(backend="sim", pages=1, vm="web", vm_id="aa" * 16, vcpus=1, spec=None)
    with pytest.raises(MigrationFailure) as info:
        await svc._open(Session(), b"\x05" * 16, begin, Peer("src", b"\x02" * 32, b"\x03" * 32))  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.NO_SPACE
    # the VM names the migration that made it: its row decides it after a restart
    assert made == [("web", "aa" * 16, b"\x05" * 16, 1, 1, "sim", None)]


def test_a_session_s_end_is_decided_by_its_row_committed_runs_anything_else_is_scrubbed(tmp_path):
    mid = b"\x06" * 16
    for state, running, want in ((HandoffState.COMMITTED, True, "committed"),
                                 (HandoffState.COMMITTED, False, "committed"),
                                 (HandoffState.PREPARED, True, "aborted"),
                                 (HandoffState.RECEIVING, False, "aborted")):
        calls: list[tuple[str, object]] = []
        vm = SimpleNamespace(name="web", running=running, dir=tmp_path)

        class Store:
            def state_of(self, m):
                calls.append(("state_of", m))
                return state

            def abort_forever(self, m, v, why):
                calls.append(("abort_forever", (m, v)))
                return True

        class Registry:
            vms: dict[str, object] = {}

            def start_workload(self, v):
                calls.append(("start_workload", v))

            def activation_failed(self, v, why):
                calls.append(("activation_failed", v))

            def forget(self, v):
                calls.append(("forget", v))

            def unreserve(self, name):
                calls.append(("unreserve", name))

        svc = _incoming(True, Store(), Registry())
        session = Session()
        session.vm, session.mid, session.name = vm, mid, "web"  # type: ignore[assignment]
        session.release = lambda: calls.append(("release", None))
        assert svc._settle(session, None) == want, state
        expected: list[tuple[str, object]] = [("state_of", mid)]
        if want == "committed":
            expected.append(("start_workload" if running else "activation_failed", vm))
        else:
            expected += [("abort_forever", (mid, vm)), ("forget", vm), ("unreserve", "web")]
        assert calls == [*expected, ("release", None)], state
    empty = Session()  # refused at BEGIN: nothing made, nothing to settle
    empty.release = lambda: calls.append(("released", None))
    calls = []
    assert _incoming(True, Store(), Registry())._settle(empty, None) == "refused"
    assert calls == [("released", None)]


def test_refusals_under_a_flood_make_one_log_line_a_second_with_their_counts(monkeypatch):
    import structlog.testing

    import palm_net.agent.incoming as incoming

    clock = [1000.0]
    monkeypatch.setattr(incoming.time, "monotonic", lambda: clock[0])
    svc = _incoming()
    with structlog.testing.capture_logs() as logs:
        svc._log_refusal("rate", "first")  # the first: said at once
        for i in range(5):
            clock[0] += 0.125  # exact in binary: the second boundary is hit exactly
            svc._log_refusal("rate" if i % 2 else "connections", f"then {i}")
        clock[0] += 0.375  # one second after the first line
        svc._log_refusal("rate", "last")
        svc._log_refusal("rate", "after")
    lines = [(e["event"], e["counts"], e["last_reason"]) for e in logs]
    assert lines == [("handshakes refused", {"rate": 1}, "first"),
                     ("handshakes refused", {"connections": 3, "rate": 3}, "last")]
    assert svc._refusals == {"rate": 1}


def test_the_rate_key_of_a_source_address_is_its_ipv6_64_and_a_service_stops_accepting_when_told():
    from palm_net.agent.incoming import _peer_host

    def stream(addr):
        def getpeername():
            if addr is None:
                raise OSError("gone")
            return (addr, 7400)
        return SimpleNamespace(socket=SimpleNamespace(getpeername=getpeername))

    for addr, key in (("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
                      ("::ffff:10.0.0.1", "::ffff:10.0.0.1"), ("::1", "::1"), ("10.0.0.1", "10.0.0.1"),
                      ("host", "host"), (None, "?")):
        assert _peer_host(stream(addr)) == key, addr  # type: ignore[arg-type]
    svc = _incoming()
    assert svc.gate(SimpleNamespace(), Purpose.MIGRATION) is None  # type: ignore[arg-type]  # no cluster: no gate
    assert svc.accepting
    svc.stop_accepting()
    assert not svc.accepting


class _Closable:
    """A stream or channel that records its close; the close takes a checkpoint, as a real one does."""

    def __init__(self, n: int = 0, purpose: Purpose = Purpose.MIGRATION) -> None:
        self.n, self.closed = n, 0
        self.peer_name = f"peer{n}"
        self.result = SimpleNamespace(peer=SimpleNamespace(name=self.peer_name, static_pub=bytes([n]) * 32),
                                      purpose=purpose)
        self.socket = SimpleNamespace(getpeername=lambda: ("10.0.0.9", 7400))

    async def aclose(self) -> None:
        await trio.sleep(0)
        self.closed += 1


async def test_an_incoming_session_is_served_with_the_agent_s_bounds_and_settled_from_its_row(monkeypatch):
    """_session: serve_incoming gets the agent's page bound (an int), deadline and list of runs;
    however the session ends, its row decides (committed, not running: kept and retried); only
    a MIGRATION session's end is told (on_settled)."""
    import palm_net.agent.incoming as incoming

    calls: list[tuple] = []
    vm = SimpleNamespace(name="web", running=False)

    class Store:
        def state_of(self, m):
            return HandoffState.COMMITTED

    class Registry:
        vms: dict[str, object] = {}

        def activation_failed(self, v, why):
            calls.append(("activation_failed", v, why))

    svc = _incoming(True, Store(), Registry())
    svc.signing = "the agent's key"  # type: ignore[assignment]
    served: list[tuple] = []

    async def serve(channel, store, signing, open_vm, max_pages, deadline, runs, pulling_vm, on_running):
        served.append((channel, store, signing, max_pages, type(max_pages), deadline, runs))
        assert [ch for ch, _ in svc._live.values()] == [channel]  # what recheck can end
        if channel.result.purpose is Purpose.MIGRATION:
            await open_vm(b"\x07" * 16, None, None)
        raise MigrationFailure(ErrorCode.TIMEOUT, "the source went quiet")  # after the commit: run unset

    async def _open(session, mid, begin, peer):
        session.vm, session.mid = vm, mid
        return vm

    monkeypatch.setattr(incoming, "serve_incoming", serve)
    monkeypatch.setattr(svc, "_open", _open)
    outcomes: list[str] = []
    svc.on_settled.append(outcomes.append)
    channels = [_Closable(1), _Closable(2, Purpose.RECOVERY)]
    for channel in channels:
        await svc._session(channel)  # type: ignore[arg-type]
    pages = (1 << 30) // PAGE_SIZE
    assert served == [(ch, svc.store, "the agent's key", pages, int, 1.0, svc.runs) for ch in channels]
    assert all(runs is svc.runs for *_, runs in served)
    assert calls == [("activation_failed", vm, "the commit window ended before activation")]
    assert outcomes == ["committed"]  # the recovery session ("refused": nothing made) is not told
    assert svc._live == {}


async def test_each_pending_handshake_is_kept_under_its_own_key_and_an_evicted_one_ends_quietly(monkeypatch):
    """_handshake's bookkeeping: each pending handshake under its own key with its scope and its
    handshake (its progress), dropped when it ends, also when evicted; then the gate is asked with
    the peer and the purpose, and the session rate per peer key."""
    import palm_net.agent.incoming as incoming

    svc = _incoming()
    svc.config = "config"  # type: ignore[assignment]
    inside, release = [], trio.Event()
    both_in = trio.Event()

    async def accept(stream, config, on_start):
        assert config == "config"
        hs = SimpleNamespace(progress=stream.n)
        on_start(hs)
        inside.append(hs)
        if len(inside) == 2:
            both_in.set()
        await release.wait()
        return stream

    monkeypatch.setattr(incoming, "accept", accept)
    asked: list[tuple] = []
    svc.gate = lambda peer, purpose: asked.append((peer, purpose))  # type: ignore[assignment,func-returns-value]
    got: dict[int, object] = {}

    async def one(n):
        got[n] = await svc._handshake(_Closable(n))  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0)
        nursery.start_soon(one, 5)
        await both_in.wait()
        pending = list(svc._pending.values())
        assert len(pending) == 2 and [p[1] for p in pending] == inside
        assert all(isinstance(p[0], trio.CancelScope) for p in pending)
        for i in range(incoming.MAX_PENDING_HANDSHAKES - 2):  # full: the least advanced (ours, at 0) goes
            svc._pending[i] = [trio.CancelScope(), SimpleNamespace(progress=9)]
        svc._admit_handshake()
        await trio.testing.wait_all_tasks_blocked()
        assert got == {0: None}
        release.set()
    assert got[5].n == 5 and set(svc._pending) == set(range(incoming.MAX_PENDING_HANDSHAKES - 2))
    assert asked == [(got[5].result.peer, Purpose.MIGRATION)] and svc.counters == {"handshakes": 1}
    svc._pending.clear()

    # refused by the gate, then by the session rate: closed, counted, the peer's key asked
    refused = _Closable(1)
    svc.gate = lambda peer, purpose: PalmError(ErrorCode.REVOKED, "revoked")  # type: ignore[assignment]
    assert await svc._handshake(refused) is None and refused.closed == 1  # type: ignore[arg-type]
    keys: list[bytes] = []
    svc.gate = lambda peer, purpose: None  # type: ignore[assignment]
    svc.sessions = SimpleNamespace(take=lambda key: keys.append(key) and False)  # type: ignore[assignment]
    too_fast = _Closable(2)
    assert await svc._handshake(too_fast) is None and too_fast.closed == 1  # type: ignore[arg-type]
    assert keys == [too_fast.result.peer.static_pub]
    assert svc.counters == {"handshakes": 1, f"refused-{ErrorCode.REVOKED}": 1, "refused-session-rate": 1}
    assert svc._pending == {}


async def test_a_full_table_of_pending_handshakes_drops_the_one_that_got_least_far():
    from palm_net.agent.incoming import MAX_PENDING_HANDSHAKES

    svc = _incoming()
    for i in range(MAX_PENDING_HANDSHAKES - 1):
        svc._pending[i] = [trio.CancelScope(), SimpleNamespace(progress=1 + i % 3)]
    svc._admit_handshake()  # room for one more
    assert len(svc._pending) == MAX_PENDING_HANDSHAKES - 1
    never = trio.CancelScope()
    svc._pending["not started"] = [never, None]  # its first message not read yet
    svc._admit_handshake()  # full: the one not started goes, its handshake cancelled
    assert "not started" not in svc._pending and never.cancel_called
    assert len(svc._pending) == MAX_PENDING_HANDSHAKES - 1
    assert not any(entry[0].cancel_called for entry in svc._pending.values())


async def test_a_connection_refused_or_failing_its_handshake_is_closed_even_when_cancelled(monkeypatch):
    import palm_net.agent.incoming as incoming

    svc = _incoming()  # at most 8 connections
    svc.connections = 8
    full = _Closable()
    await svc._handle(full)  # type: ignore[arg-type]
    assert full.closed == 1 and svc.connections == 8 and svc.counters == {"refused-connections": 1}
    svc.connections = 0

    async def no_channel(stream):
        return None

    monkeypatch.setattr(svc, "_handshake", no_channel)
    failed = _Closable()
    await svc._handle(failed)  # type: ignore[arg-type]
    assert failed.closed == 1 and svc.connections == 0
    late = _Closable()
    with trio.CancelScope() as cs:  # an agent stopping: its connections are still closed
        cs.cancel()
        await incoming._close(late)  # type: ignore[arg-type]
    assert late.closed == 1

