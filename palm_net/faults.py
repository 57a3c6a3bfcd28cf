"""Fault points: every step of a migration where the world can fail, by name.

In the spirit of FoundationDB's BUGGIFY: the code calls ``fault(step)`` just
before each durable write (and just after it: the crash between persisting a
step and acting on it), each VM action, each send and receive, each request
the destination's shell performs in a worker thread.  Nothing happens unless
an injector is installed: the fault matrix (tests/test_faults.py) installs
one that raises, cancels the agent or kills the process at one step, then
checks that the VM runs on exactly one host.  An agent started for such a
drill reads ``PALM_FAULT=STEP:KIND`` (palm_net.agent.faultdrill; it says so
loudly at start).  This module imports nothing of palm_net: every layer may
call it.

``STEPS`` names every point; a test checks that the code's calls and this
table agree, and that every effect either shell performs has one, so a new
step cannot be added without its fault point.
"""

from __future__ import annotations

from collections.abc import Callable

SRC, DST = "source", "destination"


def _store(side: str, step: str, what: str) -> dict[str, str]:
    return {f"{side}.store.{step}": f"before the durable write: {what}",
            f"{side}.store.{step}.done": f"after the durable write, before acting on it: {what}"}


# Each shell performs each effect of its engine behind one point named after
# the effect (palm_net.migration.effects): "source.<Effect>", "destination.<Effect>".
SOURCE_EFFECTS = {
    "Send": "control messages sealed and sent",
    "StartPrecopy": "dirty log on, keys exported",
    "OpenChannels": "the data sessions opened and bound (more channels, proto 7.8)",
    "SendPages": "a round's pages read (each piece, in a worker thread) and sent",
    "CollectDirty": "the dirty log read after a round",
    "SetThrottle": "the guest throttled",
    "Pause": "the VM paused for stop-and-copy",
    "ExportFinalState": "CPU state and protected-context blob exported",
    "StartStream": "the stream backend's migration started",
    "SendStream": "the stream backend's bytes carried",
    "FinishStream": "the stream backend's migration finished (its guest paused)",
    "ReadTranscript": "the channel's count and hash read for COMPLETE",
    "DigestMemory": "the digest of the pages as sent",
    "HandOff": "the hand-off asked of the store (before its own points)",
    "ReadMetadata": "post-copy: the missing pages' metadata read at the switch",
    "Serve": "post-copy: SERVING asked of the store (before its own points)",
}
EFFECTS = ("OpenIncoming", "ImportKeys", "ApplyPages", "ListenStream", "StreamIn", "EndStream", "Settle",
           "ImportCpuState", "ImportProtection", "Prepare", "CommitAndActivate", "AbortForever", "Send",
           "MarkMissing", "FinishPulling")

STEPS: dict[str, str] = {
    # the source
    **_store(SRC, "open", "the row SENDING, the VM marked with the migration"),
    **{f"{SRC}.{e}": f"the shell performs {e}: {what}" for e, what in SOURCE_EFFECTS.items()},
    f"{SRC}.receive": "a message from the destination",
    **_store(SRC, "hand-off", "HANDED_OFF, before COMMIT leaves"),
    **_store(SRC, "confirm", "DONE: the destination committed"),
    **_store(SRC, "serve", "SERVING: post-copy, the destination runs the VM"),
    f"{SRC}.vm.scrub": "the source's copy destroyed after DONE",
    **_store(SRC, "abort", "ABORTED: the source runs its copy again"),
    **_store(SRC, "abandon", "ABANDONED: the operator declared a serving VM lost (post-copy)"),
    f"{SRC}.vm.resume": "the source's copy resumed",
    # the destination
    **_store(DST, "open", "the row RECEIVING"),
    f"{DST}.receive": "a buffer of records from the source",
    **{f"{DST}.{e}": f"the shell performs {e}" for e in EFFECTS},
    f"{DST}.vm.sync": "the incoming VM synced (and its activation staged) before PREPARED",
    **_store(DST, "prepare", "PREPARED, before READY"),
    **_store(DST, "commit", "COMMITTED, before the VM runs"),
    **_store(DST, "switch", "PULLING: post-copy, before the VM runs with pages missing"),
    **_store(DST, "pulled", "COMMITTED: post-copy, every page in"),
    f"{DST}.vm.activate": "the committed VM activated",
    **_store(DST, "abort", "ABORTED forever"),
    **_store(DST, "abandon", "ABANDONED: the operator declared a pulling VM lost (post-copy)"),
    f"{DST}.vm.scrub": "what arrived destroyed after an abort",
}


Injector = Callable[[str], None]
_injector: Injector | None = None


def fault(step: str) -> None:
    """A point where the world may fail: does nothing unless an injector is installed."""
    inj = _injector
    if inj is not None:
        inj(step)


def install(injector: Injector | None) -> Injector | None:
    """Installs ``injector`` (None: none); returns the one it replaces."""
    global _injector
    old, _injector = _injector, injector
    return old
