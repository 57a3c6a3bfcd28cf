"""The peer gate: which certified peers an agent migrates with, by the cluster's lists.

The handshake (proto 3.2) checks the authority, the certificate, the quote,
the role and the measurement allowlist in force; the gate adds what the
cluster pushes: agents revoked by the operator, and the cluster's allowlist
when one is set (it then replaces each agent's own list).  The incoming and
outgoing services consult the gate right after each handshake, and again for
every migration in flight whenever the lists change: a migration with a peer
that is now refused ends before READY (after READY, the handoff rules decide).

RECOVERY sessions are not refused: they settle migrations already past
READY (proto 7.5), carry no VM, and refusing them could only leave a VM
paused in doubt.

The gate is plain data: the cluster member replaces its lists, the services
read them, all on the agent's trio thread.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from palm_net.channel.handshake import PeerInfo, Purpose
from palm_net.errors import ErrorCode, HandshakeError


@dataclass(frozen=True)
class Lists:
    """The cluster's lists as of an etcd revision (0: never read; nothing revoked,
    each agent's own allowlist), from the signed documents the agent keeps
    (palm_net.cluster.policy)."""

    revoked: frozenset[str] = frozenset()  # by certificate name
    allowlist: frozenset[bytes] | None = None  # None: no cluster allowlist, each agent's own applies
    revision: int = 0
    read_at: float = 0.0  # when they were last confirmed from etcd (wall clock)
    revoked_keys: frozenset[bytes] = frozenset()  # static keys: revoked whatever name they claim

    def is_revoked(self, name: str, static_pub: bytes) -> bool:
        return name in self.revoked or any(hmac.compare_digest(static_pub, k) for k in self.revoked_keys)


@dataclass
class PeerGate:
    """Whom this agent migrates with.  ``local``: its own allowlist (--allow-measurement,
    or its own measurement)."""

    local: frozenset[bytes]
    lists: Lists = field(default_factory=Lists)
    on_change: list[Callable[[], None]] = field(default_factory=list)  # re-check what is in flight

    @property
    def allowed(self) -> frozenset[bytes]:
        """The measurements migrations are allowed with now."""
        return self.lists.allowlist if self.lists.allowlist is not None else self.local

    @property
    def handshake_allowlist(self) -> frozenset[bytes]:
        """What the handshake itself accepts: both lists, so that a recovery session
        with a peer the cluster's list dropped still completes (the gate refuses
        its migrations)."""
        return self.local | (self.lists.allowlist or frozenset())

    def refusal(self, name: str, static_pub: bytes, measurement: bytes) -> HandshakeError | None:
        """Why a migration with this peer is refused now, or None."""
        if self.lists.is_revoked(name, static_pub):
            return HandshakeError(ErrorCode.REVOKED, f"agent {name!r} is revoked in the cluster")
        if not any(hmac.compare_digest(measurement, m) for m in self.allowed):
            where = "the cluster's allowlist" if self.lists.allowlist is not None else "the allowlist"
            return HandshakeError(ErrorCode.MEASUREMENT_NOT_ALLOWED,
                                  f"agent {name!r} has measurement {measurement.hex()[:16]}..., not in {where}")
        return None

    def check(self, peer: PeerInfo, purpose: Purpose) -> HandshakeError | None:
        """After a handshake: a MIGRATION or DATA session with a refused peer is refused."""
        if purpose is Purpose.RECOVERY:
            return None
        return self.refusal(peer.name, peer.static_pub, peer.measurement)

    def update(self, lists: Lists) -> bool:
        """New lists; True (and the listeners told) if what they refuse changed."""
        changed = ((lists.revoked, lists.revoked_keys, lists.allowlist)
                   != (self.lists.revoked, self.lists.revoked_keys, self.lists.allowlist))
        self.lists = lists
        if changed:
            for fn in self.on_change:
                fn()
        return changed
