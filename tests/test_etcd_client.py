"""The trio etcd client against a real etcd (palm_net.testing.etcd), and its
bounds and timeouts against fake servers on loopback."""

from __future__ import annotations

import contextlib
import functools
import socket
import stat
import time

import pytest
import trio

import palm_net.cluster.etcd as etcd_module
from palm_net.cluster import (
    Compare,
    Delete,
    EtcdClient,
    EtcdConfig,
    EtcdError,
    Get,
    Put,
)
from palm_net.testing.etcd import MISSING_REASON, OPENSSL_MISSING_REASON, EtcdCluster, find_etcd
from palm_net.trioutil import single_error

needs_etcd = pytest.mark.skipif(find_etcd() is None, reason=MISSING_REASON)


@pytest.fixture(scope="module")
def etcd1():
    if find_etcd() is None:
        pytest.skip(MISSING_REASON)
    with EtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def etcd3():
    if find_etcd() is None:
        pytest.skip(MISSING_REASON)
    with EtcdCluster(3) as cluster:
        yield cluster


@pytest.fixture
async def client(etcd1):
    async with EtcdClient(etcd1.config()) as c:
        yield c


@pytest.fixture
def prefix(request) -> bytes:
    return f"/test/{request.node.name}/".encode()


async def next_batch(watch, seconds: float = 5.0):
    with trio.fail_after(seconds):
        return await watch.__anext__()


async def collect(watch, n: int, seconds: float = 10.0) -> list[tuple[str, bytes, bytes, int]]:
    """The next n events as (type, key, value, mod_revision)."""
    out: list[tuple[str, bytes, bytes, int]] = []
    with trio.fail_after(seconds):
        while len(out) < n:
            batch = await watch.__anext__()
            out += [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in batch.events]
    return out


# ---------------------------------------------------------------- real etcd

@needs_etcd
def test_the_cluster_lives_in_a_private_directory(etcd1):
    assert stat.S_IMODE(etcd1.root.stat().st_mode) == 0o700
    assert etcd1.members[0].running and etcd1.members[0].dir.parent == etcd1.root
    assert all(u.startswith("http://127.0.0.1:") for u in etcd1.urls)


@needs_etcd
async def test_put_get_delete_and_paged_prefix_reads(client, prefix, monkeypatch):
    assert await client.get(prefix + b"none") is None
    rev = await client.put(prefix + b"a", b"\x00\xffbinary")
    kv = await client.get(prefix + b"a")
    assert kv is not None and kv.value == b"\x00\xffbinary" and kv.mod_revision == rev == kv.create_revision
    assert kv.version == 1
    for k in (b"b", b"c", b"d", b"e"):
        await client.put(prefix + k, k * 3)
    await client.put(prefix[:-1] + b"0", b"outside")  # the key just past the prefix's range
    monkeypatch.setattr(etcd_module, "_RANGE_PAGE", 2)  # five keys in three pages, all at one revision
    snap = await client.range_prefix(prefix)
    assert [kv.key[len(prefix):] for kv in snap.kvs] == [b"a", b"b", b"c", b"d", b"e"]
    await client.put(prefix + b"f", b"later")
    assert len((await client.range_prefix(prefix, revision=snap.revision)).kvs) == 5
    assert await client.delete(prefix + b"a") == 1 and await client.delete(prefix + b"a") == 0
    assert await client.delete_prefix(prefix) == 5
    assert (await client.range_prefix(prefix)).kvs == ()
    assert (await client.get(prefix[:-1] + b"0")) is not None


@needs_etcd
async def test_compare_and_swap_succeeds_and_fails_on_each_target(client, prefix):
    k = prefix + b"vm"
    # create only if absent
    created = await client.txn([Compare.version(k, "==", 0)], [Put(k, b"on-a")], [Get(k)])
    assert created.succeeded
    again = await client.txn([Compare.mod_revision(k, "==", 0)], [Put(k, b"on-b")], [Get(k)])
    assert not again.succeeded and again.results[0].kvs[0].value == b"on-a"
    kv = await client.get(k)
    assert kv is not None
    # on value
    assert not (await client.txn([Compare.value(k, "==", b"on-x")], [Put(k, b"on-b")])).succeeded
    assert (await client.txn([Compare.value(k, "==", b"on-a")], [Put(k, b"on-b")])).succeeded
    # on mod_revision: the revision read before the last write no longer matches
    stale = await client.txn([Compare.mod_revision(k, "==", kv.mod_revision)], [Put(k, b"on-c")], [Get(k)])
    assert not stale.succeeded and stale.results[0].kvs[0].value == b"on-b"
    # on create_revision and version
    assert (await client.txn([Compare.create_revision(k, "==", kv.create_revision),
                              Compare.version(k, "==", 2)], [Put(k, b"on-c"), Get(k)])).results[1].kvs[0].value \
        == b"on-c"
    assert not (await client.txn([Compare.version(k, ">", 3)], [Delete(k)])).succeeded
    done = await client.txn([Compare.version(k, "==", 3)], [Delete(k)])
    assert done.succeeded and done.results[0].deleted == 1 and await client.get(k) is None


@needs_etcd
async def test_concurrent_compare_and_swap_loses_no_update(client, prefix):
    k = prefix + b"counter"
    await client.put(k, b"0")
    async def increment() -> None:
        while True:
            kv = await client.get(k)
            assert kv is not None
            bumped = Put(k, b"%d" % (int(kv.value) + 1))
            r = await client.txn([Compare.mod_revision(k, "==", kv.mod_revision)], [bumped])
            if r.succeeded:
                return

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(increment)
    kv = await client.get(k)
    assert kv is not None and kv.value == b"8"


@needs_etcd
async def test_lease_expiry_removes_keys_and_keep_alive_keeps_them(client, prefix):
    async with client.watch(prefix) as w:
        lease = await client.lease_grant(1)  # the shortest TTL etcd allows with the test's raft timers
        await client.put(prefix + b"short", b"x", lease=lease.id)
        async with client.lease(1) as kept:
            await client.put(prefix + b"kept", b"y", lease=kept.id)
            t0 = trio.current_time()
            events = await collect(w, 3)
            assert [(t, k[len(prefix):]) for t, k, _, _ in events] == [("put", b"short"), ("put", b"kept"),
                                                                       ("delete", b"short")]
            assert trio.current_time() - t0 < 4
            # the kept key outlives three of its TTLs
            with trio.move_on_after(3):
                batch = await w.__anext__()
                pytest.fail(f"a kept key changed: {batch}")
            kv = await client.get(prefix + b"kept")
            assert kv is not None and kv.lease == kept.id
        # leaving the block revokes the lease, which deletes its key
        assert await client.get(prefix + b"kept") is None


@needs_etcd
async def test_keep_alive_raises_when_the_lease_is_revoked_elsewhere(client):
    lease = await client.lease_grant(3)
    with trio.fail_after(5), pytest.raises(EtcdError, match=r"expired"), single_error():
        async with trio.open_nursery() as n:
            await n.start(client.keep_alive, lease)
            await client.lease_revoke(lease.id)
    await client.lease_revoke(lease.id)  # revoking a lease that is gone is fine
    # with the context manager, the block is cancelled and the error raised
    with trio.fail_after(5), pytest.raises(EtcdError, match="expired"):
        async with client.lease(3) as lease:
            await client.lease_revoke(lease.id)
            await trio.sleep_forever()


@needs_etcd
async def test_watch_sees_puts_and_deletes_in_order_and_replays_history(client, prefix):
    start = await client.put(prefix + b"before", b"0")
    async with client.watch(prefix) as w:
        await client.put(prefix + b"a", b"1")
        await client.put(prefix + b"b", b"2")
        await client.delete(prefix + b"a")
        await client.txn([], [Put(prefix + b"c", b"3"), Delete(prefix + b"b")])
        await client.put(prefix[:-1] + b"0", b"outside")
        await client.put(prefix + b"a", b"4")
        got = await collect(w, 6)
    assert [(t, k[len(prefix):], v) for t, k, v, _ in got] == [
        ("put", b"a", b"1"), ("put", b"b", b"2"), ("delete", b"a", b""), ("put", b"c", b"3"),
        ("delete", b"b", b""), ("put", b"a", b"4")]
    revs = [r for *_, r in got]
    assert revs == sorted(revs) and revs[3] == revs[4]  # one transaction, one revision
    # from a revision: the history again, from "before" on
    async with client.watch(prefix, start_revision=start) as w:
        again = await collect(w, 7)
    assert again[0][1] == prefix + b"before" and again[1:] == got


@needs_etcd
async def test_watch_reports_compaction(client, prefix):
    first = await client.put(prefix + b"k", b"1")
    last = await client.put(prefix + b"k", b"2")
    await client._call("/v3/kv/compaction", {"revision": str(last)}, idempotent=False)
    async with client.watch(prefix, start_revision=first) as w:
        with pytest.raises(EtcdError, match=r"compacted") as e:
            await next_batch(w)
    assert e.value.compact_revision == last and "\n" not in str(e.value)


def followers_first(cluster: EtcdCluster) -> list[int]:
    lead = cluster.leader()
    return [i for i in range(cluster.size) if i != lead] + [lead]


@needs_etcd
async def test_watch_resumes_after_its_member_is_killed(etcd3, prefix):
    order = followers_first(etcd3)  # a follower: writes go on undisturbed while the watch moves
    async with EtcdClient(etcd3.config(order, attempt_timeout=1.0)) as c:
        async with c.watch(prefix) as w:
            assert c.pinned == etcd3.members[order[0]].client_url
            await c.put(prefix + b"1", b"a")
            assert (await collect(w, 1))[0][1] == prefix + b"1"
            etcd3.kill(order[0])
            # written while the watch has no stream: seen after it resumes, once each
            for i in range(2, 6):
                await c.put(prefix + b"%d" % i, b"b")
            got = await collect(w, 4)
            assert [k for _, k, _, _ in got] == [prefix + b"%d" % i for i in range(2, 6)]
            assert w.reconnects == 1 and c.pinned != etcd3.members[order[0]].client_url
            await c.put(prefix + b"6", b"c")
            assert (await collect(w, 1))[0][1] == prefix + b"6"
            with trio.move_on_after(0.5):
                pytest.fail(f"an event came twice: {await w.__anext__()}")


@needs_etcd
async def test_watch_leaves_a_member_that_lost_its_leader(etcd3, prefix):
    """The two other members die: the last one has no leader and ends the
    watch's stream; the watch waits, and resumes once a quorum is back."""
    async with EtcdClient(etcd3.config(attempt_timeout=1.0, timeout=2.0)) as c:
        async with c.watch(prefix) as w:
            others = [i for i, m in enumerate(etcd3.members) if m.client_url != c.pinned]
            for i in others:
                etcd3.kill(i)
            events: list[tuple[str, bytes, bytes, int]] = []
            async with trio.open_nursery() as n:
                async def consume() -> None:
                    events.extend(await collect(w, 1, seconds=30))

                n.start_soon(consume)
                # etcd ends the streams of a member left without a leader for three
                # election timeouts; the watch's counter is all there is to wait on
                with trio.fail_after(10):
                    while w.reconnects == 0:
                        await trio.sleep(0.05)
                assert events == []
                etcd3.restart(others[0], wait=False)
                with trio.fail_after(15):
                    while True:
                        try:
                            await c.put(prefix + b"back", b"1")
                            break
                        except EtcdError:
                            continue  # no quorum yet: the call itself waited up to its timeout
            assert events[0][1] == prefix + b"back"


@needs_etcd
async def test_fail_over_when_the_leader_of_three_is_killed(etcd3, prefix):
    lead = etcd3.leader()
    order = [lead] + [i for i in range(3) if i != lead]
    async with EtcdClient(etcd3.config(order, attempt_timeout=1.0)) as c:
        await c.put(prefix + b"k", b"1")
        # TTL 2: the keep-alive gives a lease up after one TTL without a
        # refresh, and electing a new leader takes about one second here
        lease = await c.lease_grant(2)
        await c.put(prefix + b"leased", b"x", lease=lease.id)
        async with trio.open_nursery() as n:
            await n.start(c.keep_alive, lease)
            etcd3.kill(lead)
            t0 = time.monotonic()
            kv = await c.get(prefix + b"k")  # a linearizable read: it waits for the new leader
            took = time.monotonic() - t0
            assert kv is not None and kv.value == b"1" and took < c.config.timeout
            assert c.pinned != etcd3.members[lead].client_url
            assert (await c.txn([Compare.value(prefix + b"k", "==", b"1")], [Put(prefix + b"k", b"2")])).succeeded
            # the lease is kept through the fail-over: its key outlives 2.5 TTLs
            with trio.move_on_after(5):
                await trio.sleep_forever()
            assert await c.get(prefix + b"leased") is not None
            n.cancel_scope.cancel()
        # the killed member comes back and catches up
        etcd3.restart(lead)
    async with EtcdClient(etcd3.config([lead])) as only:
        kv = await only.get(prefix + b"k")
        assert kv is not None and kv.value == b"2"


@needs_etcd
async def test_every_member_down_times_out_then_recovers(etcd3, prefix):
    async with EtcdClient(etcd3.config(timeout=1.0, attempt_timeout=0.5)) as c:
        await c.put(prefix + b"k", b"1")
        for i in range(3):
            etcd3.kill(i)
        t0 = time.monotonic()
        with pytest.raises(EtcdError, match=r"no endpoint answered within 1.0s") as e:
            await c.get(prefix + b"k")
        assert 1.0 <= time.monotonic() - t0 < 2.0 and "\n" not in str(e.value)
        for i in range(3):
            etcd3.restart(i, wait=False)
        with trio.fail_after(20):
            while True:
                try:
                    kv = await c.get(prefix + b"k")
                    break
                except EtcdError:
                    continue  # the call waited up to its timeout: members are still electing
        assert kv is not None and kv.value == b"1"


@needs_etcd
async def test_tls_with_client_certificates():
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip(OPENSSL_MISSING_REASON)
    with EtcdCluster(1, tls=True) as cluster:
        async with EtcdClient(cluster.config()) as c:
            await c.put(b"/tls/k", b"v")
            kv = await c.get(b"/tls/k")
            assert kv is not None and kv.value == b"v"
            async with c.watch(b"/tls/") as w:
                await c.delete(b"/tls/k")
                assert (await collect(w, 1))[0][0] == "delete"
        # without a client certificate the member refuses the handshake
        async with EtcdClient(cluster.config(cert_file=None, key_file=None, timeout=1.0, attempt_timeout=0.5)) as c:
            with pytest.raises(EtcdError, match=r"no endpoint answered"):
                await c.get(b"/tls/k")
        # a CA that did not sign the member's certificate
        other = cluster.root / "tls" / "client.crt"  # a leaf, not the CA: verification fails
        async with EtcdClient(cluster.config(ca_file=other, timeout=1.0, attempt_timeout=0.5)) as c:
            with pytest.raises(EtcdError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                await c.get(b"/tls/k")


# ----------------------------------------------------- without etcd: bounds

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def fake_server(handler):
    async def tolerant(stream):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the client hung up
            await handler(stream)

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, tolerant, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        n.cancel_scope.cancel()


async def read_request(stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def test_unreachable_etcd_times_out_within_the_deadline():
    cfg = EtcdConfig((f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{closed_port()}"),
                     timeout=0.5, attempt_timeout=0.2)
    async with EtcdClient(cfg) as c:
        for call in (lambda: c.get(b"k"), lambda: c.put(b"k", b"v"), lambda: c.lease_grant(5)):
            t0 = time.monotonic()
            with pytest.raises(EtcdError, match=r"no endpoint answered within 0.5s \(last: http://127.0.0.1:\d+: "):
                await call()
            assert 0.5 <= time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        with pytest.raises(EtcdError, match=r"etcd watch: no endpoint answered"):
            async with c.watch(b"/p/"):
                pass
        assert 0.5 <= time.monotonic() - t0 < 1.0


async def test_silent_server_bounded_by_attempt_and_call_timeouts():
    async def silent(stream):
        while await stream.receive_some(65536):
            pass

    async with fake_server(silent) as port:
        async with EtcdClient(EtcdConfig((f"http://127.0.0.1:{port}",), timeout=0.6, attempt_timeout=0.2)) as c:
            t0 = time.monotonic()
            with pytest.raises(EtcdError, match=r"no endpoint answered within 0.6s.*no answer within 0.2s"):
                await c.get(b"k")  # a read is tried again until the call's deadline
            assert 0.6 <= time.monotonic() - t0 < 1.1
            t0 = time.monotonic()
            with pytest.raises(EtcdError, match=r"no answer within 0.6s; the outcome is unknown") as e:
                await c.txn([], [Put(b"k", b"v")])  # a write is not (it may have been applied): it waits
            assert e.value.indeterminate and 0.6 <= time.monotonic() - t0 < 1.1


async def test_connection_lost_after_sending_a_write_is_indeterminate():
    requests = 0

    async def hang_up(stream):
        nonlocal requests
        await read_request(stream)
        requests += 1

    async with fake_server(hang_up) as port:
        async with EtcdClient(EtcdConfig((f"http://127.0.0.1:{port}",), timeout=0.5, attempt_timeout=0.2)) as c:
            with pytest.raises(EtcdError, match=r"outcome is unknown") as e:
                await c.put(b"k", b"v")
            assert e.value.indeterminate and requests == 1
            with pytest.raises(EtcdError, match=r"no endpoint answered"):
                await c.get(b"k")
            assert requests > 2  # the read was sent again


async def test_an_answer_that_is_not_the_gateway_is_one_line():
    async def not_found(stream):
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 19\r\n\r\n404 page not found\n")

    async with fake_server(not_found) as port:
        async with EtcdClient(EtcdConfig((f"http://127.0.0.1:{port}",), timeout=0.5, attempt_timeout=0.2)) as c:
            with pytest.raises(EtcdError, match=rf"^etcd /v3/kv/range: HTTP status 404 from http://127.0.0.1:{port}$"):
                await c.get(b"k")


async def test_oversized_answers_are_refused():
    async def huge_body(stream):
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n" + b"x" * 3_000_000)

    async def huge_head(stream):
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")

    async def endless_watch_line(stream):
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            await stream.send_all(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")

    def cfg(port: int) -> EtcdConfig:
        return EtcdConfig((f"http://127.0.0.1:{port}",), timeout=0.5, attempt_timeout=0.3,
                          max_message_bytes=1 << 20)

    async with fake_server(huge_body) as port, EtcdClient(cfg(port)) as c:
        with pytest.raises(EtcdError, match=r"over the limit of 1048576 bytes"):
            await c.get(b"k")
    async with fake_server(huge_head) as port, EtcdClient(cfg(port)) as c:
        with pytest.raises(EtcdError, match=r"no endpoint answered.*(too long|too large|maximum)"):
            await c.get(b"k")
    async with fake_server(endless_watch_line) as port, EtcdClient(cfg(port)) as c:
        with pytest.raises(EtcdError, match=r"over the limit of 1048576 bytes"):
            async with c.watch(b"/p/"):
                pass
