"""A migration's parameters (what the operator asks) and statistics (what happened)."""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from palm_net.wire.messages import MAX_CHANNELS
from palm_net.wire.protocol import REPLY_TIMEOUT

# What the source does when it must stop iterating (max_rounds or max_factor
# reached) while the expected downtime is still above the limit:
DOWNTIME_POLICIES = ("pause", "abort", "continue", "throttle")


def default_channels(wanted: int = 1) -> int:
    """Channels for a migration when the operator names none: a channel keeps about
    a core busy at each end (Python around libsodium), so one for every four cores (the
    guests keep the rest), at most 8: 1 on a host of fewer than 8 cores; at least what
    the VM's hypervisor migrates on best (``wanted``: HostedVM.channels_wanted)."""
    return max(1, wanted, min(8, (os.cpu_count() or 1) // 4))


@dataclass
class MigrationParams:
    downtime_limit: float = 0.300  # seconds
    max_rounds: int = 30
    max_factor: float = 3.0  # stop iterating after sending this many times the memory
    bandwidth: float | None = None  # bytes/s cap, None = unlimited
    auto_converge: bool = False
    plain: bool = False  # benchmark-only transport mode
    verify_digest: bool = False  # both sides digest memory while paused; COMMIT only if equal
    reply_timeout: float = REPLY_TIMEOUT  # seconds to wait for ACCEPT, READY and DONE (and for a send to move)
    # At the round or volume cap with the downtime limit not met: "pause" anyway
    # (and say so), "abort" (the VM runs on here), "continue" iterating past the
    # caps, or "throttle" the guest a step a round until it fits (pause at 99%).
    downtime_policy: str = "pause"
    channels: int = 1  # sessions carrying the pages, or a stream backend's streams (QEMU's multifd): proto 7.8
    # Post-copy (proto 7.9): switch instead of the stop-and-copy, after this many
    # rounds (0: at once, every page follows; None: where the downtime policy would act).
    postcopy: bool = False
    postcopy_after: int | None = None

    def validate(self) -> None:
        if not 0 < self.downtime_limit <= 3600:
            raise ValueError("downtime limit must be between 0 and 3600 s")
        if not 1 <= self.max_rounds <= 10_000:
            raise ValueError("max rounds must be between 1 and 10000")
        if not 1.0 <= self.max_factor <= 1000:
            raise ValueError("max factor must be between 1 and 1000")
        if self.bandwidth is not None and self.bandwidth < 4096:
            raise ValueError("bandwidth cap must be at least 4 KiB/s")
        if not 0.1 <= self.reply_timeout <= 3600:
            raise ValueError("reply timeout must be between 0.1 and 3600 s")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be between 1 and {MAX_CHANNELS}")
        if self.downtime_policy not in DOWNTIME_POLICIES:
            raise ValueError(f"downtime policy must be one of {', '.join(DOWNTIME_POLICIES)}")
        if self.postcopy_after is not None and not (self.postcopy and 0 <= self.postcopy_after <= 10_000):
            raise ValueError("postcopy-after is a round count from 0 to 10000, with post-copy")
        if self.postcopy and (self.channels > 1 or self.plain):
            raise ValueError("post-copy migrates on one channel, never in the plain mode")


# The downtime, from the pause to DONE, in the steps the source sees (each from the
# mark before it): the stop-and-copy to its last byte read and sent ("last-byte"),
# the final messages sent ("complete"), the destination's load, checks and durable
# PREPARE ("ready"; a stream backend's own completion, QEMU's event and figures, is
# awaited beside it), the source's durable hand-off ("handed-off"), COMMIT, the
# destination's durable COMMIT, activation and DONE ("done").
DOWNTIME_PHASES = (("stop-and-copy", "last-byte"), ("finish", "complete"), ("destination-prepare", "ready"),
                   ("hand-off", "handed-off"), ("commit", "done"))


class Status(enum.StrEnum):
    """Where an outgoing migration stands, as its record and `palm` show it."""

    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    IN_DOUBT = "in-doubt"  # past the handoff point, the outcome not yet known


class Phase(enum.StrEnum):
    """The step an outgoing migration is in, as the progress line shows it."""

    SETUP = "setup"
    ROUND = "round"  # a pre-copy round (page backend)
    STREAM = "stream"  # the hypervisor's own stream (stream backend)
    STOP_AND_COPY = "stop-and-copy"
    VERIFY = "verify"  # COMPLETE sent: the destination checks
    COMMIT = "commit"  # handed off, COMMIT sent
    POSTCOPY = "postcopy"  # the VM runs at the destination; its missing pages going out (proto 7.9)
    COMPLETED = "completed"
    DIGEST_CHECK = "digest-check"  # after DONE: this copy's memory at the pause re-read (--verify-digest)
    IN_DOUBT = "in-doubt"


@dataclass
class RoundStats:
    round: int
    pages: int  # page records sent
    bytes: int  # message bytes sent (before the AEAD tag and framing)
    duration: float
    dirty_pages: int  # pages dirtied during the round
    dirty_rate: float  # pages/s
    bandwidth: float  # bytes/s measured on the wire
    paused: bool = False  # the stop-and-copy round (the guest paused; nothing dirtied)

    def as_dict(self) -> dict[str, Any]:
        """For --json: durations in ms, as every other duration there."""
        d = asdict(self)
        d["duration_ms"] = round(d.pop("duration") * 1000, 3)
        return d


@dataclass
class MigrationStats:
    status: Status = Status.SETUP
    phase: Phase = Phase.SETUP
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float | None = None
    expected_downtime: float | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    current_round: int = 0
    transferred: int = 0  # bytes on the wire, framing and tags included
    remaining: int = 0  # pages still to send in the current round
    round_pages: int = 0  # pages of the current round
    channels: int = 1  # sessions that carried the pages (proto 7.8)
    zero_pages: int = 0
    normal_pages: int = 0
    protected_pages: int = 0
    page_records: int = 0
    bandwidth: float = 0.0
    throttle: float = 1.0
    digest: str | None = None  # memory digest at pause, when verify_digest was asked (READY's, proto 7.4)
    # A page backend's digest is kept page by page as pages are sent: after DONE
    # it is checked against this copy's memory at the pause, read afresh (7.4).
    digest_at_pause: str | None = None  # "equal", "differs"
    digest_check: float | None = None  # seconds that check took (after DONE, off the downtime)
    # Post-copy (proto 7.9): the switch's missing pages, and the serving phase.
    postcopy_pages: int | None = None  # pages left to the serving phase at the switch
    served_pages: int = 0  # pages sent while serving (this session)
    fetched_pages: int = 0  # of them, asked for by the destination's vCPUs (FETCH)
    serve_time: float | None = None  # seconds from RUNNING to PULLED
    hypervisor: dict[str, Any] | None = None  # a stream backend's own figures (QEMU's query-migrate)
    downtime_limit: float | None = None  # the limit asked for (seconds)
    # Why the source stopped iterating: "converged" (the rest fits the limit),
    # or the cap it hit with the limit not met ("max-rounds", "max-factor",
    # "max-throttle") and paused anyway by the policy.
    stop_reason: str | None = None
    ready_wait: float | None = None  # from COMPLETE sent to READY (the destination's checks, and digests if asked)
    # The source's clock at each step of the pause (monotonic seconds), and from them
    # the downtime by phase (DOWNTIME_PHASES, seconds; set at DONE).
    marks: dict[str, float] = field(default_factory=dict)
    downtime_phases: dict[str, float] | None = None
    # The destination's own account of its steps inside the pause (READY's and DONE's
    # timings, seconds; for the record only): the stream's end loaded, PREPARE, the
    # durable COMMIT, the activation.
    destination_phases: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Step(enum.Enum):
    """Where an outgoing migration is: what the engine waits for next."""

    OPENING = "opening"  # BEGIN sent: ACCEPT due
    STARTING = "starting"  # dirty logging (or the hypervisor's stream) starting: Started / StreamStarted due
    ROUND = "round"  # a pre-copy round's pages going out: PagesSent due
    COLLECTING = "collecting"  # the round's dirty log being read: Dirty due
    CATCHING_UP = "catching-up"  # the last ROUND_END sent: its ROUND_DONE (or the catch-up wait's end) due
    PAUSING = "pausing"  # the guest being paused: Paused due
    STOP_AND_COPY = "stop-and-copy"  # the last copy going out: PagesSent due
    EXPORTING = "exporting"  # CPU state and blob being exported: FinalState due
    STREAMING = "streaming"  # the hypervisor's stream being carried: StreamSent due
    COMPLETING = "completing"  # the channel's count and hash being read: Transcript due
    VERIFYING = "verifying"  # COMPLETE sent: READY (and our digest, if asked) due
    HANDING_OFF = "handing-off"  # HANDED_OFF being made durable: HandedOff due
    COMMITTING = "committing"  # COMMIT sent: DONE (or ABORT with a token) due
    SWITCHING = "switching"  # post-copy (proto 7.9): the missing pages' metadata being read: Metadata due
    WANTING = "wanting"  # post-copy's recovery session: the destination's WANTs due
    SERVING = "serving"  # post-copy: the VM runs at the destination, its missing pages going out
    DONE = "done"  # the destination runs the VM (post-copy: and has every page)
