"""`palm cluster ...` and the cluster flags of `palm agent` (docs/CLUSTER.md).

The cluster commands talk to etcd (``--etcd URL[,URL...]``, or
``$PALM_ETCD_ENDPOINTS``), never to an agent's control socket: an operator
runs them from anywhere etcd is reachable.  With etcd's authentication on,
``--etcd-user`` and ``--etcd-password-file`` (or ``$PALM_ETCD_USER``,
``$PALM_ETCD_PASSWORD_FILE``) name the etcd user.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from palm_net.cli.output import EXIT_FAIL, EXIT_USAGE, CliError, _fmt_table, _wrap, emit
from palm_net.units import format_bytes, parse_rate, parse_size

ETCD_ENV = "PALM_ETCD_ENDPOINTS"
ETCD_USER_ENV = "PALM_ETCD_USER"
ETCD_PASSWORD_ENV = "PALM_ETCD_PASSWORD_FILE"
SIGNER_ENV = "PALM_SIGNER"
LISTS_NOTE = ("LISTS: the etcd revision of the revocations and allowlist each agent enforces (rN; behind: "
              "a newer change is not yet enforced there)")
CONFIG_KEYS = {"etcd", "etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file", "etcd_prefix",
               "advertise", "capacity", "metrics"}


# --------------------------------------------------------------- flags


def _etcd_flags(p: argparse.ArgumentParser, required_hint: str) -> None:
    p.add_argument("--etcd", metavar="URL[,URL...]", help=f"etcd client URLs, all http:// or all https:// "
                                                          f"({required_hint})")
    p.add_argument("--etcd-ca", metavar="FILE", help="CA of the etcd members' certificates (https)")
    p.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (members with "
                                                       "--client-cert-auth)")
    p.add_argument("--etcd-key", metavar="FILE", help="its private key")
    p.add_argument("--etcd-user", metavar="NAME", help=f"etcd user, when etcd has authentication on (or "
                                                       f"${ETCD_USER_ENV}; an agent's is agent-NAME)")
    p.add_argument("--etcd-password-file", metavar="FILE", help=f"its password, one line in a file of this user "
                                                                f"with mode 0600 (or ${ETCD_PASSWORD_ENV})")
    p.add_argument("--etcd-prefix", metavar="PREFIX", help="key prefix of this cluster in etcd (default /palm/)")


def add_agent_flags(ag: argparse.ArgumentParser) -> None:
    """`palm agent`'s cluster flags; without --etcd the agent is on its own, as before."""
    _etcd_flags(ag, "joins the cluster: registers, publishes its VMs, enforces revocations; default: no cluster")
    ag.add_argument("--advertise", metavar="HOST:PORT", help="where other agents reach this one (default: "
                                                             "--listen; needed when listening on 0.0.0.0)")
    ag.add_argument("--capacity", metavar="SIZE", help="guest memory this host offers to placement (default: "
                                                       "the size of the memory directory's file system)")
    ag.add_argument("--metrics", metavar="[HOST:]PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics; a bare PORT binds 127.0.0.1 (the "
                         "endpoint is unauthenticated: name a management-network address to scrape from "
                         "elsewhere; needs prometheus_client: palm-net[metrics])")


def _etcd_config(etcd: str | None, ca: str | None, cert: str | None, key: str | None, required: bool,
                 user: str | None = None, password_file: str | None = None) -> Any:
    from palm_net.cluster.etcd import EtcdConfig, EtcdCredentials
    from palm_net.cluster.etcdwire import EtcdError

    urls = etcd or os.environ.get(ETCD_ENV)
    if not urls:
        if required:
            raise CliError(f"--etcd URL[,URL...] is required (or set {ETCD_ENV})", EXIT_USAGE)
        if user or password_file:
            raise CliError("--etcd-user and --etcd-password-file need --etcd", EXIT_USAGE)
        return None
    user = user or os.environ.get(ETCD_USER_ENV) or None
    password_file = password_file or os.environ.get(ETCD_PASSWORD_ENV) or None
    if (user is None) != (password_file is None):
        raise CliError("--etcd-user and --etcd-password-file go together", EXIT_USAGE)
    try:
        cfg = EtcdConfig.from_urls(urls, ca_file=Path(ca) if ca else None, cert_file=Path(cert) if cert else None,
                                   key_file=Path(key) if key else None)
    except EtcdError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if user is None or password_file is None:
        return cfg
    try:
        # read once, now: a bad file is refused before anything starts
        return dataclasses.replace(cfg, credentials=EtcdCredentials.from_file(user, Path(password_file)))
    except EtcdError as exc:
        raise CliError(str(exc)) from None


def agent_settings(a: argparse.Namespace, pick: Callable[..., Any]) -> dict[str, Any]:
    """AgentConfig's cluster fields from the flags (or the config file's keys)."""
    from palm_net.cluster.model import Keys

    etcd = _etcd_config(pick(a.etcd, "etcd"), pick(a.etcd_ca, "etcd_ca"), pick(a.etcd_cert, "etcd_cert"),
                        pick(a.etcd_key, "etcd_key"), required=False, user=pick(a.etcd_user, "etcd_user"),
                        password_file=pick(a.etcd_password_file, "etcd_password_file"))
    prefix = pick(a.etcd_prefix, "etcd_prefix", "/palm/")
    advertise, capacity, metrics = pick(a.advertise, "advertise"), pick(a.capacity, "capacity"), pick(a.metrics,
                                                                                                    "metrics")
    try:
        Keys(prefix)
        if advertise:
            check_listen(advertise, "--advertise")
        if metrics:
            from palm_net.cluster.metrics import parse_listen

            parse_listen(str(metrics))
        cap = parse_size(str(capacity)) if capacity else None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if etcd is None and (advertise or capacity or pick(a.etcd_prefix, "etcd_prefix")):
        raise CliError("--advertise, --capacity and --etcd-prefix need --etcd", EXIT_USAGE)
    return {"etcd": etcd, "etcd_prefix": prefix, "advertise": advertise, "capacity": cap, "metrics": metrics}


def cluster_line(c: dict[str, Any] | None) -> str:
    """`palm status`'s cluster part: etcd, the lists in force, conflicts, a drain."""
    if not c or "etcd" not in c:
        return ""
    lists = c.get("lists", {})
    line = (f"\ncluster: etcd {c['etcd']}, {'registered' if c.get('registered') else 'not registered'}, "
            f"lists of revision {lists.get('revision', 0)} ({len(lists.get('revoked', []))} revoked, "
            f"{'own allowlist' if lists.get('allowlist') is None else 'cluster allowlist'})")
    if c.get("note"):
        line += f"\n  {c['note']}"
    if lists.get("refused"):
        line += ("\n  policy documents refused (the kept ones stay in force): "
                 + ", ".join(f"{n} {why}" for why, n in lists["refused"].items()))
    if c.get("conflicts"):
        line += f"\n  VM records also claimed by another agent (not written): {', '.join(c['conflicts'])}"
    if c.get("name_taken"):
        line += f"\n  {c['name_taken']}"
    if c.get("drain"):
        d = c["drain"]
        line += f"\n  draining: {d.get('state')}, {d.get('moved', 0)} moved, {d.get('failed', 0)} failed"
    return line


# --------------------------------------------------------------- commands


def _run(a: argparse.Namespace, fn: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """Runs ``fn(etcd, keys)`` with a client; etcd's and the operation's refusals as one line."""
    import trio

    from palm_net.cluster.admin import AdminError
    from palm_net.cluster.etcd import EtcdClient
    from palm_net.cluster.etcdwire import EtcdError
    from palm_net.cluster.model import Keys, RecordError
    from palm_net.trioutil import single_error

    cfg = _etcd_config(a.etcd, a.etcd_ca, a.etcd_cert, a.etcd_key, required=True, user=a.etcd_user,
                       password_file=a.etcd_password_file)
    try:
        keys = Keys(a.etcd_prefix or "/palm/")
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None

    async def main() -> Any:
        async with EtcdClient(cfg) as etcd:
            return await fn(etcd, keys)

    try:
        with single_error():
            return trio.run(main)
    except (EtcdError, AdminError, RecordError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _by() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"[:128]
    except (OSError, KeyError):
        return "operator"


def _acks_line(what: str, acks: Any, wait: float) -> str:
    n = len(acks.seconds)
    total = n + len(acks.missing)
    if not total:
        return f"{what} (revision {acks.revision}); no agent is alive to enforce it yet"
    slowest = max(acks.seconds.items(), key=lambda kv: kv[1]) if acks.seconds else None
    line = f"{what} on {n} of {total} live agents"
    if slowest is not None:
        line += f" after {slowest[1] * 1000:.0f} ms (slowest: {slowest[0]})"
    if acks.missing:
        line += f"; NOT acknowledged within {wait:g} s by {', '.join(acks.missing)} (cut off from etcd?)"
    if acks.gone:
        line += f"; left the cluster meanwhile: {', '.join(acks.gone)}"
    return line


def _acks_dict(acks: Any) -> dict[str, Any] | None:
    if acks is None:
        return None
    return {"revision": acks.revision, "acknowledged_ms": {k: round(v * 1000, 1) for k, v in acks.seconds.items()},
            "missing": acks.missing, "gone": acks.gone}


def cmd_cluster(a: argparse.Namespace) -> int:
    return int(_COMMANDS[a.cluster_cmd](a))


def _status(a: argparse.Namespace) -> int:
    from palm_net.cluster.admin import read_cluster, status_dict
    from palm_net.crypto.identity import KeyFileError, load_authority_public

    try:
        ca = load_authority_public(Path(a.ca)) if a.ca else None
    except KeyFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None

    async def go(etcd: Any, keys: Any) -> Any:
        return status_dict(await read_cluster(etcd, keys, ca))

    r = _run(a, go)
    emit(r, a.json, lambda: status_text(r, a.etcd_prefix or "/palm/"))
    return 0


def status_text(r: dict[str, Any], prefix: str) -> str:
    alive = [x for x in r["agents"] if x.get("alive")]
    lines = [f"cluster {prefix} at revision {r['revision']}: {len(alive)} agents alive, {len(r['vms'])} VMs, "
             f"{len(r['migrations'])} migrations in flight, {len(r['drains'])} draining, {len(r['revoked'])} revoked"
             + ("" if r["allowlist"] is None else f", allowlist of {len(r['allowlist'])} measurements")]
    if r["agents"]:
        lines += ["", _fmt_table([["AGENT", "ADDRESS", "HEALTH", "VMS", "FREE", "CAPACITY", "LISTS"]] + [
            [x["name"], x.get("addr", "-"), x["health"] + ("" if x.get("alive") else " (not alive)"),
             str(x.get("vms", "-")), format_bytes(x["free"]) if "free" in x else "-",
             format_bytes(x["capacity"]) if "capacity" in x else "-",
             (f"r{x['lists_revision']}" + (" behind" if x.get("lists_behind") else "")) if x.get("alive") else "-"]
            for x in r["agents"]]), _wrap(LISTS_NOTE, "")]
    if r["vms"]:
        lines += ["", _fmt_table([["VM", "RUNS ON", "STATE", "MEMORY", "POLICY", "PLACED BY"]] + [
            [v["name"], v["agent"] + ("" if v["agent_alive"] else " (agent not alive)"), v["state"],
             format_bytes(v["memory"]), v["policy"], v["migration"][:16] or "-"] for v in r["vms"]])]
    if r["migrations"]:
        lines += ["", _fmt_table([["MIGRATION", "VM", "FROM", "TO", "PHASE", "SECONDS"]] + [
            [m["migration_id"][:16], m["vm"], m["from"], m["to"], m["phase"], f"{m['seconds']:.1f}"]
            for m in r["migrations"]])]
    for d in r["drains"]:
        counts = ", ".join(f"{k} {d[k]}" for k in ("moved", "migrating", "waiting", "failed", "unplaceable", "gone")
                           if d.get(k))
        lines.append(f"draining {d['host']}: {d['state']}{' (stopped)' if d['stopped'] else ''}"
                     + (f", {counts}" if counts else ""))
    for p in r["problems"]:
        lines.append(f"not a valid record: {p}")
    return "\n".join(lines)


def _signer(a: argparse.Namespace) -> Any:
    """Who signs the policy this command writes: ``--signer DIR`` or $PALM_SIGNER."""
    from palm_net.cluster.policy import Signer
    from palm_net.crypto.identity import KeyFileError

    d = a.signer or os.environ.get(SIGNER_ENV)
    if not d:
        raise CliError(f"--signer DIR is required (or set {SIGNER_ENV}): the authority's directory (ca.key), or an "
                       "operator's (palm keygen, then palm ca issue --role operator): agents take no unsigned "
                       "policy", EXIT_USAGE)
    try:
        return Signer.load(Path(d))
    except KeyFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _doc_line(changed: Any) -> str:
    d = changed.doc
    return f"serial {d.serial}, signed by the {d.signer}, written to {changed.key}"


def _changed_dict(changed: Any) -> dict[str, Any]:
    d = changed.doc
    return {"key": changed.key, "serial": d.serial, "signer": d.signer, "acks": _acks_dict(changed.acks)}


def _revoke(a: argparse.Namespace, undo: bool) -> int:
    from palm_net.cluster.admin import revoke, unrevoke

    try:
        from palm_net.crypto.identity import validate_name

        validate_name(a.agent)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    signer = _signer(a)

    async def go(etcd: Any, keys: Any) -> Any:
        if undo:
            return await unrevoke(etcd, keys, signer, a.agent, _by(), a.wait)
        return await revoke(etcd, keys, signer, a.agent, a.reason or "", _by(), a.wait, force=a.force)

    changed = _run(a, go)
    if changed is None:
        emit({"agent": a.agent, "revoked": False, "changed": False}, a.json,
             lambda: f"agent {a.agent} was not revoked: nothing changed")
        return 0
    keys = [k.hex() for k in changed.doc.keys]
    what = (f"agent {a.agent} no longer revoked" if undo else
            f"agent {a.agent} revoked" + (f" with its static key{'s' if len(keys) > 1 else ''} "
                                          + ", ".join(k[:16] + "..." for k in keys) if keys else
                                          " by name only (no agent of that name was seen: --force)"))
    acks = changed.acks
    emit({"agent": a.agent, "revoked": not undo, "changed": True, "keys": keys, **_changed_dict(changed)}, a.json,
         lambda: f"{what} ({_doc_line(changed)})\n{_acks_line('in force', acks, a.wait)}")
    return EXIT_FAIL if acks.missing else 0


def _allowlist(a: argparse.Namespace) -> int:
    from palm_net.cluster.admin import change_allowlist, read_doc
    from palm_net.crypto.identity import KeyFileError, load_authority_public

    how = a.how
    ms = [m.lower() for m in a.measurement]
    if how in ("add", "remove", "set") and not ms:
        raise CliError(f"allowlist {how} needs at least one measurement (64 hex digits; palm measurement)",
                       EXIT_USAGE)
    if how in ("show", "clear") and ms:
        raise CliError(f"allowlist {how} takes no measurement", EXIT_USAGE)
    signer = _signer(a) if how != "show" else None
    try:
        ca = load_authority_public(Path(a.ca)) if how == "show" and a.ca else None
    except KeyFileError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    note = ""

    async def go(etcd: Any, keys: Any) -> Any:
        nonlocal note
        if how == "show":
            kv = await etcd.get(keys.allowlist)
            if kv is None:
                return None, None
            doc = read_doc(kv.value, keys, ca)
            note = f"serial {doc.serial}, signed by the {doc.signer}"
            return doc.measurements, None
        assert signer is not None  # every change is signed
        return await change_allowlist(etcd, keys, signer, how, ms, _by(), a.wait)

    al, changed = _run(a, go)
    out = {"allowlist": None if al is None else [m.hex() for m in al], "changed": changed is not None,
           **(_changed_dict(changed) if changed is not None else {})}

    def text() -> str:
        head = ("no cluster allowlist: each agent accepts its own list (--allow-measurement, or its own "
                "measurement)" if al is None else "cluster allowlist:\n" + "\n".join(f"  {m.hex()}" for m in al))
        if note:
            head += f"\n({note})"
        if changed is not None:
            head += f"\nallowlist changed ({_doc_line(changed)})\n" + _acks_line("in force", changed.acks, a.wait)
        elif how not in ("show",):
            head += "\n(unchanged: nothing written)"
        return head

    emit(out, a.json, text)
    return EXIT_FAIL if changed is not None and changed.acks.missing else 0


class DrainView:
    """Live progress of a drain: a line per VM as it changes, and on a terminal one
    line redrawn with the counts."""

    def __init__(self, host: str, live: bool, quiet: bool) -> None:
        self.host, self.live, self.quiet = host, live, quiet
        self.seen: dict[str, tuple[str, str, int]] = {}
        self.t0 = time.monotonic()
        self.drawn = False

    def __call__(self, st: Any) -> None:
        if self.quiet:
            return
        for name, v in sorted(st.vms.items()):
            key = (v.state, v.to, v.attempts)
            if self.seen.get(name) == key:
                continue
            self.seen[name] = key
            detail = {"moved": f"moved to {v.to} (total {v.total_ms:.0f} ms, downtime {v.downtime_ms:.1f} ms)",
                      "migrating": f"migrating to {v.to} (attempt {v.attempts}, {format_bytes(v.memory)})",
                      "failed": f"FAILED after {v.attempts} attempts: {v.error}",
                      "unplaceable": f"not placed: {v.error}", "gone": v.error or "gone",
                      "waiting": "waiting" + (f": {v.error}" if v.error else "")}[v.state]
            self._clear()
            print(f"  {name}: {detail}", file=sys.stderr, flush=True)
        if self.live:
            c = st.counts()
            line = (f"drain {self.host}: {c['moved']}/{len(st.vms)} moved, {c['migrating']} migrating, "
                    f"{c['waiting']} waiting, {c['failed']} failed  {time.monotonic() - self.t0:.1f} s")
            # Never wider than the terminal: a wrapped line cannot be redrawn in place (it scrolled).
            width = _columns() - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
            sys.stderr.flush()
            self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r" + " " * (_columns() - 1) + "\r")
            self.drawn = False

    def done(self) -> None:
        self._clear()


def _columns() -> int:
    return max(20, shutil.get_terminal_size().columns)


def drain_summary(st: Any, opts: Any, wrap: bool = True) -> str:
    c = st.counts()
    dests = sorted({v.to for v in st.vms.values() if v.state == "moved"})
    took = (st.finished or st.updated) - st.started
    left = c["waiting"] + c["migrating"] + c["failed"] + c["unplaceable"]
    line = (f"drain of {st.host} {st.state}: {c['moved']} of {len(st.vms)} VMs moved to {len(dests)} "
            f"{'agent' if len(dests) == 1 else 'agents'} in "
            f"{took:.1f} s, {c['failed']} failed, {c['unplaceable']} not placeable, {left} left on {st.host} "
            f"(at most {st.max_parallel} at once from {st.host}; limits {opts.max_cluster} in the cluster, "
            f"{opts.max_source} per host)")
    if wrap:
        line = _wrap(line, "").lstrip()  # at words on a terminal, never mid-word
    for name, v in sorted(st.vms.items()):
        if v.state in ("failed", "unplaceable", "waiting"):
            line += f"\n  {name}: {v.state}: {v.error}"
    return line


def _drain(a: argparse.Namespace) -> int:
    from palm_net.cluster.admin import follow_drain, request_drain, stop_drain
    from palm_net.cluster.model import DrainOptions

    signer = _signer(a)
    if a.stop:
        doc = _run(a, lambda etcd, keys: stop_drain(etcd, keys, signer, a.host, unmark=False, by=_by()))
        emit({"host": a.host, "stopped": doc is not None, "serial": doc.serial if doc else None}, a.json,
             lambda: f"drain of {a.host}: "
             + (f"no more migrations will start (those under way finish); it stays marked draining "
                f"(palm cluster undrain); serial {doc.serial}, signed by the {doc.signer}, written to "
                f"{a.etcd_prefix or '/palm/'}drain/{a.host}" if doc else "not draining, or already stopped: "
                                                                       "nothing changed"))
        return 0 if doc else EXIT_FAIL
    try:
        bw = parse_rate(a.bandwidth) if a.bandwidth else 0
        opts = DrainOptions(a.max_cluster, a.max_source, a.timeout_per_gib, a.progress_timeout, a.attempts,
                            int(bw)).check()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    view = DrainView(a.host, live=not a.json and sys.stderr.isatty(), quiet=a.json)

    async def go(etcd: Any, keys: Any) -> Any:
        req, joined, doc = await request_drain(etcd, keys, signer, a.host, opts, _by())
        if not a.json:
            where = ("" if doc is None else f"; serial {doc.serial}, signed by the {doc.signer}, written to "
                                             f"{keys.prefix}drain/{a.host}")
            print(f"{'following the drain already under way' if joined else 'draining'} {a.host} (drain {req.id}"
                  f"{where}); it is marked draining: nothing new is placed on it", file=sys.stderr, flush=True)
        if a.no_wait:
            return req, None
        return req, await follow_drain(etcd, keys, a.host, req.id, view)

    try:
        req, st = _run(a, go)
    except KeyboardInterrupt:
        view.done()
        print(f"palm: interrupted; the drain goes on (`palm cluster drain {a.host}` follows it again, --stop stops "
              "it)", file=sys.stderr)
        return 130
    view.done()
    if st is None:
        emit({"host": a.host, "drain_id": req.id, "state": "requested"}, a.json,
             lambda: f"drain {req.id} of {a.host} requested (palm cluster status shows its progress)")
        return 0
    out = {"host": a.host, "drain_id": st.id, "state": st.state, "started": st.started, "finished": st.finished,
           "seconds": round((st.finished or st.updated) - st.started, 2), "max_parallel": st.max_parallel,
           "counts": st.counts(), "vms": {k: v.__dict__ for k, v in st.vms.items()},
           "limits": {"cluster": req.options.max_cluster, "per_host": req.options.max_source},
           "summary": drain_summary(st, req.options, wrap=False).splitlines()[0]}
    emit(out, a.json, lambda: drain_summary(st, req.options))
    return 0 if st.state == "done" else EXIT_FAIL


def _undrain(a: argparse.Namespace) -> int:
    from palm_net.cluster.admin import stop_drain

    signer = _signer(a)
    doc = _run(a, lambda etcd, keys: stop_drain(etcd, keys, signer, a.host, unmark=True, by=_by()))
    emit({"host": a.host, "was_draining": doc is not None, "serial": doc.serial if doc else None}, a.json,
         lambda: f"{a.host} is no longer marked draining (serial {doc.serial}, signed by the {doc.signer}, written "
                 f"to {a.etcd_prefix or '/palm/'}drain/{a.host}; its agent starts no more drain migrations)"
         if doc else f"{a.host} was not draining: nothing changed")
    return 0


def _named_files(items: list[str] | None, flag: str, check: Callable[[str], Any]) -> dict[str, Any]:
    """``NAME=FILE`` arguments: each file read once, now (mode 0600, this user's)."""
    from palm_net.cluster.etcd import read_password_file
    from palm_net.cluster.etcdwire import EtcdError

    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"bad {flag} {item!r}: use NAME=PASSWORD_FILE", EXIT_USAGE)
        if name in out:
            raise CliError(f"{flag} {name} given twice", EXIT_USAGE)
        try:
            check(name)
        except (ValueError, EtcdError) as exc:
            raise CliError(f"{flag} {name!r}: {exc}", EXIT_USAGE) from None
        try:
            out[name] = read_password_file(Path(path))
        except EtcdError as exc:
            raise CliError(str(exc)) from None
    return out


def _etcd_roles(a: argparse.Namespace) -> int:
    from palm_net.cluster.etcd import EtcdCredentials, Password, read_password_file
    from palm_net.cluster.etcdauth import SetUp, agent_user, operator_user, set_up
    from palm_net.cluster.etcdwire import EtcdError

    what = SetUp(agents=_named_files(a.agent, "--agent", agent_user),
                 operators=_named_files(a.operator, "--operator",
                                        lambda u: (EtcdCredentials(u, Password("")), operator_user(u))),
                 enable=a.enable)
    try:
        if a.root_password_file:
            what.root_password = read_password_file(Path(a.root_password_file))
    except EtcdError as exc:
        raise CliError(str(exc)) from None
    if not (what.agents or what.operators or what.root_password or what.enable):
        raise CliError("nothing to do: give --agent, --operator, --root-password-file or --enable", EXIT_USAGE)
    changes = _run(a, lambda etcd, keys: set_up(etcd, keys, what))
    emit({"changes": changes}, a.json, lambda: "\n".join(changes) or "nothing to change: etcd already has it all")
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _status, "revoke": lambda a: _revoke(a, False), "unrevoke": lambda a: _revoke(a, True),
    "allowlist": _allowlist, "drain": _drain, "undrain": _undrain, "etcd-roles": _etcd_roles,
}


def add_commands(sub: Any, add: Callable[..., argparse.ArgumentParser], parser_class: type) -> None:
    cl = sub.add_parser("cluster", help="the cluster in etcd: status, revoke, allowlist, drain (docs/CLUSTER.md)",
                        description="Operations on the cluster, through etcd (not the agents' control sockets).")
    cl_sub = cl.add_subparsers(dest="cluster_cmd", metavar="CLUSTER_COMMAND", parser_class=parser_class)
    cl_sub.required = True

    def one(name: str, help: str) -> argparse.ArgumentParser:
        p = add(name, help, cmd_cluster, parent=cl_sub)
        _etcd_flags(p, f"or ${ETCD_ENV}")
        return p

    def signing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--signer", metavar="DIR", help=f"who signs (or ${SIGNER_ENV}): the authority's directory "
                                                       "(ca.key), or an operator's (identity.key, agent.cert of "
                                                       "`palm ca issue --role operator`, ca.pub)")

    p = one("status", "agents and their health, VMs and where they run, migrations in flight, drains")
    p.epilog = LISTS_NOTE
    p.add_argument("--ca", metavar="CA_PUB", help="check the policy documents' signatures against this ca.pub")
    for name, help in (("revoke", "refuse AGENT everywhere: every agent refuses its next handshake, and "
                                  "migrations with it end before READY"),
                       ("unrevoke", "take AGENT's revocation back")):
        p = one(name, help)
        signing(p)
        p.add_argument("agent", metavar="AGENT", help="the agent's name (its certificate's)")
        if name == "revoke":
            p.add_argument("--reason", help="why (kept with the revocation)")
            p.add_argument("--force", action="store_true", help="revoke a name no agent ever registered (by name "
                                                                "only: no key of it is known)")
        p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                       help="wait this long for every live agent to enforce it (default 10)")
    p = one("allowlist", "the cluster's measurement allowlist (it replaces each agent's own while set)")
    signing(p)
    p.add_argument("--ca", metavar="CA_PUB", help="show: check the signature against this ca.pub")
    p.add_argument("how", choices=("show", "add", "remove", "set", "clear"))
    p.add_argument("measurement", nargs="*", metavar="HEX", help="measurements (palm measurement prints one)")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for every live agent to enforce it (default 10)")
    p = one("drain", "evacuate HOST: live-migrate every VM elsewhere, with progress and a summary; HOST stays "
                     "marked draining (nothing new is placed on it) until `palm cluster undrain`")
    signing(p)
    p.add_argument("host", metavar="HOST", help="the agent to evacuate")
    p.add_argument("--max-cluster", type=int, default=5, help="drain migrations in the whole cluster at once "
                                                              "(default 5)")
    p.add_argument("--max-source", type=int, default=2, help="migrations out of HOST at once (default 2)")
    p.add_argument("--timeout-per-gib", type=float, default=150.0, metavar="SECONDS",
                   help="cancel a migration not done within this per GiB of memory, at least 60 s (default 150)")
    p.add_argument("--progress-timeout", type=float, default=150.0, metavar="SECONDS",
                   help="cancel a migration that sent nothing for this long (default 150)")
    p.add_argument("--attempts", type=int, default=3, help="tries per VM, elsewhere each time if possible "
                                                           "(default 3)")
    p.add_argument("--bandwidth", metavar="RATE", help="cap per migration, e.g. 1Gbit or 100MiB/s (default none)")
    p.add_argument("--no-wait", action="store_true", help="request the drain and return")
    p.add_argument("--stop", action="store_true", help="start no more migrations (HOST stays marked draining)")
    p = one("undrain", "HOST may receive VMs again (and a drain under way starts no more migrations)")
    signing(p)
    p.add_argument("host", metavar="HOST")
    p = one("etcd-roles", "etcd's own users and roles: each agent writes only its own keys, operators the "
                          "policy documents (docs/CLUSTER.md); run as etcd's root once authentication is on")
    p.add_argument("--agent", action="append", metavar="NAME=PASSWORD_FILE",
                   help="etcd user agent-NAME with the role agent-NAME (repeatable)")
    p.add_argument("--operator", action="append", metavar="USER=PASSWORD_FILE",
                   help="etcd user USER with the role operator (repeatable)")
    p.add_argument("--root-password-file", metavar="FILE", help="create etcd's root user (needed once, before "
                                                                 "--enable), or set its password")
    p.add_argument("--enable", action="store_true", help="then turn etcd's authentication on")


def check_listen(text: str, flag: str) -> None:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad {flag} {text!r}: use HOST:PORT")
