"""Live progress of a migration out, in one shape for every backend.

The control API's ``migrate`` op (and any other op that drives migrations,
such as a cluster drain) sends these views as progress events; `palm`
draws them.  A view holds only figures that exist at that moment:

- ``phase``: setup, round, stream, stop-and-copy, verify, commit, digest-check (--verify-digest
  re-reads this copy after DONE), completed;
- ``round``: the pre-copy round (QEMU: its dirty-sync count less one);
- ``percent``: of the current round's pages sent (QEMU: of guest RAM, in its
  first pass only: later passes have no known size);
- ``sent``: bytes on the wire so far; ``remaining``: bytes of guest memory
  still to send in this round, where known;
- ``rate``: bytes/s on the wire over the last two seconds (every round,
  round 0 included);
- ``dirty_rate``: bytes/s the guest dirtied in the last round (the embedded
  model measures it at each round's end; QEMU at each dirty sync);
- ``expected_downtime``: seconds the stop-and-copy would take now;
- ``eta``: seconds left in the current round at the current rate, once that rate spans
  ETA_AFTER seconds (before, a fraction of a second of setup would promise minutes).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from palm_net.migration.params import MigrationStats

PAGE = 4096
WINDOW = 2.0  # seconds of samples for the current rate
ETA_AFTER = 1.0  # no "left" estimate before the rate has been measured over this long (issue 25, low)


class ProgressMeter:
    """Turns a migration's stats (and a stream backend's live figures) into views."""

    def __init__(self, mid: bytes, started: float) -> None:
        self.mid = mid
        self.started = started
        self._samples: deque[tuple[float, int]] = deque()
        self._round: tuple[int, int] | None = None  # (round, bytes sent when it began)

    def rate(self, now: float, sent: int) -> float | None:
        s = self._samples
        s.append((now, sent))
        while len(s) > 2 and now - s[1][0] >= WINDOW:
            s.popleft()
        t0, b0 = s[0]
        return (sent - b0) / (now - t0) if now - t0 >= 0.2 else None

    def rate_is_meaningful(self, now: float) -> bool:
        """The rate spans ETA_AFTER seconds of samples: the first fraction of a second (the
        connection, the first batch) would promise minutes for a one-second migration."""
        return bool(self._samples) and now - self._samples[0][0] >= ETA_AFTER

    def view(self, stats: MigrationStats, now: float, live: dict[str, Any] | None = None) -> dict[str, Any]:
        st = stats
        sent = st.transferred
        rate = self.rate(now, sent)
        out: dict[str, Any] = {"migration_id": self.mid.hex(), "phase": st.phase, "elapsed": now - self.started,
                               "round": st.current_round, "sent": sent, "rate": rate, "percent": None,
                               "remaining": None, "dirty_rate": None, "expected_downtime": st.expected_downtime,
                               "eta": None}
        ram = (live or {}).get("ram") or {}
        if ram:  # a stream backend's own figures (QEMU's query-migrate)
            total, left = int(ram.get("total") or 0), int(ram.get("remaining") or 0)
            syncs = int(ram.get("dirty-sync-count") or 0)
            out["round"] = max(0, syncs - 1)
            out["remaining"] = left
            if total and syncs <= 1:
                out["percent"] = 100.0 * (total - left) / total
            if syncs > 1:
                out["dirty_rate"] = float(ram.get("dirty-pages-rate") or 0) * int(ram.get("page-size") or PAGE)
            exp = (live or {}).get("expected-downtime")
            if exp is not None and syncs > 1:
                out["expected_downtime"] = float(exp) / 1000
            mbps = float(ram.get("mbps") or 0)
            if mbps > 0 and self.rate_is_meaningful(now):
                out["eta"] = left * 8 / (mbps * 1e6)
            return out
        if st.rounds:
            out["dirty_rate"] = st.rounds[-1].dirty_rate * PAGE
        if st.phase in ("round", "stop-and-copy") and st.round_pages:
            if self._round is None or self._round[0] != st.current_round:
                self._round = (st.current_round, sent)
            done = st.round_pages - st.remaining
            out["percent"] = 100.0 * done / st.round_pages
            per_page = (sent - self._round[1]) / done if done > 0 else PAGE
            out["remaining"] = int(st.remaining * PAGE)
            if rate and self.rate_is_meaningful(now):
                out["eta"] = st.remaining * per_page / rate
        return out
