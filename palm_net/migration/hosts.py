"""The blocking halves of the migration shells: what each engine's effects do to the
VM and the durable handoff.

``SourceHost`` and ``DestinationHost`` perform the requests that touch the
hypervisor or the store (each behind its fault point, "source.<Effect>" or
"destination.<Effect>", palm_net.faults) and return their results.  They
touch neither the engine nor the session, and import no trio: the trio
shells (palm_net.migration.runner) run them in worker threads, the sans-IO
drivers (palm_net.testing.engines) call them directly.  ``error_of`` maps
what they raise into the one error vocabulary.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import cast

from nacl.signing import SigningKey

from palm_net.errors import ErrorCode, MigrationFailure, PalmError, RemoteProtocolError
from palm_net.faults import fault
from palm_net.hypervisor.backend import (
    Backend,
    HostedVM,
    HypervisorError,
    NoRoomError,
    StreamBackend,
    describe_error,
)
from palm_net.hypervisor.model_postcopy import PostcopyPageError
from palm_net.hypervisor.protection import ProtectionIntegrityError
from palm_net.migration.effects import (
    Aborted,
    AbortForever,
    ApplyPages,
    CollectDirty,
    CommitAndActivate,
    Committed,
    Digested,
    DigestMemory,
    Dirty,
    Effect,
    EndStream,
    ExportFinalState,
    FinalState,
    FinishPulling,
    FinishStream,
    HandedOff,
    HandOff,
    ImportCpuState,
    ImportKeys,
    ImportProtection,
    KeysImported,
    ListenStream,
    MarkMissing,
    Metadata,
    Pause,
    Paused,
    Prepare,
    Prepared,
    ProtectionImported,
    PullFinished,
    ReadMetadata,
    Result,
    Serve,
    Served,
    SetThrottle,
    Settle,
    Settled,
    Started,
    StartPrecopy,
    StreamFinished,
    StreamIn,
    StreamListening,
    StreamLoaded,
)
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffStore, Peer

# Errors of the host's own storage, never of a connection.
LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def error_of(exc: BaseException) -> PalmError:
    """What ended a session, in the one vocabulary (the host's and the connection's
    errors mapped once, here).  A file system's error is named as it is (no space on
    which file system, an I/O error), never as a lost connection; what is not known
    here is raised again."""
    if isinstance(exc, PalmError):
        return exc
    if isinstance(exc, ProtectionIntegrityError):
        return MigrationFailure(ErrorCode.INTEGRITY, str(exc))
    if isinstance(exc, NoRoomError):
        return MigrationFailure(ErrorCode.NO_SPACE, str(exc))
    if isinstance(exc, PostcopyPageError):  # a post-copy page refused: the peer's (proto 7.9)
        return RemoteProtocolError(ErrorCode(exc.code), str(exc))
    if isinstance(exc, HypervisorError):
        return MigrationFailure(ErrorCode.HYPERVISOR, str(exc))
    if isinstance(exc, sqlite3.Error):  # the state database (a full or failing disk)
        full = "full" in str(exc)
        return MigrationFailure(ErrorCode.NO_SPACE if full else ErrorCode.HYPERVISOR, f"state database: {exc}")
    if isinstance(exc, TimeoutError):  # a local wait (QMP, a worker), not the peer
        return MigrationFailure(ErrorCode.TIMEOUT, describe_error(exc))
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in LOCAL_ERRNOS):
        return MigrationFailure(ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                else ErrorCode.HYPERVISOR, describe_error(exc))
    if isinstance(exc, OSError):
        return RemoteProtocolError(ErrorCode.CLOSED, f"connection lost ({describe_error(exc)})")
    raise exc


class SourceHost:
    """Performs a source engine's requests on the VM and the durable handoff (those
    that block: the shell runs them in a worker thread, except HandOff, which it
    runs on its own task so that nothing yields between its checkpoint and the
    write).  ``clock``: the monotonic clock the engine is given."""

    def __init__(self, vm: HostedVM, store: HandoffStore | None, mid: bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.vm = vm
        self.store = store
        self.mid = mid
        self.clock = clock

    def perform(self, eff: Effect) -> Result | None:
        fault(f"source.{type(eff).__name__}")
        vm = cast(Backend, self.vm)
        if isinstance(eff, StartPrecopy):
            if eff.digest:
                vm.start_page_digest()  # the hash of each page as it is sent (proto 7.4)
            vm.enable_dirty_log()  # before the first page is read
            return Started(vm.export_keys(), vm.protected_ranges())
        if isinstance(eff, CollectDirty):
            return Dirty(vm.collect_dirty())
        if isinstance(eff, SetThrottle):
            vm.set_throttle(eff.fraction)
            return None
        if isinstance(eff, Pause):
            vm.pause()
            paused_at = self.clock()
            dirty = vm.collect_dirty()  # what the guest wrote until the pause
            vm.disable_dirty_log()
            return Paused(paused_at, dirty)
        if isinstance(eff, ExportFinalState):
            return FinalState(vm.export_cpu_state(), vm.export_protection())
        if isinstance(eff, FinishStream):
            stream = cast(StreamBackend, self.vm)
            figures = stream.finish_stream(eff.digest)
            return StreamFinished(stream.paused_at, figures)
        if isinstance(eff, DigestMemory):
            return Digested(self.vm.page_digest())
        if isinstance(eff, HandOff):
            assert self.store is not None, "a hand-off needs the source's store"
            return HandedOff(self.store.hand_off(self.mid))
        if isinstance(eff, ReadMetadata):
            return Metadata(*vm.read_metadata(eff.gfns))
        if isinstance(eff, Serve):
            assert self.store is not None, "serving needs the source's store"
            return Served(self.store.serve(self.mid))
        raise AssertionError(f"no host for {eff!r}")


class DestinationHost:
    """Performs a destination engine's requests on the incoming VM and the durable
    handoff.  Blocking, and touching neither the engine nor the session: the
    shell runs it in a worker thread (tests may call it directly)."""

    def __init__(self, store: HandoffStore, signing: SigningKey, peer: Peer) -> None:
        self.store = store
        self.signing = signing
        self.peer = peer
        self.vm: HostedVM | None = None

    def bulk(self, effects: Sequence[Effect]) -> None:
        """Page batches into the VM (protected ones verified on arrival), or stream bytes to it."""
        vm = self.vm
        assert vm is not None
        try:
            for eff in effects:
                fault(f"destination.{type(eff).__name__}")
                if isinstance(eff, ApplyPages) and eff.fill:  # post-copy: into missing pages only
                    cast(Backend, vm).fill_missing(eff.batch)
                elif isinstance(eff, ApplyPages):
                    cast(Backend, vm).write_pages(eff.batch)
                elif isinstance(eff, StreamIn):
                    cast(StreamBackend, vm).stream_in(eff.data, eff.channel)
        except (ProtectionIntegrityError, HypervisorError, OSError) as exc:
            raise error_of(exc) from None

    def perform(self, eff: Effect, mid: bytes | None) -> Result | None:
        """One request (not Send, not OpenIncoming: those are the shell's); its result, if one is due.
        ``mid``: the session's migration id (None before a valid first message)."""
        fault(f"destination.{type(eff).__name__}")
        if isinstance(eff, AbortForever):
            # The row decides: a committed VM stays (this agent's now), whatever went wrong.
            recorded = eff.recorded and mid is not None
            if not self.store.abort_forever(mid if recorded else None, self.vm, eff.why):
                return Aborted(b"", aborted=False)
            self.vm = None
            return Aborted(self.store.abort_token(mid, self.peer.static_pub, self.signing)
                           if recorded and mid is not None else b"")
        vm = self.vm
        assert vm is not None and mid is not None  # the engine asks for these only after OpenIncoming
        try:
            if isinstance(eff, (ApplyPages, StreamIn)):
                self.bulk([eff])
                return None
            if isinstance(eff, ImportKeys):
                cast(Backend, vm).import_keys(eff.data)
                return KeysImported(cast(Backend, vm).protected_ranges())
            if isinstance(eff, ImportCpuState):
                cast(Backend, vm).import_cpu_state(eff.state)
                return None
            if isinstance(eff, ImportProtection):
                cast(Backend, vm).import_protection(eff.blob)
                return ProtectionImported(vm.info.protected_pages)
            if isinstance(eff, ListenStream):
                cast(StreamBackend, vm).listen_stream(eff.channels)
                return StreamListening()
            if isinstance(eff, EndStream):
                t0 = eff.since or time.monotonic()
                cast(StreamBackend, vm).end_stream()
                return StreamLoaded(time.monotonic() - t0)
            if isinstance(eff, Settle):
                cast(Backend, vm).settle()
                return Settled()
            if isinstance(eff, Prepare):
                t0 = time.monotonic()
                persisted = self.store.prepare(mid, vm)
                digest = bytes.fromhex(vm.page_digest()) if persisted and eff.digest else b""
                return Prepared(persisted, digest, time.monotonic() - t0)
            if isinstance(eff, CommitAndActivate):
                t0 = time.monotonic()
                act = (self.store.switch_and_activate if eff.postcopy else self.store.commit_and_activate)(mid, vm)
                return Committed(act.committed, act.running, act.error, time.monotonic() - t0, act.took)
            if isinstance(eff, MarkMissing):
                try:
                    cast(Backend, vm).set_missing(eff.round, eff.gfns, eff.vers, eff.tags)
                except ValueError as exc:  # a version or MAC count that does not fit the layout: the peer's
                    raise RemoteProtocolError(ErrorCode.MALFORMED, f"MISSING: {exc}") from None
                return None
            if isinstance(eff, FinishPulling):
                committed = self.store.pulled(mid, vm)
                digest = bytes.fromhex(vm.page_digest()) if committed and eff.digest else b""
                if committed:
                    cast(Backend, vm).finish_postcopy()
                return PullFinished(committed, digest)
        except (ProtectionIntegrityError, *STORAGE_ERRORS) as exc:
            raise error_of(exc) from None
        raise AssertionError(f"no host for {eff!r}")


