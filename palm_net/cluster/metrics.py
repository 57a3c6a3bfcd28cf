"""Prometheus metrics of an agent (``palm agent --metrics [HOST:]PORT``; a bare port on 127.0.0.1).

The figures come from the agent's own records: each migration's result as
it ends (outcome, total time, downtime, bytes), and at each scrape the
agent's state (migrations in doubt, refused handshakes by reason, etcd
reachability, VMs).  Every agent has its own registry (tests run several in
one process).  The endpoint is a plain HTTP/1.1 server on trio (h11): GET
/metrics, one request per connection, a deadline per connection, nothing
else served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import h11
import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("palm.metrics")

TIME_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10)
MAX_CONNECTIONS = 16
MAX_PER_CLIENT = 4  # one address holds at most this many of them (a slow client cannot starve the scraper)
REQUEST_DEADLINE = 5.0


@dataclass
class Snapshot:
    """The agent's state at a scrape."""

    vms: int = 0
    incoming: int = 0
    outgoing: int = 0
    in_doubt: int = 0
    committed_not_running: int = 0
    refused: dict[tuple[str, str], int] = field(default_factory=dict)  # (side, reason) -> count
    etcd: int | None = None  # 1 reachable, 0 not; None: not in a cluster
    etcd_unreachable_seconds: float = 0.0
    lists_revision: int = 0
    record_conflicts: int = 0
    policy_refused: dict[str, int] = field(default_factory=dict)  # reason -> count (palm_net.cluster.policy)


class _State(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        s = self.snapshot()
        yield GaugeMetricFamily("palm_vms", "VMs hosted by this agent", value=s.vms)
        g = GaugeMetricFamily("palm_migrations_in_flight", "migrations in flight", labels=["role"])
        g.add_metric(["source"], s.outgoing)
        g.add_metric(["destination"], s.incoming)
        yield g
        yield GaugeMetricFamily("palm_migrations_in_doubt",
                                "outgoing migrations handed off whose outcome is not known yet (VM paused)",
                                value=s.in_doubt)
        yield GaugeMetricFamily("palm_vms_committed_not_running",
                                "VMs committed here whose activation failed (retried; never scrubbed)",
                                value=s.committed_not_running)
        c = CounterMetricFamily("palm_handshakes_refused", "peers refused at or right after the handshake, "
                                "by side and reason", labels=["side", "reason"])
        for (side, reason), n in sorted(s.refused.items()):
            c.add_metric([side, reason], n)
        yield c
        if s.etcd is not None:
            yield GaugeMetricFamily("palm_etcd_reachable", "1 if etcd answered this agent's last call",
                                    value=s.etcd)
            yield GaugeMetricFamily("palm_etcd_unreachable_seconds", "how long etcd has not answered (0 if it does)",
                                    value=s.etcd_unreachable_seconds)
            yield GaugeMetricFamily("palm_cluster_lists_revision",
                                    "etcd revision of the revocations and allowlist this agent enforces",
                                    value=s.lists_revision)
            yield GaugeMetricFamily("palm_cluster_record_conflicts",
                                    "VM records this agent and another both claim (not written)",
                                    value=s.record_conflicts)
            c = CounterMetricFamily("palm_cluster_refused", "policy documents and records read from etcd and "
                                    "refused (unsigned, older, wrong-role, record-squatted, ...), by reason",
                                    labels=["reason"])
            for reason, n in sorted(s.policy_refused.items()):
                c.add_metric([reason], n)
            yield c


class AgentMetrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.migrations = Counter("palm_migrations", "migrations ended, by role and outcome",
                                  ["role", "outcome"], registry=self.registry)
        self.total = Histogram("palm_migration_total_seconds", "total time of completed outgoing migrations",
                               buckets=TIME_BUCKETS, registry=self.registry)
        self.downtime = Histogram("palm_migration_downtime_seconds",
                                  "downtime of completed outgoing migrations (pause to the destination running)",
                                  buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.bytes = Counter("palm_migration_bytes", "bytes put on the wire by outgoing migrations",
                             registry=self.registry)
        self.registry.register(_State(snapshot))

    def source_ended(self, status: str, total_s: float, downtime_s: float | None, sent: int) -> None:
        self.migrations.labels("source", status).inc()
        self.bytes.inc(sent)
        if status == "completed":
            self.total.observe(total_s)
            if downtime_s is not None:
                self.downtime.observe(downtime_s)

    def destination_ended(self, outcome: str) -> None:
        self.migrations.labels("destination", outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, or a bare PORT on 127.0.0.1 (metrics are unauthenticated: the
    management network only when the operator names it)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad metrics address {text!r}: use PORT (on 127.0.0.1) or HOST:PORT")
    return host.strip("[]"), int(port)


async def serve_metrics(listen: str, render: Callable[[], bytes],
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves GET /metrics on ``listen`` until cancelled; started() with the port."""
    host, port = parse_listen(listen)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    held: dict[str, int] = {}  # connections held, by client address

    async def handle(stream: trio.SocketStream) -> None:
        try:
            client = str(stream.socket.getpeername()[0])
        except OSError:
            client = "?"
        if sum(held.values()) >= MAX_CONNECTIONS or held.get(client, 0) >= MAX_PER_CLIENT:
            await trio.aclose_forcefully(stream)
            return
        held[client] = held.get(client, 0) + 1
        try:
            with trio.move_on_after(REQUEST_DEADLINE):
                await _answer(stream, render)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
            pass
        finally:
            held[client] -= 1
            if not held[client]:
                del held[client]
            await trio.aclose_forcefully(stream)

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def _events(conn: h11.Connection) -> Iterator[h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]]:
    while True:
        ev = conn.next_event()
        yield ev
        if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, (h11.Request, h11.ConnectionClosed)):
            return


async def _answer(stream: trio.SocketStream, render: Callable[[], bytes]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
    request: h11.Request | None = None
    while request is None:
        for ev in _events(conn):
            if isinstance(ev, h11.Request):
                request = ev
            elif isinstance(ev, h11.ConnectionClosed):
                return
        if request is None:
            data = await stream.receive_some(8192)
            if not data:
                return
            conn.receive_data(data)
    if request.method != b"GET":
        status, body, ctype = 405, b"only GET\n", "text/plain"
    elif request.target.split(b"?")[0] != b"/metrics":
        status, body, ctype = 404, b"see /metrics\n", "text/plain"
    else:
        status, body, ctype = 200, render(), CONTENT_TYPE_LATEST
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
