"""A small trio-native etcd v3 client over etcd's JSON gateway.

HTTP/1.1 is spoken with h11 (sans-IO) on trio streams, optionally TLS with a
CA and a client certificate.  The client keeps an ordered list of endpoints
and sticks to the last one that answered; a call that cannot reach it moves
on to the next.  Every call has a deadline (``EtcdConfig.timeout``) and every
endpoint attempt a shorter one (``attempt_timeout``).

Retries: a request that never reached etcd (connection refused, stale pooled
connection, "no leader") is tried on the next endpoint whatever it is.  Once a
write (put, delete, txn) has been sent, a broken connection or a timeout means
its outcome is unknown: the call raises :class:`EtcdError` with
``indeterminate=True`` rather than repeat it, and the caller reads the key to
learn what happened.  Reads, lease grants, keep-alives and revokes are
repeated on the next endpoint.

Everything from the network is bounded: response heads by h11
(64 KiB), bodies and stream messages by ``EtcdConfig.max_message_bytes``.

Authentication (``EtcdConfig.credentials``): etcd's JSON gateway forwards
the ``Authorization`` header to the member as the gRPC token, so a user and
password (read once from a 0600 file) get a token from
``/v3/auth/authenticate`` that goes with every request, watches and lease
keep-alives included.  A token etcd no longer knows (expired, or issued by a
member that has since restarted: simple tokens live in memory) is replaced
once per call.  The password is never logged nor put in an error.
"""

from __future__ import annotations

import base64
import contextlib
import math
import re
import select
import socket
import ssl
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import h11
import structlog
import trio

from palm_net.cluster.etcdwire import (
    CODE_FAILED_PRECONDITION,
    CODE_INVALID_ARGUMENT,
    CODE_NOT_FOUND,
    CODE_PERMISSION_DENIED,
    CODE_UNAUTHENTICATED,
    CODE_UNAVAILABLE,
    Compare,
    EtcdError,
    JsonLines,
    KeyValue,
    Lease,
    Op,
    RangeResult,
    TxnResult,
    WatchBatch,
    WatchMessage,
    delete_request,
    encode,
    error_from,
    header_revision,
    parse_deleted,
    parse_json,
    parse_keepalive,
    parse_lease,
    parse_range,
    parse_txn,
    parse_watch,
    prefix_end,
    put_request,
    range_request,
    stream_result,
    txn_request,
    watch_create_request,
)
from palm_net.hostfs import UnsafePathError, read_private_file
from palm_net.trioutil import single_error

log = structlog.get_logger("palm.etcd")

_HEAD_LIMIT = 64 * 1024  # response line and headers
_RECEIVE = 64 * 1024
_MAX_IDLE = 4  # pooled connections per endpoint
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 1.0
_WATCH_BACKOFF_MAX = 2.0
_RANGE_PAGE = 1000
_AUTHENTICATE = "/v3/auth/authenticate"
_MAX_PASSWORD = 4096
_MAX_TOKEN = 4096
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")


# --------------------------------------------------------------------- config

@dataclass(frozen=True)
class Endpoint:
    tls: bool
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    try:
        u = urllib.parse.urlsplit(url.strip())
        port = u.port or 2379
    except ValueError:
        raise EtcdError(f"bad etcd endpoint {url!r}") from None
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.username:
        raise EtcdError(f"bad etcd endpoint {url!r} (expected http://HOST:PORT or https://HOST:PORT)")
    return Endpoint(u.scheme == "https", u.hostname, port)


class Password:
    """A password that does not show itself: repr, str and logs see ``<hidden>``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Password(<hidden>)"

    __str__ = __repr__


def read_password_file(path: Path) -> Password:
    """The password in ``path``: a regular file (no symlink) of this user,
    readable by nobody else (mode 0600 or 0400), one line; read once, here."""
    try:
        data = read_private_file(path, "etcd password file", _MAX_PASSWORD)
    except UnsafePathError as exc:  # (anyone else who can read it can act as this user in etcd)
        raise EtcdError(str(exc)) from None
    if len(data) > _MAX_PASSWORD:
        raise EtcdError(f"etcd password file {path} is over {_MAX_PASSWORD} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise EtcdError(f"etcd password file {path} is not UTF-8 text") from None
    text = text[:-1] if text.endswith("\n") else text  # the newline an editor or echo adds
    text = text[:-1] if text.endswith("\r") else text
    if not text or "\n" in text:
        raise EtcdError(f"etcd password file {path} must hold one non-empty line")
    return Password(text)


@dataclass(frozen=True)
class EtcdCredentials:
    """An etcd user and its password (kept out of repr)."""

    user: str
    password: Password = field(repr=False)

    def __post_init__(self) -> None:
        if not _USER.fullmatch(self.user):
            raise EtcdError(f"bad etcd user name {self.user[:140]!r}: 1 to 128 letters, digits, . _ @ -, "
                            "starting with a letter or digit")

    @classmethod
    def from_file(cls, user: str, password_file: Path) -> EtcdCredentials:
        return cls(user, read_password_file(password_file))


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how long to wait for it.

    ``endpoints`` are client URLs of the members of one cluster, all http or
    all https.  With https, ``ca_file`` is the CA that signed the members'
    certificates (the system's CAs when None) and ``cert_file``/``key_file``
    a client certificate for members run with ``--client-cert-auth``.
    ``credentials``: an etcd user for clusters with authentication enabled.
    """

    endpoints: tuple[str, ...]
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = 5.0  # one call, fail-over and retries included
    attempt_timeout: float = 2.0  # one endpoint, connecting included
    max_message_bytes: int = 4 * 1024 * 1024  # one response body or stream message
    credentials: EtcdCredentials | None = None

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise EtcdError("no etcd endpoint given")
        eps = [parse_endpoint(u) for u in self.endpoints]
        if len({e.tls for e in eps}) > 1:
            raise EtcdError("etcd endpoints mix http:// and https://")
        if not eps[0].tls and (self.ca_file or self.cert_file or self.key_file):
            raise EtcdError("etcd TLS files given for http:// endpoints")
        if (self.cert_file is None) != (self.key_file is None):
            raise EtcdError("an etcd client certificate needs both cert_file and key_file")
        if not (math.isfinite(self.timeout) and math.isfinite(self.attempt_timeout)
                and 0 < self.attempt_timeout <= self.timeout):
            raise EtcdError("etcd timeouts must be finite with 0 < attempt_timeout <= timeout")
        if not 1024 <= self.max_message_bytes <= 1 << 30:
            raise EtcdError("etcd max_message_bytes must be between 1 KiB and 1 GiB")

    @classmethod
    def from_urls(cls, urls: str, **kw: Any) -> EtcdConfig:
        """From a comma-separated list, as ``--etcd URL[,URL...]`` gives it."""
        return cls(endpoints=tuple(u.strip() for u in urls.split(",") if u.strip()), **kw)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not parse_endpoint(self.endpoints[0]).tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file and self.key_file:
                ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise EtcdError(f"etcd TLS files: {e}") from None
        return ctx


# ----------------------------------------------------------------- connection

class _Unreached(Exception):
    """The request did not reach etcd: safe to send elsewhere."""


class _Lost(Exception):
    """The request was sent and no complete answer came back."""


_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError)


class _Conn:
    """One HTTP/1.1 connection to one endpoint."""

    def __init__(self, index: int, endpoint: Endpoint, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.index = index
        self.endpoint = endpoint
        self.stream = stream
        self.sock = sock
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_HEAD_LIMIT)

    def looks_alive(self) -> bool:
        """An idle connection has nothing to read: readable means the peer
        closed it (or sent something unasked for); either way it is not reused."""
        try:
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            return not p.poll(0)
        except (OSError, ValueError):
            return False

    async def send(self, path: str, body: bytes, extra: Sequence[tuple[str, str]] = ()) -> None:
        host = self.endpoint.url.split("://", 1)[1]
        headers = [("Host", host), ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *extra]
        data = self.http.send(h11.Request(method="POST", target=path, headers=headers)) or b""
        data += self.http.send(h11.Data(data=body)) or b""
        data += self.http.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def _event(self) -> h11.Event:
        while True:
            ev = self.http.next_event()
            if ev is h11.NEED_DATA:
                self.http.receive_data(bytes(await self.stream.receive_some(_RECEIVE)))
                continue
            if isinstance(ev, h11.ConnectionClosed):
                raise _Lost("etcd closed the connection")
            if isinstance(ev, h11.Event):
                return ev
            raise _Lost("HTTP connection paused")  # h11.PAUSED: cannot happen mid-response

    async def head(self) -> int:
        while True:
            ev = await self._event()
            if isinstance(ev, h11.Response):
                return ev.status_code
            if not isinstance(ev, h11.InformationalResponse):
                raise _Lost(f"unexpected HTTP event {type(ev).__name__}")

    async def chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            ev = await self._event()
            if isinstance(ev, h11.Data):
                return bytes(ev.data)
            if isinstance(ev, h11.EndOfMessage):
                return None

    async def body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while (data := await self.chunk()) is not None:
            size += len(data)
            if size > limit:
                raise EtcdError(f"etcd sent an answer over the limit of {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def reusable(self) -> bool:
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            return True
        return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _token_refused(e: EtcdError) -> bool:
    """etcd refused the token itself (not what it was for): a new one may pass."""
    text = str(e)
    return e.code == CODE_UNAUTHENTICATED or (e.code == CODE_INVALID_ARGUMENT and (
        "auth store is old" in text  # roles changed since the token was issued
        or "user name is empty" in text))  # no token sent: authentication was off then, is on now


def _keys_named(body: dict[str, Any]) -> list[str]:
    """The keys a request writes or reads, for an error message (at most 3)."""
    raw: list[Any] = [body.get("key")]
    for branch in ("success", "failure"):
        for op in body.get(branch) or ():
            if isinstance(op, dict):
                raw += [o.get("key") for o in op.values() if isinstance(o, dict)]
    out: list[str] = []
    for k in raw:
        if isinstance(k, str) and len(out) < 3:
            try:
                text = base64.b64decode(k, validate=True).decode("ascii", "replace")[:100]
            except ValueError:
                continue
            if text not in out:
                out.append(text)
    return out


# --------------------------------------------------------------------- client

class EtcdClient:
    """Use as ``async with EtcdClient(config) as etcd: ...``; closing it closes
    its pooled connections (watches close their own)."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self.endpoints = tuple(parse_endpoint(u) for u in config.endpoints)
        self._ssl = config.ssl_context()
        self._pinned = 0
        self._idle: dict[int, list[_Conn]] = {i: [] for i in range(len(self.endpoints))}
        self._closed = False
        # None: not asked yet; "": etcd has authentication off (requests go without one)
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self.authentications = 0  # tokens obtained (a re-authentication counts)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            while conns:
                await conns.pop().aclose()

    @property
    def pinned(self) -> str:
        """The URL of the endpoint the client currently talks to."""
        return self.endpoints[self._pinned].url

    # -- connections

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._pinned + k) % n for k in range(n)]

    async def _connect(self, index: int) -> _Conn:
        """A new connection; raises _Unreached."""
        ep = self.endpoints[index]
        try:
            tcp = await trio.open_tcp_stream(ep.host, ep.port)
        except OSError as e:
            raise _Unreached(f"{ep.url}: {e.strerror or e}") from None
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            # A member that vanishes without a reset (power loss, partition) is
            # noticed after about 10 + 3 * 3 s even on an idle watch.
            for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):
                    tcp.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            stream: trio.abc.Stream = tcp
            if self._ssl is not None:
                tls = trio.SSLStream(tcp, self._ssl, server_hostname=ep.host, https_compatible=True)
                await tls.do_handshake()
                stream = tls
        except BaseException as e:
            await trio.aclose_forcefully(tcp)
            if isinstance(e, (*_IO_ERRORS, ssl.SSLError)):
                cause = e.__cause__ or e
                raise _Unreached(f"{ep.url}: {' '.join(str(cause).split()) or type(cause).__name__}") from None
            raise
        return _Conn(index, ep, stream, tcp.socket)

    async def _checkout(self, index: int) -> _Conn:
        idle = self._idle[index]
        while idle:
            conn = idle.pop()
            if conn.looks_alive():
                return conn
            await conn.aclose()
        return await self._connect(index)

    async def _checkin(self, conn: _Conn) -> None:
        idle = self._idle[conn.index]
        if not self._closed and conn.reusable() and len(idle) < _MAX_IDLE:
            idle.append(conn)
        else:
            await conn.aclose()

    # -- one call

    async def _attempt(self, index: int, path: str, payload: bytes, write_sent: list[str] | None,
                       headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """One request to one endpoint.  Connecting and sending are bounded by
        attempt_timeout, and so is waiting for the answer to a read; a write,
        once sent, cannot be sent elsewhere, so it waits for its answer up to
        the call's deadline (a leader election may hold it up) and records its
        endpoint in ``write_sent``."""
        ep = self.endpoints[index]
        conn: _Conn | None = None
        sent = ok = False
        try:
            with trio.move_on_after(self.config.attempt_timeout) as scope:
                try:
                    conn = await self._checkout(index)
                    sent = True
                    if write_sent is not None:
                        write_sent.append(ep.url)
                        scope.deadline = math.inf
                    await conn.send(path, payload, headers)
                    status = await conn.head()
                    data = await conn.body(self.config.max_message_bytes)
                except _IO_ERRORS as e:
                    detail = f"{ep.url}: {' '.join(str(e).split()) or type(e).__name__}"
                    raise (_Lost if sent else _Unreached)(detail) from None
                except _Lost as e:
                    raise _Lost(f"{ep.url}: {e}") from None
                ok = True
            if scope.cancelled_caught:
                raise (_Lost if sent else _Unreached)(f"{ep.url}: no answer within {self.config.attempt_timeout}s")
        finally:
            if conn is not None:
                if ok:
                    await self._checkin(conn)
                else:
                    await conn.aclose()
        try:
            body = parse_json(data, f"etcd {path}")
        except EtcdError:
            if status == 200:
                raise
            raise EtcdError(f"etcd {path}: HTTP status {status} from {ep.url}") from None
        if status != 200:
            err = error_from(body, f"etcd {path}", status)
            if err.code == CODE_UNAVAILABLE:
                # "no leader" is refused before anything is proposed; the other
                # unavailable answers (leader changed, timed out) may still apply.
                raise (_Unreached if "no leader" in str(err) else _Lost)(f"{ep.url}: {err}")
            raise err
        return body

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        try:
            if self.config.credentials is None:
                return await self._send(path, body, idempotent=idempotent)
            token = await self._current_token()
            try:
                return await self._send(path, body, idempotent=idempotent, token=token)
            except EtcdError as e:
                if not _token_refused(e):
                    raise
                # Refused before anything was applied (etcd checks the token
                # before proposing, and the auth revision before applying):
                # once more with a fresh token, no more.
                log.info("etcd token refused: authenticating again", error=str(e))
                token = await self._current_token(stale=token)
                return await self._send(path, body, idempotent=idempotent, token=token)
        except EtcdError as e:
            raise self._explained(e, path, body) from None

    def _explained(self, e: EtcdError, path: str, body: dict[str, Any]) -> EtcdError:
        """etcd's auth refusals said with who asked and for which keys."""
        creds = self.config.credentials
        if e.code == CODE_PERMISSION_DENIED:
            who = f"etcd user {creds.user!r}" if creds else "this etcd client"
            keys = ", ".join(_keys_named(body)) or "these keys"
            return EtcdError(f"etcd {path}: permission denied: {who} may not do this on {keys} "
                             "(its etcd role does not grant it)", code=e.code)
        if e.code == CODE_INVALID_ARGUMENT and "user name is empty" in str(e) and creds is None:
            return EtcdError(f"etcd {path}: etcd has authentication on and this client gives no user "
                             "(--etcd-user, --etcd-password-file)", code=e.code)
        return e

    async def _current_token(self, stale: str | None = None) -> str:
        """The token to send; a new one if there is none yet or it is ``stale``.
        One task authenticates at a time: the others then take its token."""
        async with self._auth_lock:
            if self._token is None or self._token == stale:
                self._token = None
                self._token = await self._authenticate()
            return self._token

    async def authenticated(self) -> bool:
        """Whether requests carry a token (False: no user given, or etcd has authentication off)."""
        return self.config.credentials is not None and bool(await self._current_token())

    def _forget_token(self, token: str) -> None:
        if self._token == token:
            self._token = None

    async def _authenticate(self) -> str:
        creds = self.config.credentials
        assert creds is not None
        try:
            body = await self._send(_AUTHENTICATE, {"name": creds.user, "password": creds.password.reveal()},
                                    idempotent=True)
        except EtcdError as e:
            if e.code == CODE_FAILED_PRECONDITION and "authentication is not enabled" in str(e):
                # credentials given before auth is enabled (the order of a roll-out):
                # go without a token; "user name is empty" later means it is on now
                log.warning("etcd has authentication off: requests carry no user", user=creds.user)
                return ""
            if e.code == CODE_INVALID_ARGUMENT and "authentication failed" in str(e):
                raise EtcdError(f"etcd user {creds.user!r}: authentication failed (wrong user name or password)",
                                code=e.code) from None
            raise
        token = body.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN or not token.isascii() \
                or not token.isprintable():
            raise EtcdError(f"etcd {_AUTHENTICATE}: etcd sent a malformed answer: no usable token")
        self.authentications += 1
        log.info("etcd authenticated", user=creds.user)
        return token

    async def _send(self, path: str, body: dict[str, Any], *, idempotent: bool, token: str = "") -> dict[str, Any]:
        if self._closed:
            raise EtcdError("etcd client is closed")
        headers = [("Authorization", token)] if token else []
        payload = encode(body)
        last = "no endpoint tried"
        backoff = _BACKOFF_FIRST
        write_sent: list[str] | None = None if idempotent else []
        with trio.move_on_after(self.config.timeout):
            while True:
                for index in self._order():
                    try:
                        result = await self._attempt(index, path, payload, write_sent, headers)
                    except _Unreached as e:
                        last = str(e)
                    except _Lost as e:
                        if write_sent:
                            raise EtcdError(f"etcd {path}: {e}; the outcome is unknown", indeterminate=True) from None
                        last = str(e)
                    else:
                        if index != self._pinned:
                            log.info("etcd endpoint", now=self.endpoints[index].url, was=self.pinned)
                            self._pinned = index
                        return result
                    if write_sent:
                        write_sent.clear()  # that one was refused before it was proposed
                    log.debug("etcd attempt failed", path=path, error=last)
                await trio.sleep(backoff)  # every endpoint failed: pace the next round
                backoff = min(backoff * 2, _BACKOFF_MAX)
        if write_sent:
            raise EtcdError(f"etcd {path}: {write_sent[0]}: no answer within {self.config.timeout}s; "
                            "the outcome is unknown", indeterminate=True)
        raise EtcdError(f"etcd {path}: no endpoint answered within {self.config.timeout}s (last: {last})")

    # -- key-value

    async def get(self, key: bytes) -> KeyValue | None:
        r = parse_range(await self._call("/v3/kv/range", range_request(key), idempotent=True))
        return r.kvs[0] if r.kvs else None

    async def range_prefix(self, prefix: bytes, *, revision: int = 0) -> RangeResult:
        """Every key under ``prefix``, read in pages at one revision (the first page's,
        or ``revision``), so that a watch from ``result.revision + 1`` misses nothing."""
        kvs: list[KeyValue] = []
        start, end = prefix or b"\x00", prefix_end(prefix)
        while True:
            body = range_request(start, range_end=end, revision=revision, limit=_RANGE_PAGE)
            page = parse_range(await self._call("/v3/kv/range", body, idempotent=True))
            revision = revision or page.revision
            kvs.extend(page.kvs)
            if not page.more or not page.kvs:
                return RangeResult(kvs=tuple(kvs), revision=revision, count=len(kvs))
            start = page.kvs[-1].key + b"\x00"

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Returns the revision of the write."""
        return header_revision(await self._call("/v3/kv/put", put_request(key, value, lease), idempotent=False))

    async def delete(self, key: bytes) -> int:
        """Returns the number of keys deleted (0 or 1)."""
        return parse_deleted(await self._call("/v3/kv/deleterange", delete_request(key), idempotent=False))

    async def delete_prefix(self, prefix: bytes) -> int:
        body = await self._call("/v3/kv/deleterange", delete_request(prefix, prefix=True), idempotent=False)
        return parse_deleted(body)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """If every comparison holds, runs ``success``, else ``failure``; atomically."""
        return parse_txn(await self._call("/v3/kv/txn", txn_request(compare, success, failure), idempotent=False))

    async def auth_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One of etcd's ``/v3/auth/`` calls (users, roles, enabling; palm_net.cluster.etcdauth).
        Repeated on fail-over: each is as good done twice (the caller takes "already exists")."""
        if not path.startswith("/v3/auth/") or path == _AUTHENTICATE:
            raise EtcdError(f"not an etcd auth call: {path[:100]!r}")
        return await self._call(path, body, idempotent=True)

    # -- leases

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease.  Repeated on fail-over: a lease granted twice leaves an
        unused one that expires by itself."""
        if not 1 <= ttl <= 9_000_000_000:
            raise EtcdError("a lease TTL must be between 1 and 9e9 seconds")
        return parse_lease(await self._call("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=True))

    async def lease_keepalive_once(self, lease_id: int) -> int:
        """Refreshes the lease; returns its TTL, raises when it has expired."""
        body = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, idempotent=True)
        ttl = parse_keepalive(stream_result(body))
        if ttl <= 0:
            raise EtcdError(f"etcd lease {lease_id:x} has expired", code=CODE_NOT_FOUND)
        return ttl

    async def lease_revoke(self, lease_id: int) -> None:
        """Ends the lease and deletes its keys; a lease already gone is fine."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True)
        except EtcdError as e:
            if e.code != CODE_NOT_FOUND:
                raise

    async def keep_alive(self, lease: Lease, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                         ) -> NoReturn:
        """Keeps ``lease`` alive until cancelled, refreshing every TTL/3.

        Raises EtcdError once the lease is lost: etcd says it expired, or no
        refresh got through for a whole TTL (counted from the last refresh
        sent that succeeded), after which etcd may have expired it.
        """
        period = lease.ttl / 3
        last_ok = trio.current_time()
        task_status.started()
        while True:
            await trio.sleep_until(last_ok + period)
            expires = last_ok + lease.ttl
            with trio.move_on_at(expires):
                while True:
                    sent_at = trio.current_time()
                    try:
                        await self.lease_keepalive_once(lease.id)
                        break
                    except EtcdError as e:
                        if e.code == CODE_NOT_FOUND:
                            raise
                        log.warning("etcd lease keep-alive failed", lease=f"{lease.id:x}", error=str(e))
                        await trio.sleep(min(period, _BACKOFF_MAX))  # pace the next try
                last_ok = sent_at
                continue
            raise EtcdError(f"etcd lease {lease.id:x}: no keep-alive reached etcd for {lease.ttl}s; "
                            "it has presumably expired", code=CODE_NOT_FOUND)

    @contextlib.asynccontextmanager
    async def lease(self, ttl: int) -> AsyncIterator[Lease]:
        """A lease kept alive while the block runs, revoked at its end.  If the
        lease is lost the block is cancelled and EtcdError raised."""
        lease = await self.lease_grant(ttl)
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.keep_alive, lease)
                    yield lease
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.lease_revoke(lease.id)
                except EtcdError as e:
                    log.warning("etcd lease revoke failed", lease=f"{lease.id:x}", error=str(e))

    # -- watch

    def watch(self, key: bytes, *, prefix: bool = True, start_revision: int = 0) -> Watch:
        """Changes to ``key`` (every key under it with ``prefix``), from
        ``start_revision`` (0: from now on)::

            async with etcd.watch(b"/palm/revoked/", start_revision=snap.revision + 1) as w:
                async for batch in w:
                    ...
        """
        if not prefix and not key:
            raise EtcdError("an etcd key must be non-empty bytes")
        return Watch(self, key, prefix=prefix, start_revision=start_revision)


class Watch:
    """An established watch: an async iterator of :class:`WatchBatch`.

    Entering it waits (up to ``timeout``) until etcd has created the watch,
    so every later change is seen.  When the stream breaks (member gone,
    member without a leader), it is opened again on the next endpoint from
    the revision after the last one seen, with back-off and without limit:
    while etcd is unreachable the iterator simply waits.  When that revision
    has been compacted away, iterating raises EtcdError with
    ``compact_revision`` set: read afresh and watch from there.
    """

    def __init__(self, client: EtcdClient, key: bytes, *, prefix: bool, start_revision: int) -> None:
        self.client = client
        self.key = key
        self.prefix = prefix
        self.next_revision = start_revision  # 0 until the first created answer
        self.reconnects = 0
        self._conn: _Conn | None = None
        self._lines = JsonLines(client.config.max_message_bytes)
        self._pending: deque[dict[str, Any]] = deque()

    async def __aenter__(self) -> Watch:
        last = "no endpoint tried"
        with trio.move_on_after(self.client.config.timeout):
            while True:
                for index in self.client._order():
                    try:
                        await self._open(index)
                        return self
                    except (_Unreached, _Lost) as e:
                        last = str(e)
                await trio.sleep(_BACKOFF_FIRST)
        raise EtcdError(f"etcd watch: no endpoint answered within {self.client.config.timeout}s (last: {last})")

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._drop()

    def __aiter__(self) -> Watch:
        return self

    async def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()
        self._pending.clear()
        self._lines = JsonLines(self.client.config.max_message_bytes)

    async def _message(self) -> dict[str, Any]:
        """The next raw message of the stream; _Lost when it breaks or ends."""
        assert self._conn is not None
        conn = self._conn
        while not self._pending:
            try:
                data = await conn.chunk()
            except _IO_ERRORS as e:
                raise _Lost(f"{conn.endpoint.url}: {' '.join(str(e).split()) or type(e).__name__}") from None
            if data is None:
                self._pending.extend(self._lines.finish())
                if not self._pending:
                    raise _Lost(f"{conn.endpoint.url}: the watch stream ended")
                break
            self._pending.extend(self._lines.feed(data))
        return self._pending.popleft()

    async def _parsed(self) -> WatchMessage:
        try:
            return parse_watch(await self._message())
        except EtcdError as e:
            if e.code == CODE_UNAVAILABLE:  # e.g. the member lost its leader
                raise _Lost(str(e)) from None
            raise

    async def _open(self, index: int) -> None:
        """Opens the stream on one endpoint and waits for etcd to create the watch."""
        await self._drop()
        client = self.client
        ep = client.endpoints[index]
        body = encode(watch_create_request(self.key, prefix=self.prefix, start_revision=self.next_revision))
        # hasleader: a member cut off from the quorum ends the stream
        # instead of keeping it silently open.
        headers = [("Grpc-Metadata-hasleader", "true")]
        token = ""
        if client.config.credentials is not None:
            try:
                token = await client._current_token()
            except EtcdError as e:
                if "authentication failed" in str(e):
                    raise  # a wrong password stays wrong
                raise _Unreached(str(e)) from None
            if token:
                headers.append(("Authorization", token))
        with trio.move_on_after(client.config.attempt_timeout) as scope:
            try:
                self._conn = await client._connect(index)
                await self._conn.send("/v3/watch", body, headers)
                status = await self._conn.head()
                if status != 200:
                    err = parse_json(await self._conn.body(client.config.max_message_bytes), "etcd /v3/watch")
                    raise _Lost(f"{ep.url}: {error_from(err, 'etcd /v3/watch', status)}")
                created = await self._parsed()
            except _IO_ERRORS as e:
                await self._drop()
                raise _Lost(f"{ep.url}: {' '.join(str(e).split()) or type(e).__name__}") from None
            except BaseException:
                await self._drop()
                raise
            if not created.created:
                await self._drop()
                raise _Lost(f"{ep.url}: etcd did not create the watch")
            if created.canceled and not created.compact_revision:
                # refused at creation: the gateway says why in cancel_reason
                await self._drop()
                self._refused(ep, created.cancel_reason, token)
            if not self.next_revision:
                self.next_revision = created.revision + 1
        if scope.cancelled_caught:
            await self._drop()
            raise _Lost(f"{ep.url}: the watch was not created within {client.config.attempt_timeout}s")

    def _refused(self, ep: Endpoint, reason: str, token: str) -> NoReturn:
        """A watch etcd refused to create: the token (once more with a new one:
        raises _Lost) or the user's rights (raises EtcdError: retrying will not help)."""
        client = self.client
        what = f"etcd watch on {self.key[:100].decode('ascii', 'replace')}"
        if "invalid auth token" in reason or "auth store is old" in reason or (
                "user name is empty" in reason and client.config.credentials is not None):
            client._forget_token(token)
            raise _Lost(f"{ep.url}: {what}: the token was refused ({reason[:200]})")
        creds = client.config.credentials
        if "permission denied" in reason:
            who = f"etcd user {creds.user!r}" if creds else "this etcd client"
            raise EtcdError(f"{what}: permission denied: {who} may not read it (its etcd role does not grant it)",
                            code=CODE_PERMISSION_DENIED)
        if "user name is empty" in reason:
            raise EtcdError(f"{what}: etcd has authentication on and this client gives no user "
                            "(--etcd-user, --etcd-password-file)", code=CODE_INVALID_ARGUMENT)
        raise _Lost(f"{ep.url}: {what}: cancelled at creation: {reason[:200] or 'no reason given'}")

    async def _reopen(self, reason: str) -> None:
        """Opens the stream again, anywhere, however long it takes."""
        self.reconnects += 1
        backoff = _BACKOFF_FIRST
        log.info("etcd watch reconnecting", reason=reason, revision=self.next_revision)
        while True:
            for index in self.client._order():
                try:
                    await self._open(index)
                    self.client._pinned = index
                    return
                except (_Unreached, _Lost) as e:
                    reason = str(e)
            log.warning("etcd watch: no endpoint reachable", error=reason, retry_in=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    async def __anext__(self) -> WatchBatch:
        while True:
            if self._conn is None:
                await self._reopen("stream closed")
            try:
                msg = await self._parsed()
            except _Lost as e:
                await self._drop()
                await self._reopen(str(e))
                continue
            if msg.canceled:
                if msg.compact_revision:
                    await self._drop()
                    raise EtcdError(f"etcd watch from revision {self.next_revision}: compacted up to revision "
                                    f"{msg.compact_revision}; read afresh", compact_revision=msg.compact_revision)
                await self._drop()
                await self._reopen(f"etcd cancelled the watch: {msg.cancel_reason or 'no reason given'}")
                continue
            if msg.events:
                last = msg.events[-1].kv.mod_revision
                self.next_revision = max(self.next_revision, last + 1)
                return WatchBatch(revision=last, events=msg.events)
            if not msg.created and msg.revision:
                # a progress notification: everything up to msg.revision has been sent
                self.next_revision = max(self.next_revision, msg.revision + 1)
