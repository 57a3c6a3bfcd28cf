"""What the migration engines ask of their shell, and what the shell tells them back.

The engines (palm_net.migration.source, .destination) are sans-IO: they take
records and results and return effects, small frozen objects.  The trio
shell (palm_net.migration.runner) performs the effects in order: it sends,
asks the hypervisor, writes the durable handoff; a request whose answer the
engine needs comes back as a result through ``on_result``.
"""

from __future__ import annotations

from dataclasses import dataclass

from palm_net.wire.messages import Begin
from palm_net.wire.pages import PageBatch

# -- effects ------------------------------------------------------------------


class Effect:
    """Something the shell does for an engine."""


@dataclass(frozen=True)
class Send(Effect):
    """A message to seal and send; ``bulk`` may travel in the clear in the plain benchmark mode."""

    data: bytes
    bulk: bool = False


@dataclass(frozen=True)
class OpenIncoming(Effect):
    """Admission, the incoming VM and the durable row RECEIVING (proto 7.1): -> Opened."""

    mid: bytes
    begin: Begin


@dataclass(frozen=True)
class ImportKeys(Effect):
    """The process keys and layout into the incoming VM: -> KeysImported."""

    data: bytes


@dataclass(frozen=True)
class ApplyPages(Effect):
    """Page records into the incoming VM (protected ones verified on arrival)."""

    batch: PageBatch


@dataclass(frozen=True)
class StreamIn(Effect):
    """The next bytes of a stream backend's migration stream, to its hypervisor
    (a view of the buffer its record was opened in: used before the shell releases it)."""

    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class EndStream(Effect):
    """The stream is whole: wait until the hypervisor loaded it, paused: -> StreamLoaded."""


@dataclass(frozen=True)
class Settle(Effect):
    """A round is written: wait until the incoming VM's memory is all reserved (what
    READY would wait for inside the pause otherwise): -> Settled."""


@dataclass(frozen=True)
class ImportCpuState(Effect):
    state: bytes


@dataclass(frozen=True)
class ImportProtection(Effect):
    """The protected-context blob: -> ProtectionImported."""

    blob: bytes


@dataclass(frozen=True)
class Prepare(Effect):
    """Sync the VM, persist PREPARED, and digest its memory if asked: -> Prepared."""

    digest: bool


@dataclass(frozen=True)
class CommitAndActivate(Effect):
    """Persist COMMITTED, then run the VM: -> Committed."""


@dataclass(frozen=True)
class AbortForever(Effect):
    """Persist ABORTED (never activated), scrub what arrived: -> Aborted (with the token, if any).
    ``recorded``: this session opened the migration (else there is nothing of ours to
    abort: a refused BEGIN, or another session's id)."""

    why: str
    recorded: bool


# -- results -------------------------------------------------------------------


class Result:
    """What the shell learned by performing a request."""


@dataclass(frozen=True)
class Opened(Result):
    protected_pages: int  # what the new VM holds protected (0 until KEYS)


@dataclass(frozen=True)
class KeysImported(Result):
    protected_pages: int


@dataclass(frozen=True)
class StreamLoaded(Result):
    pass


@dataclass(frozen=True)
class Settled(Result):
    pass


@dataclass(frozen=True)
class ProtectionImported(Result):
    protected_pages: int


@dataclass(frozen=True)
class Prepared(Result):
    persisted: bool  # False: the migration was aborted meanwhile (a recovery query, a timeout)
    digest: bytes = b""


@dataclass(frozen=True)
class Committed(Result):
    committed: bool  # the durable row says COMMITTED (False: aborted before, the abort stands)
    running: bool = True  # the VM runs here (False: activation failed, retried; DONE all the same)
    error: str | None = None  # why it does not run


@dataclass(frozen=True)
class Aborted(Result):
    token: bytes  # the abort token for the peer, or empty (palm_net.migration.handoff)
    aborted: bool = True  # False: the row says COMMITTED (the VM stays: it is this agent's)
