"""The sans-IO half of the etcd client: encoding, parsing, bounds.  No etcd needed."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from palm_net.cluster.etcd import EtcdConfig, parse_endpoint
from palm_net.cluster.etcdwire import (
    Compare,
    Delete,
    EtcdError,
    Get,
    JsonLines,
    Put,
    error_from,
    parse_range,
    parse_txn,
    parse_watch,
    prefix_end,
    txn_request,
    watch_create_request,
)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


@pytest.mark.parametrize(("prefix", "end"), [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff\xff", b"\x00"),
                                             (b"", b"\x00"), (b"a\x00", b"a\x01")])
def test_prefix_end(prefix, end):
    assert prefix_end(prefix) == end


@given(st.binary(min_size=1, max_size=8), st.binary(max_size=8))
def test_prefix_end_bounds_exactly_the_prefixed_keys(prefix, suffix):
    end = prefix_end(prefix)
    key = prefix + suffix
    assert prefix <= key and (end == b"\x00" or key < end)


def test_txn_request_encodes_every_compare_target_and_op():
    body = txn_request(
        [Compare.value(b"k", "==", b"v"), Compare.mod_revision(b"k", "<", 7), Compare.version(b"k", "!=", 0),
         Compare.create_revision(b"k", ">", 3)],
        [Put(b"k", b"w", lease=12), Delete(b"/p/", prefix=True)], [Get(b"k")])
    assert body["compare"] == [
        {"key": b64(b"k"), "target": "VALUE", "result": "EQUAL", "value": b64(b"v")},
        {"key": b64(b"k"), "target": "MOD", "result": "LESS", "mod_revision": "7"},
        {"key": b64(b"k"), "target": "VERSION", "result": "NOT_EQUAL", "version": "0"},
        {"key": b64(b"k"), "target": "CREATE", "result": "GREATER", "create_revision": "3"}]
    assert body["success"] == [{"request_put": {"key": b64(b"k"), "value": b64(b"w"), "lease": "12"}},
                               {"request_delete_range": {"key": b64(b"/p/"), "range_end": b64(b"/p0")}}]
    assert body["failure"] == [{"request_range": {"key": b64(b"k")}}]


@pytest.mark.parametrize("bad", [lambda: Compare.value(b"", "==", b"v"), lambda: Compare.value(b"k", "=", b"v"),
                                 lambda: Compare.mod_revision(b"k", "==", -1),
                                 lambda: Compare.version(b"k", "==", True),  # type: ignore[arg-type]
                                 lambda: Compare.create_revision(b"k", "==", 1 << 63)])
def test_bad_compares_are_refused(bad):
    with pytest.raises(EtcdError):
        bad()


def test_watch_create_request_from_a_revision():
    assert watch_create_request(b"/p/", prefix=True, start_revision=9) == {"create_request": {
        "key": b64(b"/p/"), "range_end": b64(b"/p0"), "start_revision": "9", "progress_notify": True}}


def test_parse_range_and_txn_of_real_answers():
    # as etcd 3.4.23's gateway sent them
    r = parse_range({"header": {"revision": "2"}, "kvs": [{"key": "Zm9v", "create_revision": "2",
                     "mod_revision": "2", "version": "1", "value": "YmFy"}], "count": "1"})
    assert r.revision == 2 and r.kvs[0].key == b"foo" and r.kvs[0].value == b"bar" and r.kvs[0].lease == 0
    t = parse_txn({"header": {"revision": "8407"}, "succeeded": True, "responses": [
        {"response_put": {"header": {"revision": "8407"}}},
        {"response_range": {"header": {"revision": "8407"}, "kvs": [{"key": "Y29t", "value": "Mw=="}], "count": "1"}},
        {"response_delete_range": {"header": {"revision": "8407"}}}]})
    assert t.succeeded and t.revision == 8407 and t.results[1].kvs[0].value == b"3" and t.results[2].deleted == 0
    assert not parse_txn({"header": {"revision": "5"}}).succeeded


@pytest.mark.parametrize("body", [
    {"kvs": "x"}, {"kvs": [{"key": "not base64!"}]}, {"kvs": [{"key": 5}]}, {"header": {"revision": "1e3"}},
    {"header": {"revision": "99999999999999999999"}}, {"header": {"revision": " 5"}}, {"header": {"revision": "1_0"}},
    {"header": []}, {"kvs": [{"mod_revision": True}]}, {"more": "yes"}])
def test_parse_range_refuses_malformed_answers(body):
    with pytest.raises(EtcdError, match="malformed"):
        parse_range(body)


def test_parse_watch_events_compaction_and_errors():
    m = parse_watch({"result": {"header": {"revision": "4"}, "events": [
        {"kv": {"key": "Zm9v", "mod_revision": "3", "value": "YmF6"}},
        {"type": "DELETE", "kv": {"key": "Zm9v", "mod_revision": "4"}}]}})
    assert [(e.type, e.kv.value, e.kv.mod_revision) for e in m.events] == [("put", b"baz", 3), ("delete", b"", 4)]
    c = parse_watch({"result": {"header": {}, "canceled": True, "compact_revision": "8406"}})
    assert c.canceled and c.compact_revision == 8406
    with pytest.raises(EtcdError, match="no leader") as e:
        parse_watch({"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}})
    assert e.value.code == 14
    with pytest.raises(EtcdError, match="malformed"):
        parse_watch({"result": {"events": [{"type": "EXPLODE"}]}})


def test_error_messages_are_one_line_for_both_gateway_formats():
    e34 = error_from({"error": "etcdserver: requested lease not found", "message": "etcdserver: requested lease "
                      "not found", "code": 5}, "etcd /v3/lease/revoke", 404)
    e35 = error_from({"code": 5, "message": "etcdserver: requested\nlease not found"}, "etcd /v3/lease/revoke", 404)
    for e in (e34, e35):
        assert e.code == 5 and "\n" not in str(e) and str(e).startswith("etcd /v3/lease/revoke: etcdserver")
    assert "\n" not in str(EtcdError("two\nlines"))


def test_json_lines_split_across_chunks_and_bounded():
    lines = JsonLines(limit=64)
    assert lines.feed(b'{"result":{"a"') == []
    assert lines.feed(b':1}}\n{"result":{}}\n{"res') == [{"result": {"a": 1}}, {"result": {}}]
    with pytest.raises(EtcdError, match="not JSON"):
        lines.finish()  # a stream that ends inside a message
    tail = JsonLines(limit=64)
    assert tail.feed(b'{"result":{}}') == [] and tail.finish() == [{"result": {}}]
    big = JsonLines(limit=64)
    with pytest.raises(EtcdError, match="over the limit"):
        big.feed(b"x" * 65)
    with pytest.raises(EtcdError, match="over the limit"):
        JsonLines(limit=64).feed(json.dumps({"a": "y" * 80}).encode() + b"\n")
    with pytest.raises(EtcdError, match="not JSON"):
        JsonLines(limit=64).feed(b"{nope\n")


@given(st.binary(max_size=300))
def test_json_lines_never_hold_more_than_the_limit(data):
    lines = JsonLines(limit=100)
    try:
        for i in range(0, len(data), 7):
            lines.feed(data[i:i + 7])
            assert len(lines) <= 100 + 7  # (what the next line's check refuses)
    except EtcdError:
        pass


def test_config_validation():
    assert parse_endpoint("https://[::1]:2379").url == "https://[::1]:2379"
    assert parse_endpoint("http://etcd-a").port == 2379
    assert EtcdConfig.from_urls("http://a:1, http://b:2").endpoints == ("http://a:1", "http://b:2")
    for urls in ("", "ftp://a:1", "http://a:1/v3", "http://a:99999", "http://a:1,https://b:2", "http://u@a:1"):
        with pytest.raises(EtcdError):
            EtcdConfig.from_urls(urls)
    from pathlib import Path
    with pytest.raises(EtcdError, match="http://"):
        EtcdConfig(("http://a:1",), ca_file=Path("ca.crt"))
    with pytest.raises(EtcdError, match="both"):
        EtcdConfig(("https://a:1",), cert_file=Path("c.crt"))
    with pytest.raises(EtcdError, match="timeouts"):
        EtcdConfig(("http://a:1",), timeout=1.0, attempt_timeout=2.0)
    with pytest.raises(EtcdError, match="TLS files"):
        EtcdConfig(("https://a:1",), ca_file=Path("/nonexistent/ca.crt")).ssl_context()
