"""What the `palm` command prints: one-line errors, tables, summaries.

People read human units (64.0 MiB, 41.8 ms, 12.4 s); `--json` keeps the
agent's exact numbers (bytes, milliseconds).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from palm_net.units import format_bytes, format_duration, format_rate

EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def control_request(path: str, op: str, args: dict[str, Any],
                    on_event: Callable[[dict[str, Any]], None] | None = None, timeout: float = 3600) -> Any:
    """The agent's control API (palm_net.agent.client), its refusals as CliError."""
    import stat
    from pathlib import Path

    from palm_net.agent.client import ControlError
    from palm_net.agent.client import control_request as request

    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise CliError(f"no agent at {path} (is `palm agent` running? give its socket with --control or "
                       "$PALM_CONTROL)") from None
    except OSError:
        mode = stat.S_IFSOCK  # not ours to look at (permission): the request says why
    if stat.S_ISDIR(mode):
        raise CliError(f"{path} is a directory, not an agent's control socket (e.g. {path.rstrip('/')}/control.sock; "
                       "`palm agent` logs its control= path)", EXIT_USAGE)
    if not stat.S_ISSOCK(mode):
        raise CliError(f"{path} is not a socket: give the agent's control socket (--control or $PALM_CONTROL)",
                       EXIT_USAGE)
    try:
        return request(path, op, args, on_event, timeout)
    except ControlError as exc:
        raise CliError(str(exc)) from None


# --------------------------------------------------------------------------
# output


def emit(obj: Any, as_json: bool, text: Callable[[], str]) -> None:
    if as_json:
        print(json.dumps(obj, indent=None if not sys.stdout.isatty() else 2))
    else:
        out = text()
        if out:
            print(out)


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


def _ms(v: float | None) -> str:
    return "-" if v is None else format_duration(v / 1000)


def _labelled(pairs: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    """label  value, the values aligned; on a terminal a long value wraps under itself."""
    import shutil
    import textwrap

    width = max((len(k) for k, _ in pairs), default=0)
    cols = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    out = []
    for k, v in pairs:
        head = f"{indent}{k.ljust(width)}  "
        if cols and len(head) + len(v) > cols - 1 and cols - 1 - len(head) >= 30:
            out.append(textwrap.fill(v, cols - 1, initial_indent=head, subsequent_indent=" " * len(head)))
        else:
            out.append(head + v)
    return out


# --------------------------------------------------------------------------
# a migration's result


def migrate_failure(r: dict[str, Any]) -> str:
    """The one line that matters when a migration did not complete: what, why, where the VM runs."""
    where = r.get("runs_on") or "unknown"
    return f"migration of {r['vm']} {r['status']}: {r.get('error') or 'no reason given'} (VM runs on: {where})"


def migrate_summary(r: dict[str, Any]) -> str:
    """What a migration did.  On success the downtime first (and, with the digest check,
    without it); on failure only the figures that exist (the reason is migrate_failure)."""
    if not r["ok"]:
        return _failure_figures(r)
    lines = [f"migrated {safe(r['vm'])} to {safe(r['peer'])} in {_ms(r['total_ms'])} "
             f"(migration {r['migration_id']})"]
    pairs: list[tuple[str, str]] = []
    limit = r.get("downtime_limit_ms")
    exp = r.get("expected_downtime_ms")
    ctx = ", ".join(x for x in (f"limit {_ms(limit)}" if limit is not None else "",
                                f"expected {_ms(exp)}" if exp is not None else "") if x)
    wait = r.get("ready_wait_ms")
    if r.get("digest") and wait is not None and r.get("downtime_ms") is not None:
        pairs.append(("downtime", f"{_ms(r['downtime_ms'])}  with the memory digest check (--verify-digest)"))
        pairs.append(("without the check", f"{_ms(max(0.0, r['downtime_ms'] - wait))}  (downtime less the "
                                           f"{_ms(wait)} from COMPLETE to READY; {ctx})"))
    else:
        pairs.append(("downtime", f"{_ms(r.get('downtime_ms'))}  ({ctx})" if ctx else _ms(r.get("downtime_ms"))))
        if wait is not None:
            pairs.append(("  of which", f"{_ms(wait)} the destination's checks (COMPLETE to READY)"))
    phases = r.get("downtime_phases_ms")
    if phases:  # one line: where the pause went, as the source saw it
        pairs.append(("  by phase", ", ".join(f"{k} {_ms(v)}" for k, v in phases.items())))
    dest = r.get("destination_phases_ms")
    if dest:  # the destination's own account of its part (READY's and DONE's timings)
        pairs.append(("  destination", ", ".join(f"{k} {_ms(v)}" for k, v in dest.items())))
    pairs.append(("setup", _ms(r.get("setup_ms"))))
    hv = r.get("hypervisor")
    if hv:
        pairs.append(("sent", f"{format_bytes(r['bytes'])} (QEMU's stream {format_bytes(hv['stream_bytes'])}, "
                              f"{hv['rounds']} dirty syncs)"))
        pairs.append(("QEMU's downtime", f"{_ms(hv['downtime_ms'])} as QEMU counts it (ours runs until the "
                                         "destination runs)"))
        pairs.append(("pages", f"{hv['normal_pages']} normal, {hv['duplicate_pages']} zero"))
    else:
        n = r.get("channels") or 1
        on = f" on {n} channels (this session and {n - 1} data sessions)" if n > 1 else ""
        pairs.append(("sent", f"{format_bytes(r['bytes'])} in {r['rounds']} rounds (the last one paused){on}"))
        prot = f", {r['protected_pages']} protected (as ciphertext)" if r["protected_pages"] else ""
        pairs.append(("pages", f"{r['normal_pages']} normal, {r['zero_pages']} zero{prot}"))
    if r.get("postcopy_pages") is not None:
        pairs.append(("post-copy", f"{r['postcopy_pages']} pages followed the switch ({r.get('fetched_pages', 0)} "
                                   f"asked for by a vCPU), served in {_ms(r.get('serve_ms'))}; every one "
                                   "verified as it arrived"))
    if r.get("throttle", 1.0) < 1.0:
        pairs.append(("guest throttled", f"to {r['throttle'] * 100:.0f}% of its CPU time"))
    if r.get("digest"):
        excl = (hv or {}).get("digest_excluded") or []
        cover = f"; kvmclock areas left out: {', '.join(excl)}" if excl else ""
        both = "the destination's, of what the migration wrote" if r.get("postcopy_pages") is not None \
            else "equal on both sides"
        pairs.append(("memory digest", f"{r['digest'][:16]}... {both}{cover}"))
        if r.get("digest_at_pause") and r.get("postcopy_pages") is not None:
            pairs.append(("  at the switch", f"{r['digest_at_pause']}: what the migration wrote there, to this "
                                             f"copy's memory at the switch ({_ms(r.get('digest_check_ms'))}, "
                                             "after PULLED)"))
        elif r.get("digest_at_pause"):
            pairs.append(("  at the pause", f"{r['digest_at_pause']} to this copy's memory, read afresh "
                                            f"after DONE ({_ms(r.get('digest_check_ms'))}, in the total, not in "
                                            "the downtime)"))
    lines += _labelled(pairs)
    rs = r.get("round_stats") or []
    if rs:
        lines.append("  rounds:")
        rows = [["", "ROUND", "PAGES", "SENT", "TIME", "RATE", "DIRTIED", "DIRTY RATE"]]
        for x in rs:
            paused = x.get("paused")
            rows.append(["", f"{x['round']}{' paused' if paused else ''}", str(x["pages"]),
                         format_bytes(x["bytes"]), format_duration(x["duration_ms"] / 1000),
                         format_rate(x["bandwidth"]), "-" if paused else str(x["dirty_pages"]),
                         "-" if paused else format_rate(x["dirty_rate"] * 4096)])
        lines += ["  " + ln for ln in _fmt_table(rows).splitlines()]
    warning = downtime_warning(r)
    if warning:
        lines.append(_wrap(f"WARNING: {warning}", "  "))
    return "\n".join(lines)


def _wrap(text: str, indent: str) -> str:
    """Long prose wrapped at words for a terminal (as it is, for a file or a pipe)."""
    import shutil
    import textwrap

    if not sys.stdout.isatty():
        return indent + text
    width = max(40, min(100, shutil.get_terminal_size().columns))
    return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "  ")


def downtime_warning(r: dict[str, Any]) -> str | None:
    """Said whenever a completed migration's downtime was above its limit, and why."""
    if not r.get("ok") or not r.get("downtime_exceeded"):
        return None
    why = {"max-rounds": "it stopped iterating at --max-rounds", "max-factor": "it stopped iterating at "
           "--max-factor (volume sent)", "max-throttle": "the guest was throttled as far as it goes"}
    reason = why.get(str(r.get("stop_reason")), "")
    if r.get("digest") and not r.get("digest_at_pause") and r.get("stop_reason") in (None, "converged"):
        reason = "the memory digest check runs inside the pause"
    elif not reason and r.get("stop_reason") == "converged":
        wait = r.get("ready_wait_ms")
        checks = f" and the destination's checks before READY took {_ms(wait)}" if wait is not None else ""
        reason = f"the last pages were expected to take {_ms(r.get('expected_downtime_ms'))}{checks}"
    policy = " and paused anyway (--downtime-policy pause; abort, continue or throttle choose otherwise)" \
        if r.get("stop_reason") in ("max-rounds", "max-factor", "max-throttle") else ""
    return (f"downtime {_ms(r.get('downtime_ms'))} was above the {_ms(r.get('downtime_limit_ms'))} limit: "
            f"{reason or 'see the rounds'}{policy}")


def _failure_figures(r: dict[str, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    if r.get("phase"):
        pairs.append(("failed in", str(r["phase"])))
    if r.get("total_ms"):
        pairs.append(("after", _ms(r["total_ms"])))
    if r.get("bytes"):
        rounds = len([x for x in r.get("round_stats") or [] if not x.get("paused")])
        done = f" in {rounds} complete round{'s' if rounds > 1 else ''}" if rounds else ""
        pairs.append(("sent", format_bytes(r["bytes"]) + done))
    if r.get("migration_id"):
        pairs.append(("migration", r["migration_id"]))
    return "\n".join(_labelled(pairs))


# --------------------------------------------------------------------------
# VMs, migrations, status


def vm_text(r: dict[str, Any]) -> str:
    pairs = [("backend", r["backend"]), ("state", r["state"]), ("memory", format_bytes(r["memory"])),
             ("vCPUs", str(r["vcpus"])), ("policy", r["policy"]), ("id", r["vm_id"])]
    if r["backend"] == "qemu":
        pairs += [("QEMU", f"pid {r.get('pid')}, {r.get('accel')}, status {r.get('qemu_status')}"),
                  ("QEMU arguments", " ".join(r.get("qemu_args") or []) or "none")]
    else:
        pairs += [("protected", f"{r['protected_processes']} processes owning {r['protected_pages']} pages "
                                f"({format_bytes(r['protected_pages'] * 4096)})"),
                  ("workload", f"{r.get('workload')} ({r.get('writes', 0)} writes so far)"),
                  ("resident", "yes: all guest memory is populated" if r.get("resident") else
                   "not yet: guest memory is being populated in the background")]
    return safe(r["name"]) + "\n" + "\n".join(_labelled([(k, safe(v)) for k, v in pairs]))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    fmt = "%H:%M:%S" if time.time() - ts < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def _terminal_width() -> int | None:
    """The terminal's columns when stdout is one (None for a pipe or a file: nothing is cut)."""
    import shutil

    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _fit_table(table: list[list[str]], width: int | None, shrink: tuple[int, ...]) -> list[list[str]]:
    """The table with the ``shrink`` columns' long cells cut (ending in "~") until each row
    fits in ``width - 1`` columns; as it is without a width."""
    if width is None:
        return table
    rows = [[safe(c) for c in r] for r in table]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    over = sum(widths) + 2 * (len(widths) - 1) - (width - 1)
    while over > 0:
        col = max(shrink, key=lambda i: widths[i])
        if widths[col] <= 6:
            break
        widths[col] -= 1
        over -= 1
    return [[c if i not in shrink or len(c) <= widths[i] else c[: widths[i] - 1] + "~" for i, c in enumerate(r)]
            for r in rows]


def _under(text: str, width: int | None, indent: str = "    ") -> list[str]:
    """A line under a table's row, wrapped to the terminal (as it is for a file or a pipe)."""
    import textwrap

    if width is None:
        return [indent + text]
    return textwrap.wrap(text, max(30, width - 1), initial_indent=indent, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)


def migrations_text(rows: list[dict[str, Any]], width: int | None = -1) -> str:
    """`palm migrations`: on a terminal every line fits its width (long VM and peer names cut,
    the errors under their rows wrapped); for a pipe or a file, nothing is cut."""
    if not rows:
        return "no migrations"
    if width == -1:
        width = _terminal_width()
    flying = any(m["in_flight"] for m in rows)
    table = [["ID", "DIR", "VM", "PEER", "STATE", "STARTED", "TIME", "DOWN", "SENT"]
             + (["LEFT"] if flying else [])]
    for m in rows:
        left = m.get("remaining_pages")
        table.append([m["migration_id"][:8], "out" if m["role"] == "source" else "in", m["vm"], m["peer"],
                      m["state"] + (" *" if m["in_flight"] else ""), _when(m.get("started")),
                      _ms(m.get("elapsed_ms")), _ms(m.get("downtime_ms")),
                      format_bytes(m["bytes"]) if m.get("bytes") else "-"]
                     + ([format_bytes(left * 4096) if m["in_flight"] and left else "-"] if flying else []))
    out = _fmt_table(_fit_table(table, width, (2, 3)))
    lines = out.splitlines()
    # Each error in full, under its row.
    result = [lines[0]]
    for line, m in zip(lines[1:], rows):
        result.append(line)
        if m.get("error"):
            result += _under(safe(m["error"]), width)
        if m.get("not_running"):  # this agent's by the row, but not running: said under its row, loudly
            result += _under(f"NOT RUNNING (retried; palm vm resume {safe(m['vm'])}): {safe(m['not_running'])}",
                             width)
    note = ("DIR: out (this agent is the source) or in; TIME: elapsed; IDs shortened (--json has them whole; "
            "--cancel takes a prefix or a VM name)" + ("; * in flight" if flying else ""))
    result += _under(note, width, "")
    return "\n".join(result)


def status_text(r: dict[str, Any]) -> str:
    counters = r.get("counters") or {}
    refused = {k: v for k, v in counters.items() if k != "handshakes" and v}
    pairs = [("listening on", f"port {r['listen_port']}"), ("VMs", str(r["vms"])),
             ("incoming now", str(r["incoming"])), ("connections", str(r.get("connections", 0))),
             ("accepting", "yes" if r.get("accepting") else "no (shutting down)"),
             ("handshakes", str(counters.get("handshakes", 0)) + (
                 f"; refused: {', '.join(f'{k} {v}' for k, v in sorted(refused.items()))}" if refused else "")),
             ("measurement", r["measurement"])]
    return f"agent {safe(r['agent'])}\n" + "\n".join(_labelled([(k, safe(v)) for k, v in pairs]))
