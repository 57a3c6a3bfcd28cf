"""Durable handoff state (SQLite), one database per agent.

The handoff rules hang on a few durable facts: the source "handed off" (it
may never resume on its own), the destination "prepared" / "committed" /
"aborted" (an abort is forever: that migration is never activated).  Each
transition is one atomic UPDATE guarded by the states it may leave, written
with synchronous=FULL before the message that announces it is sent.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    mid         BLOB PRIMARY KEY,
    role        TEXT NOT NULL,          -- source | destination
    vm          TEXT NOT NULL,
    vm_id       BLOB NOT NULL,          -- the VM's identity (names can be reused)
    peer        TEXT NOT NULL,          -- peer agent name (from its certificate)
    peer_addr   TEXT NOT NULL,          -- host:port to reach the destination (source side)
    peer_static BLOB NOT NULL,          -- the peer's Noise static key
    peer_sign   BLOB NOT NULL,          -- the peer's Ed25519 key (verifies abort tokens)
    state       TEXT NOT NULL,
    token       BLOB,                   -- abort token (destination: issued; source: received)
    error       TEXT,
    stats       TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
"""

# Source: sending -> handed_off -> done | aborted; sending -> aborted.
# Destination: receiving -> prepared -> committed; receiving|prepared -> aborted.
UNKNOWN_VM = ""  # the VM name of a row made for a QUERY about an id we never saw
MAX_UNKNOWN_PER_PEER = 256  # such rows a peer can leave behind; the oldest go first
UNKNOWN_TTL = 86400.0  # and they expire after a day
HISTORY_TTL = 30 * 86400.0  # finished rows kept this long ("committed" forever: an in-doubt
# source may ask at any time, and the answer must never turn into "aborted")


@dataclass(frozen=True)
class MigrationRow:
    mid: bytes
    role: str
    vm: str
    vm_id: bytes
    peer: str
    peer_addr: str
    peer_static: bytes
    peer_sign: bytes
    state: str
    token: bytes | None
    error: str | None
    stats: dict[str, Any] | None
    created: float
    updated: float


class HandoffStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def create(self, mid: bytes, role: str, vm: str, vm_id: bytes, peer: str, peer_addr: str,
               peer_static: bytes, peer_sign: bytes, state: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO migrations (mid, role, vm, vm_id, peer, peer_addr, peer_static, peer_sign, state,"
                " created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (mid, role, vm, vm_id, peer, peer_addr, peer_static, peer_sign, state, now, now),
            )

    def transition(self, mid: bytes, from_states: tuple[str, ...], to_state: str, *,
                   token: bytes | None = None, error: str | None = None) -> bool:
        """Atomically moves mid from one of from_states to to_state; False if it was elsewhere."""
        marks = ",".join("?" * len(from_states))
        with self._lock:
            cur = self._db.execute(
                f"UPDATE migrations SET state=?, token=COALESCE(?, token), error=COALESCE(?, error), updated=?"  # noqa: S608
                f" WHERE mid=? AND state IN ({marks})",
                (to_state, token, error, time.time(), mid, *from_states),
            )
            return cur.rowcount == 1

    def record_unknown_query(self, mid: bytes, peer: str, peer_static: bytes, peer_sign: bytes) -> None:
        """A QUERY about an id never seen here: recorded aborted, so a late BEGIN
        with it is refused; bounded per peer and expiring (a peer cannot fill the store)."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM migrations WHERE vm=? AND state='aborted' AND updated<?",
                             (UNKNOWN_VM, now - UNKNOWN_TTL))
            self._db.execute(
                "DELETE FROM migrations WHERE mid IN (SELECT mid FROM migrations WHERE vm=? AND peer_static=?"
                " AND state='aborted' ORDER BY created DESC LIMIT -1 OFFSET ?)",
                (UNKNOWN_VM, peer_static, MAX_UNKNOWN_PER_PEER - 1))
            self._db.execute(
                "INSERT OR IGNORE INTO migrations (mid, role, vm, vm_id, peer, peer_addr, peer_static, peer_sign,"
                " state, error, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (mid, "destination", UNKNOWN_VM, b"", peer, "", peer_static, peer_sign, "aborted",
                 "unknown migration queried", now, now))

    def prune(self, now: float | None = None) -> int:
        """Forgets finished migrations older than HISTORY_TTL, never a committed one."""
        cutoff = (time.time() if now is None else now) - HISTORY_TTL
        with self._lock:
            cur = self._db.execute("DELETE FROM migrations WHERE state IN ('done', 'aborted') AND updated<?",
                                   (cutoff,))
            return cur.rowcount

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0])

    def set_stats(self, mid: bytes, stats: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE migrations SET stats=? WHERE mid=?", (json.dumps(stats), mid))

    def get(self, mid: bytes) -> MigrationRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM migrations WHERE mid=?", (mid,)).fetchone()
        return self._row(row) if row else None

    def list(self, role: str | None = None, states: tuple[str, ...] | None = None,
             limit: int = 100) -> list[MigrationRow]:
        q, args = "SELECT * FROM migrations WHERE 1=1", []
        if role:
            q += " AND role=?"
            args.append(role)
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        q += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(q, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: tuple[Any, ...]) -> MigrationRow:
        return MigrationRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                            json.loads(r[11]) if r[11] else None, r[12], r[13])
