"""Live progress of a migration, as `palm migrate` (and any command that drives
migrations) shows it on stderr.

On a terminal, one line drawn by rich's Live display: rich measures the
terminal at every refresh, so the line is cut to fit it and redrawn in place
(cursor up, erase line) instead of scrolling; it is removed at the end, when
the summary follows.  Not a terminal (a pipe, a log file): a plain line at
most once a second.  ``--json``: nothing.  rich rather than tqdm: our line
has several figures whose totals change every round (tqdm draws one bar for
one iterable of known length), and rich redraws any renderable in place.

The figures come from the agent (palm_net.agent.progress): only those that
exist at that moment are shown (the dirty rate and the expected downtime
after round 0, when the first dirty set is measured).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from palm_net.units import format_bytes, format_duration, format_rate

BAR_MAX = 24
BAR_MIN = 6


def _phase(v: dict[str, Any]) -> str:
    phase = str(v.get("phase") or "setup")
    if phase in ("round", "stream", "active"):
        return f"round {v.get('round', 0)}"
    return {"verify": "verifying", "commit": "committing", "setup": "connecting",
            "digest-check": "checking memory at the pause"}.get(phase, phase)


def _eta(seconds: float) -> str:
    if seconds < 1:
        return "<1 s left"
    if seconds < 3600:
        return f"{int(seconds) // 60}:{int(seconds) % 60:02d} left"
    return f"{format_duration(seconds)} left"


def segments(v: dict[str, Any]) -> list[tuple[int, str]]:
    """(priority, text) of what the line shows, in display order; lower priority goes first
    when the terminal is too narrow.  Only figures that exist."""
    out: list[tuple[int, str]] = [(9, _phase(v))]
    if v.get("percent") is not None:
        out.append((9, f"{v['percent']:3.0f}%"))
    out.append((8, f"{format_bytes(v.get('sent') or 0)} sent"))
    if v.get("rate") is not None:
        out.append((7, format_rate(v["rate"])))
    if v.get("dirty_rate") is not None:
        out.append((5, f"dirty {format_rate(v['dirty_rate'])}"))
    if v.get("expected_downtime") is not None:
        out.append((6, f"downtime ~{format_duration(v['expected_downtime'])}"))
    if v.get("eta") is not None:
        out.append((4, _eta(v["eta"])))
    return out


def line(v: dict[str, Any], width: int, bar: bool = True) -> str:
    """The progress line for a terminal ``width`` columns wide (never wider)."""
    segs = segments(v)
    while True:
        text = "  ".join(t for _, t in segs)
        if len(text) <= width - 1 or len(segs) <= 1:
            break
        lowest = min(p for p, _ in segs)
        idx = max(i for i, (p, _) in enumerate(segs) if p == lowest)
        del segs[idx]
    room = width - 1 - len(text) - 2
    pct = v.get("percent")
    if bar and pct is not None and room >= BAR_MIN:
        n = min(BAR_MAX, room)
        full = int(n * min(100.0, max(0.0, pct)) / 100)
        drawn = "━" * full + "╸" * (full < n) + "─" * max(0, n - full - 1)
        texts = [t for _, t in segs]
        texts.insert(2, drawn)  # after the phase and the percentage
        text = "  ".join(texts)
    return text[: max(1, width - 1)]


class ProgressView:
    """Draws the events of one command: ``live`` on a terminal, ``plain`` lines, or ``off``."""

    def __init__(self, mode: str, out: TextIO | None = None, label: str = "") -> None:
        self.mode = mode
        self.out = out or sys.stderr
        self.label = label
        self._live: Any = None
        self._console: Any = None
        self._last_plain = 0.0
        self._pending_note: str | None = None
        self.migration_id: str | None = None
        self.to_name = ""  # the destination agent's name, when --to named it (or placed it: auto)

    @classmethod
    def for_command(cls, as_json: bool, label: str = "") -> ProgressView:
        if as_json:
            return cls("off", label=label)
        return cls("live" if sys.stderr.isatty() else "plain", label=label)

    def started(self, ev: dict[str, Any]) -> None:
        self.migration_id = ev.get("migration_id")
        to = f"{self.to_name} ({ev.get('to')})" if self.to_name else ev.get("to")
        note = f"migration {(self.migration_id or '')[:8]}: {ev.get('vm')} to {to}"  # 80 columns: the short id
        if self.mode == "live":
            self.note(note + " (Ctrl-C cancels)")
        elif self.mode == "plain":  # with the first progress line, a second in (a quick refusal stays one line)
            self._pending_note = note
            self._last_plain = time.monotonic()

    def note(self, text: str) -> None:
        """A line above the live display (it stays)."""
        if self.mode == "off":
            return
        if self.mode == "live":
            self._terminal().print(text, markup=False, highlight=False)  # wrapped at words, above the line
        else:
            self.out.write(f"palm: {text}\n" if self.mode == "plain" else text + "\n")
            self.out.flush()

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("event") == "started":
            self.started(ev)
            return
        v = ev.get("view")
        if v is None or self.mode == "off":
            return
        if self.mode == "plain":
            now = time.monotonic()
            if now - self._last_plain >= 1.0:
                self._last_plain = now
                if self._pending_note:
                    self.note(self._pending_note)
                    self._pending_note = None
                self.out.write(f"palm: {self.label}{', '.join(t.strip() for _, t in segments(v))}\n")
                self.out.flush()
            return
        from rich.text import Text

        if self._live is None:
            from rich.live import Live

            self._live = Live(console=self._terminal(), auto_refresh=False, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        width = self._terminal().size.width
        self._live.update(Text(line(v, width), no_wrap=True, overflow="crop"), refresh=True)

    def _terminal(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.out, highlight=False)
        return self._console

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
