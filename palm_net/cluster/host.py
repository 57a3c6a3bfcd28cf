"""What the cluster layer needs of its agent: the agent implements it
(palm_net.agent.clustering), the cluster layer never imports the agent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from palm_net.cluster.converge import Fact
from palm_net.cluster.gate import Lists
from palm_net.cluster.model import AgentRecord
from palm_net.cluster.placement import Movable


@dataclass(frozen=True)
class DrainOutcome:
    """How one drain migration ended."""

    ok: bool
    error: str = ""
    total_ms: float = 0.0
    downtime_ms: float = 0.0


class ClusterHost(Protocol):
    @property
    def name(self) -> str: ...

    def advertise(self) -> AgentRecord:
        """The agent record as of now (the member fills in lists_revision and conflicts)."""
        ...

    def seal(self, body: bytes, kind: str = "agent") -> bytes:
        """Its own record (``agent`` or ``vm``) signed by its identity key, with its certificate
        (palm_net.cluster.policy)."""
        ...

    def vm_facts(self) -> dict[str, Fact]:
        """What the handoff says of each VM this agent knows (palm_net.cluster.converge)."""
        ...

    def apply_lists(self, lists: Lists) -> None:
        """The peer gate takes new lists and re-checks the migrations in flight."""
        ...

    @property
    def lists(self) -> Lists:
        """The lists the gate enforces now."""
        ...

    def movable(self) -> list[Movable]:
        """The VMs of this host as a drain sees them."""
        ...

    def departed(self) -> dict[str, str]:
        """VMs no longer here that left by a committed migration: name -> destination agent."""
        ...

    async def drain_migrate(self, name: str, addr: str, on_sent: Callable[[int], None],
                            bandwidth: int = 0) -> DrainOutcome:
        """Migrates a VM as `palm migrate` would (never raises for a failed migration)."""
        ...

    def drain_cancel(self, name: str, why: str) -> None:
        """Cancels the VM's migration if it is still before the handoff point."""
        ...
