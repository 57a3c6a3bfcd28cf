"""What the `palm` command prints: one-line errors, tables, summaries, live progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from palm_net.units import format_bytes

EXIT_FAIL = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def control_request(path: str, op: str, args: dict[str, Any],
                    on_event: Callable[[dict[str, Any]], None] | None = None, timeout: float = 3600) -> Any:
    """The agent's control API (palm_net.agent.client), its refusals as CliError."""
    from palm_net.agent.client import ControlError
    from palm_net.agent.client import control_request as request

    try:
        return request(path, op, args, on_event, timeout)
    except ControlError as exc:
        raise CliError(str(exc)) from None


# --------------------------------------------------------------------------
# output


def emit(obj: Any, as_json: bool, text: Callable[[], str]) -> None:
    print(json.dumps(obj, indent=None if not sys.stdout.isatty() else 2) if as_json else text())


def safe(text: object) -> str:
    """Text for a terminal: anything that is not printable (escape sequences, newlines,
    bidi overrides: from a peer, or a VM's config) shown as an escape, never obeyed."""
    s = str(text)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


def _fmt_table(rows: list[list[str]]) -> str:
    rows = [[safe(c) for c in r] for r in rows]
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def migrate_summary(r: dict[str, Any]) -> str:
    lines = []
    if r["ok"]:
        lines.append(f"migrated {r['vm']} to {r['peer']}: {r['status']} (migration {r['migration_id']})")
    else:
        lines.append(f"migration of {r['vm']} {r['status']}: {r['error']} (phase {r['phase']}; "
                     f"VM runs on: {r['runs_on']})")
    expected = f" (expected {r['expected_downtime_ms']} ms)" if r["expected_downtime_ms"] is not None else ""
    lines.append(f"  total {r['total_ms']} ms, downtime {r['downtime_ms']} ms{expected}, setup {r['setup_ms']} ms")
    lines.append(f"  rounds {r['rounds']}, on the wire {format_bytes(r['bytes'])}, pages: {r['normal_pages']} normal,"
                 f" {r['zero_pages']} zero, {r['protected_pages']} protected (ciphertext)")
    hv = r.get("hypervisor")
    if hv:
        lines.append(f"  QEMU's own figures: {hv['rounds']} dirty syncs, downtime {hv['downtime_ms']} ms as QEMU "
                     f"counts it (ours runs to DONE), stream {format_bytes(hv['stream_bytes'])} in "
                     f"{hv['total_ms']} ms")
    for rs in r.get("round_stats", []):
        lines.append(f"    round {rs['round']}: {rs['pages']} pages, {format_bytes(rs['bytes'])} in "
                     f"{rs['duration'] * 1000:.0f} ms ({format_bytes(rs['bandwidth'])}/s), "
                     f"{rs['dirty_pages']} dirtied ({rs['dirty_rate']:.0f} pages/s)")
    if r.get("digest"):
        lines.append(f"  memory digest at pause {r['digest'][:16]}... "
                     f"{'equal on both sides' if r['digest_verified'] else 'NOT verified'}")
    return "\n".join(lines)


class Progress:
    """A one-line live display on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def __call__(self, ev: dict[str, Any]) -> None:
        if not self.enabled:
            return
        st = ev["stats"]
        last = st["rounds"][-1] if st["rounds"] else None
        rate = f"{format_bytes(last['bandwidth'])}/s" if last else "-"
        dirty = f"{last['dirty_rate']:.0f} pages/s" if last else "-"
        exp = st["expected_downtime"]
        line = (f"\r{st['phase']:<13} round {st['current_round']:<3} sent {format_bytes(st['transferred']):>10}"
                f"  remaining {st['remaining']:>8} pages  rate {rate:>12}  dirty {dirty:>14}"
                f"  expected downtime {'-' if exp is None else f'{exp * 1000:.0f} ms'}")
        sys.stderr.write(line[:160].ljust(120))
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


