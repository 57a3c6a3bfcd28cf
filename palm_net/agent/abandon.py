"""The operator's way out of post-copy once the other host is lost (proto/PROTOCOL.md 7.5,
7.9 item 7): ``palm migrate --resolve ID --abandon --reason WHY``, on either side.

After the switch neither row has an abort (the VM ran at the destination), and each side
waits for the other for ever: the destination's VM for its missing pages, the source's
paused copy for PULLED.  Once the operator knows the other host is gone (its guest memory
lives on tmpfs: a reboot loses it too), this declares the VM lost, from the durable row
alone: SERVING (the source) or PULLING (the destination) moves to ABANDONED, then
whatever reads the local copy ends, then the copy is scrubbed.  Nothing runs, here or
there: the source's copy never ran since the switch and the destination's goes.  It is
logged as an error, with the operator's reason, which the row records too.

A destination whose VM misses no page (the agent stopped between its last page and
COMMITTED, say) needs nothing more from the source: it commits instead (7.9 item 5's
step, which is the destination's own), and nothing is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import trio

from palm_net.agent.errors import AgentError
from palm_net.hypervisor.model import ModelVM
from palm_net.migration.handoff import MOVES, STORAGE_ERRORS, HandoffState, HandoffStore, MigrationRow, Step
from palm_net.wire.protocol import Role

if TYPE_CHECKING:
    from palm_net.agent.incoming import IncomingService
    from palm_net.agent.outgoing import OutgoingService
    from palm_net.agent.registry import VmRegistry
    from palm_net.hypervisor.vms import AnyVM

log = structlog.get_logger("palm.agent")

ONLY = "only a post-copy migration past its switch can be abandoned (serving at its source, pulling at its destination)"
HINTS = {
    (Role.SOURCE, HandoffState.SENDING): "it has not reached its handoff point: palm migrate --cancel ID, and the VM "
                                         "runs on here",
    (Role.SOURCE, HandoffState.HANDED_OFF): "it is in doubt: palm migrate --resolve ID asks the destination (it "
                                            "answers, or the loud --override resumes the VM here)",
    (Role.SOURCE, HandoffState.DONE): "the VM runs on its destination",
    (Role.SOURCE, HandoffState.ABORTED): "the VM is this agent's again",
    (Role.DESTINATION, HandoffState.RECEIVING): "it is still arriving: it aborts on its own if the source is lost",
    (Role.DESTINATION, HandoffState.PREPARED): "it is still arriving: it aborts on its own if the source is lost",
    (Role.DESTINATION, HandoffState.COMMITTED): "the VM is this agent's, with every page",
    (Role.DESTINATION, HandoffState.ABORTED): "it never ran here",
}


def abandonable(store: HandoffStore, mid_hex: str, reason: str) -> MigrationRow:
    """The row of a migration the operator may abandon now; else AgentError (one line) naming why not."""
    try:
        mid = bytes.fromhex(mid_hex)
    except ValueError:
        raise AgentError(f"bad migration id {mid_hex!r}") from None
    row = store.get(mid)
    if row is None:
        raise AgentError(f"no migration with id {mid_hex} on this agent")
    if row.state is HandoffState.ABANDONED:
        raise AgentError(f"migration {mid_hex} was abandoned already")
    if (row.role, row.state, Step.ABANDON) not in MOVES:  # serving (the source), pulling (the destination)
        hint = HINTS.get((row.role, row.state), "")
        raise AgentError(f"migration {mid_hex} is {row.state.value} at this {row.role.value}: {ONLY}"
                         + (f"; {hint}" if hint else ""))
    if not reason.strip():
        raise AgentError("--abandon needs --reason: why the VM may be lost (it is logged and recorded)")
    return row


async def abandon(store: HandoffStore, registry: VmRegistry, outgoing: OutgoingService, incoming: IncomingService,
                  mid_hex: str, reason: str) -> dict[str, Any]:
    """The operator's abandon of migration ``mid_hex`` (see the module's text): the result
    says what became of it (``status``: abandoned, or committed) and what is ``lost``."""
    row = abandonable(store, mid_hex, reason)
    if row.role is Role.SOURCE:
        vm = registry.of(row)
        lost = (f"VM {row.vm} is lost: this copy, the only one of the pages {row.peer.name} still lacked, "
                f"{'is scrubbed' if vm is not None else 'was no longer here'}; the VM on {row.peer.name} can never "
                f"have them (abandon it there too: palm migrate --resolve {mid_hex} --abandon)")
        if not store.abandon(row.mid, Role.SOURCE, f"OPERATOR ABANDON: {reason}"):
            raise AgentError(_moved(store, row))
        _loudly(row, reason, lost)
        await outgoing.end_readers(row.mid)  # its serving session, its recovery: no page read from a scrubbed copy
    else:
        vm = registry.vms.get(row.vm)  # (activated, it records no migration: its identity says it is)
        vm = vm if vm is not None and vm.vm_id == row.vm_id else None
        if isinstance(vm, ModelVM) and not vm.missing_count():
            return await _commit_whole(store, incoming, row, vm)
        here = ("was gone already" if vm is None else f"({vm.missing_count()} pages still missing) is scrubbed"
                if isinstance(vm, ModelVM) else "is scrubbed")
        lost = (f"VM {row.vm} is lost: its copy here {here}; the copy on {row.peer.name} never runs again "
                f"(if that host comes back, abandon it there too: palm migrate --resolve {mid_hex} --abandon)")
        if not store.abandon(row.mid, Role.DESTINATION, f"OPERATOR ABANDON: {reason}"):
            raise AgentError(_moved(store, row))
        _loudly(row, reason, lost)
        async with incoming.without_sessions(row.mid):  # its pulling sessions end (and are settled) first
            scrubbed = await _scrub(store, registry, row.mid, vm)
        return _result(row, "abandoned", scrubbed, lost)
    scrubbed = await _scrub(store, registry, row.mid, vm)
    return _result(row, "abandoned", scrubbed, lost)


def _result(row: MigrationRow, status: str, scrubbed: bool, lost: str) -> dict[str, Any]:
    return {"migration_id": row.mid.hex(), "status": status, "role": row.role.value, "vm": row.vm,
            "peer": row.peer.name, "scrubbed": scrubbed, "lost": lost}


def _loudly(row: MigrationRow, reason: str, lost: str) -> None:
    log.error("OPERATOR ABANDON: post-copy migration declared lost; " + lost, migration=row.mid.hex(), vm=row.vm,
              peer=row.peer.name, role=row.role.value, phase="postcopy", reason=reason)


def _moved(store: HandoffStore, row: MigrationRow) -> str:
    """The row left SERVING / PULLING between the check and the move (PULLED, or a commit)."""
    now = store.state_of(row.mid)
    return (f"migration {row.mid.hex()} is {now.value if now else 'gone'} now (it settled meanwhile): "
            "nothing abandoned")


async def _scrub(store: HandoffStore, registry: VmRegistry, mid: bytes, vm: AnyVM | None) -> bool:
    """The local copy goes, from the row read back (ABANDONED); a failed scrub is retried by
    the agent, and a restart finishes one a crash cut short.  True once its memory is gone."""
    if vm is None:
        return False
    if registry.vms.get(vm.name) is vm:  # (a destination's own session, settled, may have scrubbed it already)
        registry.forget(vm)  # first: no longer shown, nor retried (an activation that failed: never again)
        try:
            await trio.to_thread.run_sync(store.scrub_abandoned, mid, vm)
        except STORAGE_ERRORS:
            registry.scrub_failed(vm, mid)
    return not vm.dir.exists()


async def _commit_whole(store: HandoffStore, incoming: IncomingService, row: MigrationRow,
                        vm: ModelVM) -> dict[str, Any]:
    """A pulling VM that misses no page: the destination's own step of 7.9 item 5 (synced,
    then COMMITTED), with no session pulling into it meanwhile.  Nothing is lost."""
    async with incoming.without_sessions(row.mid):
        if await trio.to_thread.run_sync(store.pulled, row.mid, vm):
            await trio.to_thread.run_sync(vm.finish_postcopy)
    if store.state_of(row.mid) is not HandoffState.COMMITTED:
        raise AgentError(_moved(store, row))
    log.warning("abandon asked of a pulling VM that misses no page: committed instead, nothing lost",
                migration=row.mid.hex(), vm=row.vm, peer=row.peer.name)
    return _result(row, "committed", False, f"nothing: VM {row.vm} had every page here; its migration is "
                                            "committed instead")
