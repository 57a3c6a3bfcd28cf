"""What the migration engines ask of their shell, and what the shell tells them back.

The engines (palm_net.migration.source, .destination) are sans-IO: they take
records and results and return effects, small frozen objects.  The trio
shell (palm_net.migration.runner) performs the effects in order: it sends,
asks the hypervisor, writes the durable handoff; a request whose answer the
engine needs comes back as a result through ``on_result``.  Each effect the
shell performs is also a fault point, "source.<Effect>" or
"destination.<Effect>" (palm_net.faults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from palm_net.wire.messages import Begin
from palm_net.wire.pages import Gfns, PageBatch, RoundGfns

# -- effects ------------------------------------------------------------------


class Effect:
    """Something the shell does for an engine.  ``beside``: performed beside the
    effects that follow (its result comes back whenever it is ready), not before them."""

    beside = False


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
    """Page records into the incoming VM (protected ones verified on arrival); ``fill``:
    post-copy's, into pages that are missing (proto 7.9)."""

    batch: PageBatch
    fill: bool = False


@dataclass(frozen=True)
class ListenStream(Effect):
    """A stream backend: the incoming hypervisor listens for its migration on
    ``channels`` streams (more than one: QEMU's multifd, proto 7.8), each connected
    in order, the main one first: -> StreamListening."""

    channels: int


@dataclass(frozen=True)
class StreamIn(Effect):
    """The next bytes of a stream backend's migration stream, to its hypervisor
    (a view of the buffer its record was opened in: used before the shell releases it),
    on its ``channel``'s stream."""

    data: bytes | bytearray | memoryview
    channel: int = 0


@dataclass(frozen=True)
class EndStream(Effect):
    """The stream is whole: wait until the hypervisor loaded it, paused: -> StreamLoaded.
    ``since``: when the shell saw the stream's end (its monotonic clock; 0: when it
    performs this), so that READY's load counts the bytes still being written to the
    hypervisor then (proto 7.4: from STREAM_END)."""

    since: float = 0.0


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
    """Persist COMMITTED (``postcopy``: PULLING, its missing pages still to come), then
    run the VM: -> Committed."""

    postcopy: bool = False


@dataclass(frozen=True)
class MarkMissing(Effect):
    """Post-copy's MISSING (proto 7.9): these pages come later, with these versions and
    (protected pages) MACs, into the VM's post-copy map and metadata."""

    round: int
    gfns: Gfns
    vers: Gfns
    tags: bytes


@dataclass(frozen=True)
class FinishPulling(Effect):
    """Post-copy: every page is in: the VM synced, COMMITTED durable: -> PullFinished
    (with the digest of the pages as the migration wrote them, if ``digest``)."""

    digest: bool = False


@dataclass(frozen=True)
class AbortForever(Effect):
    """Persist ABORTED (never activated), scrub what arrived: -> Aborted (with the token, if any).
    ``recorded``: this session opened the migration (else there is nothing of ours to
    abort: a refused BEGIN, or another session's id)."""

    why: str
    recorded: bool


# -- the source's effects

@dataclass(frozen=True)
class StartPrecopy(Effect):
    """A page backend: the page digest on if asked (proto 7.4), dirty logging on
    (before the first page is read), the process keys exported: -> Started."""

    digest: bool


@dataclass(frozen=True)
class OpenChannels(Effect):
    """More channels (proto 7.8): a DATA session each to the same destination (its
    static key checked), and its BIND sent: -> ChannelsOpened."""

    binds: tuple[bytes, ...]  # BIND of channel 1, 2, ...


@dataclass(frozen=True)
class SendPages(Effect):
    """The pages of ``gfns``, read from the VM and sent as PAGES messages and their
    data records; the shell reads them and asks the engine for each batch's records
    (``SourceEngine.pages``): -> PagesSent."""

    gfns: RoundGfns
    round: int


@dataclass(frozen=True)
class CollectDirty(Effect):
    """The dirty log since the last collection: -> Dirty."""


@dataclass(frozen=True)
class SetThrottle(Effect):
    """The guest's CPU share (auto-converge or the throttle policy)."""

    fraction: float


@dataclass(frozen=True)
class Pause(Effect):
    """Stop-and-copy: pause the guest, collect what it wrote until then, dirty
    logging off: -> Paused."""


@dataclass(frozen=True)
class ExportFinalState(Effect):
    """The CPU state and the protected-context blob of the paused guest: -> FinalState."""


@dataclass(frozen=True)
class StartStream(Effect):
    """A stream backend: start the hypervisor's own migration: -> StreamStarted."""

    downtime_limit: float
    bandwidth: float | None
    auto_converge: bool
    channels: int = 1  # the hypervisor's streams: its main one, then one more per DATA session


@dataclass(frozen=True)
class SendStream(Effect):
    """Carry the hypervisor's streams to their end, a STREAM message and its data records
    per chunk, each channel's made under its lease (``SourceEngine.lease_stream``): -> StreamSent."""


@dataclass(frozen=True)
class FinishStream(Effect):
    """The hypervisor completed its migration (its guest paused), awaited beside the
    destination's checks: -> StreamFinished.  ``digest``: our digest follows (what it
    leaves out is found now, not at a digest that never comes)."""

    digest: bool = False
    beside = True


@dataclass(frozen=True)
class ReadTranscript(Effect):
    """The channel's count of records sent and its running hash, for COMPLETE: -> Transcript."""


@dataclass(frozen=True)
class DigestMemory(Effect):
    """The digest of the pages as sent (proto 7.4), computed while the destination
    verifies: performed beside what follows, -> Digested whenever it is ready."""

    beside = True


@dataclass(frozen=True)
class HandOff(Effect):
    """The handoff point: HANDED_OFF durable, before COMMIT leaves: -> HandedOff."""


@dataclass(frozen=True)
class ReadMetadata(Effect):
    """Post-copy's switch (proto 7.9): the kind, version and MAC of each page that is not
    sent now (the VM paused): -> Metadata."""

    gfns: Gfns


@dataclass(frozen=True)
class Serve(Effect):
    """Post-copy: the destination runs the VM: SERVING durable: -> Served."""


@dataclass(frozen=True)
class Note(Effect):
    """A step worth a log line and a progress update (nothing else is done)."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict, hash=False)


# -- results -------------------------------------------------------------------


class Result:
    """What the shell learned by performing a request."""


@dataclass(frozen=True)
class Opened(Result):
    protected_pages: int  # what the new VM holds protected (0 until KEYS)


@dataclass(frozen=True)
class KeysImported(Result):
    ranges: tuple[tuple[int, int], ...]  # the gfns each protected process owns, (first, count)


@dataclass(frozen=True)
class StreamLoaded(Result):
    took: float = 0.0  # seconds the hypervisor took to load the stream's end (for the record)


@dataclass(frozen=True)
class StreamListening(Result):
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
    took: float = 0.0  # seconds: sync, staging, the durable write, the digest if asked


@dataclass(frozen=True)
class Committed(Result):
    committed: bool  # the durable row says COMMITTED (False: aborted before, the abort stands)
    running: bool = True  # the VM runs here (False: activation failed, retried; DONE all the same)
    error: str | None = None  # why it does not run
    took: float = 0.0  # seconds: the durable COMMIT and the activation
    activating: float = 0.0  # seconds of it the activation took


@dataclass(frozen=True)
class Aborted(Result):
    token: bytes  # the abort token for the peer, or empty (palm_net.migration.handoff)
    aborted: bool = True  # False: the row says COMMITTED (the VM stays: it is this agent's)


# -- the source's results


@dataclass(frozen=True)
class Started(Result):
    keys: bytes  # the process keys and layout (KEYS)
    protected: tuple[tuple[int, int], ...]  # each process's gfns: (first, count)


@dataclass(frozen=True)
class ChannelsOpened(Result):
    pass


@dataclass(frozen=True)
class PagesSent(Result):
    pass


@dataclass(frozen=True)
class Dirty(Result):
    gfns: Gfns


@dataclass(frozen=True)
class Paused(Result):
    at: float  # the shell's monotonic clock when the guest stopped
    dirty: Gfns  # what the guest wrote since the last collection


@dataclass(frozen=True)
class FinalState(Result):
    cpu_state: bytes
    blob: bytes


@dataclass(frozen=True)
class StreamStarted(Result):
    pass


@dataclass(frozen=True)
class StreamSent(Result):
    pass


@dataclass(frozen=True)
class StreamFinished(Result):
    paused_at: float | None  # when the hypervisor stopped its guest (monotonic)
    figures: dict[str, Any] = field(hash=False)  # its own figures (palm_net.hypervisor.qemu.migration_figures)


@dataclass(frozen=True)
class Transcript(Result):
    records: int
    hash: bytes


@dataclass(frozen=True)
class Digested(Result):
    digest: str  # hex


@dataclass(frozen=True)
class HandedOff(Result):
    ok: bool  # False: the row no longer said SENDING (cancelled meanwhile)


@dataclass(frozen=True)
class Metadata(Result):
    kinds: bytes  # 1 normal, 2 protected, one a page
    vers: Gfns  # a protected page's protection version (0 for a normal one)
    tags: bytes  # the MAC of each protected page, in order


@dataclass(frozen=True)
class Served(Result):
    ok: bool  # the row says SERVING


@dataclass(frozen=True)
class PullFinished(Result):
    committed: bool  # the row says COMMITTED
    digest: bytes = b""  # the memory digest of what the migration wrote, if asked
