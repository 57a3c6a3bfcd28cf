"""The `palm` command: what an operator runs.

Every error an operator can cause is one line on stderr and a non-zero exit
(1 for a refused or failed operation, 2 for bad usage); never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from palm_net.agent.client import CANCELLED
from palm_net.cli.cluster import CONFIG_KEYS as CLUSTER_CONFIG_KEYS
from palm_net.cli.cluster import add_agent_flags, add_commands, agent_settings, cluster_line
from palm_net.cli.output import (
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
    _fmt_table,
    control_request,
    downtime_warning,
    emit,
    migrate_failure,
    migrate_summary,
    migrations_text,
    safe,
    status_text,
    vm_text,
)
from palm_net.cli.progress import ProgressView
from palm_net.migration.params import DOWNTIME_POLICIES, MigrationParams
from palm_net.units import exact_size, format_bytes, has_unit, parse_memory, parse_rate

CONTROL_ENV = "PALM_CONTROL"

__all__ = ["CliError", "_fmt_table", "build_parser", "control_request", "main", "migrate_summary", "safe"]


# --------------------------------------------------------------------------
# commands


def cmd_keygen(a: argparse.Namespace) -> int:
    from palm_net.agent.paths import default_state_dir
    from palm_net.crypto.identity import IDENTITY_FILE, AgentIdentity

    d = Path(a.dir) if a.dir else default_state_dir()
    if (d / IDENTITY_FILE).exists() and not a.force:
        raise CliError(f"{d / IDENTITY_FILE} exists (use --force to replace the identity)")
    try:
        ident = AgentIdentity.generate(a.name)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    path = ident.save(d)
    emit({**ident.public_description(), "path": str(path)}, a.json,
         lambda: f"identity {ident.name} written to {path}\n  static (X25519) {ident.static.public.hex()}\n"
                 f"  signing (Ed25519) {ident.sign_pub.hex()}")
    return 0


def cmd_ca(a: argparse.Namespace) -> int:
    from palm_net.agent.agent import default_measurement
    from palm_net.crypto.identity import (
        CA_KEY_FILE,
        CA_PUB_FILE,
        CERT_FILE,
        IDENTITY_FILE,
        AgentIdentity,
        Authority,
    )

    if a.ca_cmd == "init":
        d = Path(a.dir)
        if (d / CA_KEY_FILE).exists() and not a.force:
            raise CliError(f"{d / CA_KEY_FILE} exists (use --force to replace the authority)")
        ca = Authority.generate()
        ca.save(d)
        emit({"key_id": ca.key_id.hex(), "public": ca.public.hex(), "pub_file": str(d / CA_PUB_FILE)}, a.json,
             lambda: f"authority {ca.key_id.hex()} created in {d}; give agents {d / CA_PUB_FILE}")
        return 0
    ca_dir = Path(a.ca)
    if ca_dir.name in (CA_KEY_FILE, CA_PUB_FILE) and ca_dir.is_file():
        ca_dir = ca_dir.parent  # the authority's key file given: its directory is meant
    if not (ca_dir / CA_KEY_FILE).exists():
        raise CliError(f"no authority key in {ca_dir} (make one: palm ca init --dir {ca_dir}; --ca names the "
                       "directory holding ca.key)", EXIT_USAGE)
    if not (Path(a.agent) / IDENTITY_FILE).exists():
        raise CliError(f"no agent identity in {a.agent} (make one: palm keygen --dir {a.agent} --name NAME)",
                       EXIT_USAGE)
    ca = Authority.load(ca_dir)
    ident = AgentIdentity.load(Path(a.agent))
    if a.measurement:
        try:
            m = bytes.fromhex(a.measurement)
        except ValueError:
            m = b""
        if len(m) != 32:
            raise CliError("--measurement must be 64 hex digits", EXIT_USAGE)
    elif a.role and "operator" in a.role:
        m = bytes(32)  # an operator runs no agent code: nothing to measure
    else:
        m = default_measurement()
    if a.days <= 0:
        raise CliError("--days must be positive", EXIT_USAGE)
    try:
        cert = ca.issue(ident.name, ident.static.public, ident.sign_pub, m, a.role or ("source", "destination"),
                        days=a.days)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    path = Path(a.agent) / CERT_FILE
    from palm_net.hostfs import write_atomic

    write_atomic(path, cert.encode(), 0o644)
    if "operator" in cert.roles:  # `palm cluster ... --signer DIR` checks what it reads against it
        write_atomic(Path(a.agent) / CA_PUB_FILE, (ca.public.hex() + "\n").encode(), 0o644)
    emit({"name": cert.name, "measurement": m.hex(), "roles": list(cert.roles), "not_after": cert.not_after,
          "path": str(path)}, a.json,
         lambda: f"certificate for {cert.name} written to {path} (roles {', '.join(cert.roles)}, "
                 f"measurement {m.hex()[:16]}..., valid {a.days:g} days)")
    return 0


def cmd_measurement(a: argparse.Namespace) -> int:
    from palm_net.agent.agent import default_measurement

    m = default_measurement().hex()
    emit({"measurement": m}, a.json, lambda: m)
    return 0


# The agent's settings file: each key, and the type its value must have.
CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "dir": (str,), "listen": (str,), "control": (str,), "ca": (str,), "allow_measurement": (list,),
    "max_incoming": (int,), "max_incoming_memory": (str, int), "memory_dir": (str,), "run_dir": (str,),
    "images_dir": (str,),
    "allow_plain": (bool,), "handshake_timeout": (int, float), "log_format": (str,), "log_level": (str,),
    "no_qemu": (bool,), "qemu_unconfined": (bool,), "qemu_accel": (str,), "qemu_uids": (str,),
    "max_incoming_per_peer": (int,),
    "incoming_deadline_per_gib": (int, float), "max_connections": (int,), "handshake_rate": (int, float),
    "session_rate": (int, float),
    **{key: (str,) for key in CLUSTER_CONFIG_KEYS},  # etcd URLs, files, addresses, a size
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CliError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"config {path} is not valid TOML: {exc}") from None
    unknown = set(data) - set(CONFIG_KEYS)
    if unknown:
        raise CliError(f"config {path}: unknown keys {', '.join(sorted(unknown))}")
    for key, val in data.items():
        types = CONFIG_KEYS[key]
        if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise CliError(f"config {path}: {key} must be {want}, not {val!r}"[:300], EXIT_USAGE)
        if isinstance(val, list) and not all(isinstance(x, str) for x in val):
            raise CliError(f"config {path}: allow_measurement must be a list of hex strings", EXIT_USAGE)
    return data


def default_control() -> str:
    """Where `palm` looks for the agent: $PALM_CONTROL, else the control socket a `palm agent`
    started with its default state directory listens on (palm_net.agent.paths)."""
    from palm_net.agent.paths import default_control as agent_default
    from palm_net.agent.paths import default_state_dir

    return os.environ.get(CONTROL_ENV) or str(agent_default(default_state_dir()))


def _control(a: argparse.Namespace) -> str:
    return str(a.control) if a.control else default_control()


def _authority_pub(ca: str) -> Path:
    """`palm agent --ca`: the authority's public key file, or the directory holding it."""
    from palm_net.crypto.identity import CA_KEY_FILE, CA_PUB_FILE

    path = Path(ca)
    if path.is_dir():
        path = path / CA_PUB_FILE
    if path.name == CA_KEY_FILE:
        raise CliError(f"{ca} is the authority's private key: give agents {path.with_name(CA_PUB_FILE)} (or the "
                       "directory) and keep ca.key on the authority's host", EXIT_USAGE)
    return path


def cmd_agent(a: argparse.Namespace) -> int:
    import trio

    from palm_net.agent.agent import AgentConfig, run_agent
    from palm_net.agent.errors import AgentError
    from palm_net.agent.outgoing import parse_hostport
    from palm_net.agent.paths import default_state_dir

    conf = _load_config(a.config)

    def pick(flag: Any, key: str, default: Any = None) -> Any:
        return flag if flag is not None else conf.get(key, default)  # flags win over the file

    d, listen, control, ca = (pick(a.dir, "dir", str(default_state_dir())), pick(a.listen, "listen"),
                              pick(a.control, "control", os.environ.get(CONTROL_ENV)), pick(a.ca, "ca"))
    for name, val in (("--listen", listen), ("--ca", ca)):
        if not val:
            raise CliError(f"{name} is required (flag or config file)", EXIT_USAGE)
    try:
        parse_hostport(listen)
        allow = [bytes.fromhex(h) for h in (pick(a.allow_measurement, "allow_measurement", []) or [])]
        if any(len(m) != 32 for m in allow):
            raise ValueError("an allowed measurement must be 64 hex digits")
        mim = pick(a.max_incoming_memory, "max_incoming_memory", "16GiB")
        uids = str(pick(a.qemu_uids, "qemu_uids", "")) or None
        first, _, count = (uids or "").partition(":")
        if uids and not (first.isdigit() and count.isdigit() and int(count) > 0):
            raise ValueError(f"qemu_uids must be FIRST:COUNT, not {uids!r}")
        cfg = AgentConfig(
            state_dir=Path(d), listen=listen, control=Path(control) if control else None, ca_pub=_authority_pub(ca),
            allow_measurements=allow,
            max_incoming=int(pick(a.max_incoming, "max_incoming", 4)),
            max_incoming_memory=parse_memory(str(mim)),
            max_incoming_per_peer=int(pick(a.max_incoming_per_peer, "max_incoming_per_peer", 2)),
            incoming_deadline_per_gib=float(pick(a.incoming_deadline_per_gib, "incoming_deadline_per_gib", 150.0)),
            max_connections=int(pick(a.max_connections, "max_connections", 512)),
            handshake_rate=float(pick(a.handshake_rate, "handshake_rate", 10.0)),
            session_rate=float(pick(a.session_rate, "session_rate", 5.0)),
            handshake_timeout=float(pick(a.handshake_timeout, "handshake_timeout", 10.0)),
            allow_plain=bool(pick(a.allow_plain or None, "allow_plain", False)),
            memory_dir=Path(pick(a.memory_dir, "memory_dir")) if pick(a.memory_dir, "memory_dir") else None,
            adopt_vms=bool(a.adopt_vms),
            qemu_unconfined=bool(pick(a.qemu_unconfined or None, "qemu_unconfined", False)),
            images_dir=Path(pick(a.images_dir, "images_dir")) if pick(a.images_dir, "images_dir") else None,
            accept_qemu=not bool(pick(a.no_qemu or None, "no_qemu", False)),
            qemu_accel=pick(a.qemu_accel, "qemu_accel"),
            run_dir=Path(pick(a.run_dir, "run_dir")) if pick(a.run_dir, "run_dir") else None,
            **agent_settings(a, pick),  # the cluster: --etcd, --advertise, --capacity, --metrics
        )
        if uids:
            cfg.qemu_uids = (int(first), int(count))
        if cfg.qemu_accel not in (None, "kvm", "tcg"):
            raise ValueError(f"qemu_accel must be kvm or tcg, not {cfg.qemu_accel!r}")
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    from palm_net.trioutil import single_error

    try:
        with single_error():
            trio.run(run_agent, cfg)
    except AgentError as exc:
        raise CliError(str(exc)) from None
    return 0


def _memory_arg(flag: str, text: str, unit: int = 4096) -> str:
    """A memory size as QEMU's -m reads it (a bare number is MiB), sent exactly."""
    try:
        n = parse_memory(text)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}", EXIT_USAGE) from None
    if n < unit or n % unit:
        what = "4 KiB" if unit == 4096 else format_bytes(unit).replace(".0 ", " ")
        raise CliError(f"{flag} {text}: must be a positive multiple of {what}", EXIT_USAGE)
    return exact_size(n)


def _workload_arg(spec: str) -> str:
    """A workload that parses; hotset:SIZE needs a unit (a bare number is not obviously MiB there)."""
    from palm_net.hypervisor.vmspec import check_workload

    for item in spec.split("+"):
        f = item.strip().split(":")
        if f[0] == "hotset" and len(f) == 3:
            try:
                if not has_unit(f[1]):
                    raise CliError(f"--workload {item}: give the hot set's size a unit, e.g. hotset:64M:{f[2]}",
                                   EXIT_USAGE)
            except ValueError as exc:
                raise CliError(f"--workload {item}: {exc}", EXIT_USAGE) from None
    try:
        check_workload(spec)
    except ValueError as exc:
        raise CliError(f"--workload: {exc}", EXIT_USAGE) from None
    return spec


def cmd_vm(a: argparse.Namespace) -> int:
    op = a.vm_cmd
    control = _control(a)
    if op == "create":
        from palm_net.crypto.identity import validate_name

        try:
            validate_name(a.name)
        except ValueError as exc:
            raise CliError(str(exc).replace("invalid name", "invalid VM name", 1), EXIT_USAGE) from None
        memory = _memory_arg("--memory", a.memory, 1 << 20 if a.backend == "qemu" else 4096)
        pm = _memory_arg("--protected-memory", a.protected_memory) if a.protected_memory else None
        if a.backend == "qemu":
            if a.protected or a.protected_memory:
                raise CliError("QEMU VMs have no protected processes (--protected is the model's)", EXIT_USAGE)
            model_only = (("--workload", a.workload), ("--seed", a.seed), ("--fill", a.fill))
            given = [f for f, v in model_only if v is not None]
            if given:
                raise CliError(f"{', '.join(given)}: the embedded model's; a QEMU guest runs its own code from its "
                               "own memory", EXIT_USAGE)
        if a.qemu_arg and a.backend != "qemu":
            raise CliError("--qemu-arg needs --backend qemu", EXIT_USAGE)
        if a.vcpus != 1 and a.backend != "qemu":
            raise CliError("--vcpus is for QEMU VMs (--backend qemu)", EXIT_USAGE)
        args: dict[str, Any] = {"name": a.name, "memory": memory, "protected": a.protected,
                                "protected_memory": pm, "workload": _workload_arg(a.workload or "idle"),
                                "seed": a.seed or 0, "policy": a.policy, "fill": a.fill or "half",
                                "backend": a.backend, "qemu_args": a.qemu_arg or [], "vcpus": a.vcpus}
        if a.no_postcopy:
            args["postcopy"] = False
        r = control_request(control, "vm.create", args)
        if r["backend"] == "qemu":
            emit(r, a.json, lambda: f"VM {r['name']} created: QEMU ({r['accel']}, pid {r['pid']}), "
                                    f"{format_bytes(r['memory'])}, {r['vcpus']} vCPU")
        else:
            emit(r, a.json, lambda: f"VM {r['name']} created: {format_bytes(r['memory'])}, "
                                    f"{r['protected_processes']} protected processes ({r['protected_pages']} pages), "
                                    f"workload {r['workload']}")
        return 0
    if op == "list":
        r = control_request(control, "vm.list", {})
        emit(r, a.json, lambda: _fmt_table(
            [["NAME", "BACKEND", "STATE", "MEMORY", "PROTECTED", "WORKLOAD"]]
            + [[v["name"], v["backend"], v["state"], format_bytes(v["memory"]),
                format_bytes(v["protected_pages"] * 4096) if v["protected_pages"] else "-",
                v["workload"]] for v in r]) if r else "no VMs")
        return 0
    req: dict[str, Any] = {"name": a.name}
    if op == "digest" and a.range:
        addr, sep, size = a.range.partition(":")
        try:
            if sep and not has_unit(size):
                raise CliError(f"--range {a.range}: give the size a unit, e.g. {addr}:8M", EXIT_USAGE)
        except ValueError as exc:
            raise CliError(f"--range {a.range}: {exc}", EXIT_USAGE) from None
        req["range"] = a.range
    r = control_request(control, f"vm.{op}", req)
    if op == "digest":
        emit(r, a.json, lambda: f"{r['digest']}  {r['name']}")
    elif op == "verify":
        emit(r, a.json, lambda: f"{r['name']}: {'OK' if r['ok'] else 'FAILED'}, {r['checked']} protected pages "
                                f"verified, {r['in_process_view']} held in the process view"
                                + "".join(f"\n  {f}" for f in r["failures"]))
        return 0 if r["ok"] else EXIT_FAIL
    elif op == "destroy":
        emit(r, a.json, lambda: f"VM {a.name} destroyed")
    elif op in ("pause", "resume"):
        emit(r, a.json, lambda: f"VM {r['name']} {r['state']}")
    else:
        emit(r, a.json, lambda: vm_text(r))
    return 0


def _find_migration(control: str, what: str, in_flight: bool) -> str:
    """A migration id from a whole id, a unique prefix of one, or a VM's name."""
    rows = [m for m in control_request(control, "migrations", {}) if m["role"] == "source"]
    if in_flight:
        rows = [m for m in rows if m["in_flight"]]
    else:
        rows = [m for m in rows if m["state"] == "handed_off"]
    hits = [m for m in rows if m["migration_id"] == what] or \
        [m for m in rows if m["migration_id"].startswith(what.lower())] or [m for m in rows if m["vm"] == what]
    kind = "in flight" if in_flight else "in doubt"
    if not hits:
        raise CliError(f"no migration {kind} matches {what!r} (palm migrations lists them)")
    if len(hits) > 1:
        ids = ", ".join(f"{m['migration_id'][:12]} ({m['vm']})" for m in hits)
        raise CliError(f"{what!r} matches {len(hits)} migrations {kind}: {ids}; give more of the id")
    return str(hits[0]["migration_id"])


def _find_abandonable(control: str, what: str) -> str:
    """The id of the post-copy migration (serving here as its source, or pulling here as its
    destination) that ``what`` names: an id, a unique prefix, or a VM's name.  An id of a
    migration in any other state is passed on too: the agent says why it is refused."""
    rows = control_request(control, "migrations", {})
    live = [m for m in rows if (m["role"], m["state"]) in (("source", "serving"), ("destination", "pulling"))]
    for pool in (live, rows):
        hits = [m for m in pool if m["migration_id"] == what] or \
            [m for m in pool if m["migration_id"].startswith(what.lower())] or \
            ([m for m in pool if m["vm"] == what] if pool is live else [])
        if len(hits) > 1:
            ids = ", ".join(f"{m['migration_id'][:12]} ({m['vm']}, {m['state']})" for m in hits)
            raise CliError(f"{what!r} matches {len(hits)} migrations: {ids}; give more of the id")
        if hits:
            return str(hits[0]["migration_id"])
    raise CliError(f"no post-copy migration serving or pulling here matches {what!r} (palm migrations lists them)")


def _abandon(control: str, a: argparse.Namespace) -> int:
    """`palm migrate --resolve ID --abandon --reason WHY` (palm_net.agent.abandon): loud, and only
    for a post-copy migration past its switch whose other host is lost."""
    if a.override:
        raise CliError("--abandon and --override exclude each other: --override resumes an in-doubt VM here, "
                       "--abandon declares a post-copy VM lost", EXIT_USAGE)
    if not (a.reason or "").strip():
        raise CliError("--abandon needs --reason: why the VM may be lost (it is logged and recorded)", EXIT_USAGE)
    mid = _find_abandonable(control, a.resolve)
    r = control_request(control, "migrate.abandon", {"id": mid, "reason": a.reason})
    if r["status"] == "abandoned" and not a.json:
        print(f"palm: ABANDONED migration {mid}: {safe(r['lost'])}", file=sys.stderr)
    emit(r, a.json, lambda: f"migration {mid}: {r['status']}" + (f" ({safe(r['lost'])})"
                                                               if r["status"] != "abandoned" else ""))
    return 0


def cmd_migrate(a: argparse.Namespace) -> int:
    control = _control(a)
    if a.override and not a.resolve:
        raise CliError("--override goes with --resolve ID", EXIT_USAGE)
    if a.abandon and not a.resolve:
        raise CliError("--abandon goes with --resolve ID", EXIT_USAGE)
    if a.abandon:
        return _abandon(control, a)
    if a.cancel:
        mid = _find_migration(control, a.cancel, True)
        r = control_request(control, "migrate.cancel", {"id": mid})
        emit({**r, "migration_id": mid}, a.json, lambda: f"migration {mid[:8]} {CANCELLED} ({r['status']})")
        return 0
    if a.resolve:
        mid = _find_migration(control, a.resolve, False)
        r = control_request(control, "migrate.resolve", {"id": mid, "override": a.override,
                                                         "reason": a.reason or ""})
        emit({**r, "migration_id": mid}, a.json, lambda: f"migration {mid}: {r['status']}")
        return 0
    if not a.name or not a.to:
        raise CliError("migrate needs NAME and --to HOST:PORT, an agent's name or auto (or --cancel / --resolve)",
                       EXIT_USAGE)
    try:
        if a.bandwidth:
            parse_rate(a.bandwidth)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    for flag, val, low, high, unit in (("--downtime-ms", a.downtime_ms, 0, 3_600_000, " ms"),
                                       ("--max-rounds", a.max_rounds, 1, 10_000, ""),
                                       ("--max-factor", a.max_factor, 1, 1000, ""),
                                       ("--reply-timeout", a.reply_timeout, 0.1, 3600, " s"),
                                       ("--channels", 1 if a.channels is None else a.channels, 1, 16, "")):
        if not (low < val if flag == "--downtime-ms" else low <= val) or val > high:
            above = "above" if flag == "--downtime-ms" else "from"
            raise CliError(f"{flag} {val:.10g}: must be {above} {low:.10g}{unit} and at most {high:.10g}{unit}",
                           EXIT_USAGE)
    to, to_name = _destination(control, a.name, a.to)
    args = {"name": a.name, "to": to, "downtime_ms": a.downtime_ms, "max_rounds": a.max_rounds,
            "max_factor": a.max_factor, "bandwidth": a.bandwidth, "cipher": a.cipher,
            "auto_converge": a.auto_converge, "plain": a.plain_benchmark, "verify_digest": a.verify_digest,
            "reply_timeout": a.reply_timeout}
    if a.downtime_policy:
        args["downtime_policy"] = a.downtime_policy
    if a.channels is not None:
        args["channels"] = a.channels
    if a.postcopy_after is not None and not a.postcopy:
        raise CliError("--postcopy-after goes with --postcopy", EXIT_USAGE)
    if a.postcopy_after is not None and not 0 <= a.postcopy_after <= 10_000:
        raise CliError(f"--postcopy-after {a.postcopy_after}: must be from 0 to 10000", EXIT_USAGE)
    if a.postcopy and (a.channels or 1) > 1:
        raise CliError("--postcopy migrates on one channel: drop --channels", EXIT_USAGE)
    if a.postcopy:
        args.update(postcopy=True, postcopy_after=a.postcopy_after, channels=1)
        print("post-copy: once the VM switches to the destination, its missing pages exist only on this "
              "host until they have all arrived: losing or rebooting this host then loses the VM", file=sys.stderr)
    view = ProgressView.for_command(a.json)
    view.to_name = to_name
    # SIGTERM (a service manager, `kill`) cancels as Ctrl-C does, and says so.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            r = control_request(control, "migrate", args, view)
        finally:
            view.close()
    except KeyboardInterrupt:
        return _interrupted(a, control, view.migration_id)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _report(a, r)


def _destination(control: str, vm: str, to: str) -> tuple[str, str]:
    """``--to``: HOST:PORT as it is; in a cluster also an agent's name (its address from its
    record in etcd, signed by it and verified by the agent against the authority) or
    ``auto`` (placed as a drain would).  Returns the address and the agent's name (or "")."""
    from palm_net.agent.outgoing import parse_hostport
    from palm_net.crypto.identity import validate_name

    try:
        parse_hostport(to)
        return to, ""
    except ValueError as exc:
        bad = CliError(f"--to: {exc} (e.g. host-b:7400; in a cluster also an agent's name, or auto)", EXIT_USAGE)
    try:
        validate_name(to)
    except ValueError:
        raise bad from None
    try:
        ipaddress.ip_address(to)
        raise bad  # an address without its port is no agent's name
    except ValueError:
        pass
    r = control_request(control, "cluster.destinations", {"vm": vm})
    if not r.get("cluster"):
        raise CliError(f"--to {to}: agent names need a cluster (this agent has no --etcd): use HOST:PORT "
                       "(e.g. host-b:7400)", EXIT_USAGE)
    agents = {x["name"]: x for x in r["agents"]}
    if to == "auto":
        if "auto" not in r:
            raise CliError(f"--to auto: no place for {vm}: {r.get('auto_error', 'no destination')}")
        return str(r["auto"]["addr"]), str(r["auto"]["name"])
    if to == r.get("self"):
        raise CliError(f"--to {to}: {vm} runs on {to}: a VM cannot migrate to the agent it runs on")
    if to not in agents:
        known = ", ".join(sorted(agents)) or "none alive"
        raise CliError(f"--to {to}: no agent of that name in the cluster (other agents: {known}; or auto, or "
                       "HOST:PORT)", EXIT_USAGE)
    return str(agents[to]["addr"]), to


def _report(a: argparse.Namespace, r: dict[str, Any]) -> int:
    if not r["ok"]:
        # The reason and where the VM runs first (one line on stderr), then the figures that exist.
        print(f"palm: {migrate_failure(r)}", file=sys.stderr, flush=True)
        emit(r, a.json, lambda: migrate_summary(r))
        return EXIT_FAIL
    emit(r, a.json, lambda: migrate_summary(r))
    warning = downtime_warning(r)
    if warning and a.json:
        print(f"palm: warning: {warning}", file=sys.stderr)
    return 0


def _interrupted(a: argparse.Namespace, control: str, mid: str | None) -> int:
    """Ctrl-C during `palm migrate`: cancel the migration (as virsh aborts its job), wait
    for its outcome and say where the VM runs.  A second Ctrl-C leaves at once (the
    agent still cancels: it sees its client go)."""
    if mid is None:
        print("palm: interrupted before the migration started", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"palm: interrupted: cancelling migration {mid[:8]} ...", file=sys.stderr, flush=True)
    try:
        try:
            control_request(control, "migrate.cancel", {"id": mid}, timeout=10)
        except CliError as exc:
            if "handoff" in str(exc):  # past the handoff point: it completes (else: already cancelled)
                print(f"palm: {exc}", file=sys.stderr)
        row: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = [m for m in control_request(control, "migrations", {}, timeout=10) if m["migration_id"] == mid]
            if rows and not rows[0]["in_flight"]:
                row = rows[0]
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("palm: interrupted again; the agent cancels the migration if it still can", file=sys.stderr)
        return EXIT_INTERRUPTED
    state = row.get("state", "unknown")
    done = state in ("done", "completed")
    where = "destination" if done else "source" if state in ("aborted", "failed", "cancelled") else "unknown"
    out = {"ok": done, "vm": a.name, "migration_id": mid, "status": "completed" if done else "cancelled",
           "error": None if done else f"{CANCELLED} (Ctrl-C)", "runs_on": where,
           "state": state}
    if a.json:
        print(json.dumps(out))
    if done:
        print(f"palm: migration {mid[:8]} was past the handoff point and completed: {a.name} runs on the "
              f"destination", file=sys.stderr)
        return 0
    print(f"palm: migration {mid[:8]} {CANCELLED}; {a.name} runs on the {where}"  # 80 columns
          if where != "unknown" else f"palm: migration {mid[:8]} {CANCELLED}; its state: {state}", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_migrations(a: argparse.Namespace) -> int:
    r = control_request(_control(a), "migrations", {})
    emit(r, a.json, lambda: migrations_text(r))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    r = control_request(_control(a), "status", {})
    emit(r, a.json, lambda: status_text(r) + cluster_line(r.get("cluster")))
    return 0


def cmd_completion(a: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode  # (where it is defined: re-exported from 3.8 only)

    print(shellcode(["palm"], shell=a.shell))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from palm_net.cli.demo import run_demo

    return run_demo(a)


# --------------------------------------------------------------------------
# parser


LOG_LEVELS = ("debug", "info", "warning", "error")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("palm-net")
    except PackageNotFoundError:
        return "(not installed)"


def _complete_vms(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Shell completion of VM names: asks the agent the command would talk to."""
    try:
        control = getattr(parsed_args, "control", None) or default_control()
        vms = control_request(control, "vm.list", {}, timeout=2)
    except Exception:  # completion must never fail loudly
        return []
    return [v["name"] for v in vms if str(v["name"]).startswith(prefix)]


class _Parser(argparse.ArgumentParser):
    argv: list[str] = []  # the command line being parsed (main sets it), for suggestions

    def error(self, message: str) -> NoReturn:
        """Bad usage is one line too, with where to look (and what was meant, for a typo)."""
        prog = self.prog
        if message.startswith("unrecognized arguments: "):
            # argparse says it from the top: the suggestions come from the command's own options
            cmd = _command_parser(self, self.argv)
            prog = cmd.prog
            options = [o for act in cmd._actions for o in act.option_strings if o.startswith("--")]
            meant = []
            for arg in message.removeprefix("unrecognized arguments: ").split():
                flag = arg.split("=", 1)[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
                    if close:
                        meant.append(close[0])
            if meant:
                message += f" (did you mean {' and '.join(meant)}?)"
        elif message.startswith("argument ") and "invalid choice: " in message:
            got = message.split("invalid choice: ", 1)[1].split(" ", 1)[0].strip("'")
            choices = [str(c) for act in self._actions if act.choices for c in act.choices]
            close = difflib.get_close_matches(got, choices, n=1, cutoff=0.6)
            if close:
                message = f"{message.split(' (choose', 1)[0]}: did you mean {close[0]}?"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see: {prog} --help)\n")


def _command_parser(top: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser the words of ``argv`` lead to: palm, palm vm, palm vm create..."""
    p = top
    for word in argv:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        nxt = subs[0].choices.get(word) if isinstance(subs[0].choices, dict) else None
        if nxt is not None:
            p = nxt
    return p


def _add(name: str, help: str, fn: Callable[[argparse.Namespace], int], json_flag: bool = True,
         control: bool = False, *, parent: Any) -> argparse.ArgumentParser:
    """A command under ``parent`` (the subparsers of palm or of a group), its help as its
    description, with the flags most commands share."""
    sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
    sp.set_defaults(fn=fn)
    if json_flag:
        sp.add_argument("--json", action="store_true", help="print one JSON object (exact numbers)")
    if control:
        sp.add_argument("--control", metavar="SOCKET",
                        help=f"the agent's control socket (default ${CONTROL_ENV}, else {default_control()})")
    return sp


def _keygen_command(sub: Any) -> None:
    k = _add("keygen", "create an agent identity (X25519 + Ed25519 keys, 0600)", cmd_keygen, parent=sub)
    k.add_argument("--dir", help="agent state directory (default: the agent's, /var/lib/palm as root)")
    k.add_argument("--name", required=True, help="agent name (letters, digits, - _ .)")
    k.add_argument("--force", action="store_true", help="replace an existing identity")


def _ca_commands(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the cluster authority: init, issue")
    ca_sub = ca.add_subparsers(dest="ca_cmd", metavar="CA_COMMAND", parser_class=_Parser)
    ca_sub.required = True
    ci = _add("init", "create a cluster authority (Ed25519) in DIR", cmd_ca, parent=ca_sub)
    ci.add_argument("--dir", required=True, help="where ca.key (private, stays here) and ca.pub (for agents) go")
    ci.add_argument("--force", action="store_true", help="replace an existing authority")
    cs = _add("issue", "issue a certificate for an agent (or an operator), written into its DIR", cmd_ca,
              parent=ca_sub)
    cs.add_argument("--ca", required=True, metavar="DIR", help="authority directory (holds ca.key; the ca.key "
                                                               "file itself is taken too)")
    cs.add_argument("--agent", required=True, metavar="DIR", help="agent state directory (has identity.key)")
    cs.add_argument("--days", type=float, default=365, help="validity in days (default 365)")
    cs.add_argument("--role", action="append", choices=("source", "destination", "operator"),
                    help="role, repeatable (default source and destination); operator (alone): the certificate "
                         "signs the cluster's policy (palm cluster revoke, allowlist, drain --signer DIR), "
                         "never an agent's")
    cs.add_argument("--measurement", metavar="HEX", help="measurement to certify (default: this installation's)")


def _agent_command(sub: Any) -> None:
    """`palm agent`: every setting of the agent is a flag here too (flags win over --config)."""
    ag = _add("agent", "run an agent in the foreground until SIGINT/SIGTERM", cmd_agent, json_flag=False, parent=sub)
    # also after the command (as the README lists them among the agent's settings)
    ag.add_argument("--log-format", choices=("console", "json"), default=argparse.SUPPRESS,
                    help="log line format on stderr (default console)")
    ag.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help="default info")
    ag.add_argument("--dir", help="state directory (identity, certificate, SQLite; default /var/lib/palm as root, "
                                  "~/.local/state/palm otherwise); must be the agent's own, mode 0700")
    ag.add_argument("--listen", metavar="HOST:PORT", help="address for migration sessions")
    ag.add_argument("--control", metavar="SOCKET", help="control socket path (created 0600, in a 0700 directory; "
                                                        f"default ${CONTROL_ENV}, else RUN_DIR/control.sock)")
    ag.add_argument("--run-dir", metavar="DIR", help="sockets and QEMU jails (default /run/palm/TAG as root, "
                                                     "$XDG_RUNTIME_DIR/palm/TAG otherwise)")
    ag.add_argument("--ca", metavar="CA_PUB", help="the authority's public key file (ca.pub), or the directory "
                                                   "holding it")
    ag.add_argument("--allow-measurement", action="append", metavar="HEX",
                    help="peer measurement to accept, repeatable (default: this agent's own)")
    ag.add_argument("--config", metavar="FILE", help="TOML file with the same keys (flags win)")
    ag.add_argument("--max-incoming", type=int, help="concurrent incoming migrations (default 4)")
    ag.add_argument("--max-incoming-memory", metavar="SIZE", help="memory reserved for incoming VMs (default 16G)")
    ag.add_argument("--max-incoming-per-peer", type=int, help="concurrent incoming migrations from one agent "
                                                              "(default 2)")
    ag.add_argument("--incoming-deadline-per-gib", type=float, metavar="SECONDS",
                    help="an incoming migration must finish within 120 s plus this per GiB (default 150)")
    ag.add_argument("--max-connections", type=int, help="connections held at once (default 512)")
    ag.add_argument("--handshake-rate", type=float, metavar="PER_S",
                    help="new connections a second per source address, bursts of 4x (default 10)")
    ag.add_argument("--session-rate", type=float, metavar="PER_S",
                    help="sessions a second per certified peer, bursts of 4x (default 5)")
    ag.add_argument("--memory-dir", help="where VM memory lives (default a tmpfs directory)")
    ag.add_argument("--images-dir", metavar="DIR",
                    help="the only files a QEMU guest's -device loader,file= may load (a 0700 directory of this "
                         "agent's; the agent opens them and QEMU gets a descriptor); without it loader files are "
                         "refused")
    ag.add_argument("--qemu-unconfined", action="store_true", default=None,
                    help="an agent not running as root (a container, a user) may still run QEMU guests, as its "
                         "own uid with the host's / (QEMU parses a peer's stream: without this they are refused)")
    ag.add_argument("--adopt-vms", action="store_true",
                    help="VMs the state directory records in another memory directory are moved into this one "
                         "(without it the agent refuses to start and names them)")
    ag.add_argument("--handshake-timeout", type=float, help="seconds (default 10)")
    ag.add_argument("--qemu-accel", choices=("kvm", "tcg"),
                    help="accelerator for QEMU VMs created here (default: kvm if /dev/kvm is usable, else tcg)")
    ag.add_argument("--no-qemu", action="store_true", default=None, help="refuse incoming QEMU VMs")
    ag.add_argument("--qemu-uids", metavar="FIRST:COUNT",
                    help="uids confined QEMUs run as, one per VM (root only; default 2000000000:65536)")
    ag.add_argument("--allow-plain", action="store_true", default=None,
                    help="accept the benchmark-only plain mode (never for protected VMs)")
    add_agent_flags(ag)


def _vm_commands(sub: Any) -> None:
    vm = sub.add_parser("vm", help="VMs of an agent: create, list, show, digest, verify, pause, resume, destroy")
    vm_sub = vm.add_subparsers(dest="vm_cmd", metavar="VM_COMMAND", parser_class=_Parser)
    vm_sub.required = True
    vc = _add("create", "create a VM (the embedded hypervisor model, or a QEMU process)", cmd_vm, control=True,
              parent=vm_sub)
    vc.add_argument("name")
    vc.add_argument("--memory", required=True, metavar="SIZE",
                    help="guest memory: 512M, 2G, 2GiB; a bare number is MiB (as QEMU's -m)")
    vc.add_argument("--backend", choices=("model", "qemu"), default="model",
                    help="model (default): the embedded hypervisor with protected processes; qemu: a QEMU/KVM "
                         "guest started and owned by the agent (TCG where /dev/kvm is not usable)")
    vc.add_argument("--qemu-arg", action="append", metavar="ARG",
                    help="extra QEMU argument, repeatable; write options with '=', e.g. --qemu-arg=-device "
                         "--qemu-arg=virtio-rng-pci.  Migratable: -cpu, -rtc, -device of a few host-free "
                         "devices; -device loader,file=... (source only) loads guest memory from a file of "
                         "the agent's --images-dir")
    vc.add_argument("--vcpus", type=int, default=1, help="virtual CPUs (QEMU backend; default 1)")
    vc.add_argument("--protected", type=int, default=0, metavar="N",
                    help="model: protected processes (default 0)")
    vc.add_argument("--protected-memory", metavar="SIZE", help="model: memory they own (default a quarter)")
    vc.add_argument("--workload", default=None,
                    help="model: what the guest does, idle (default) | random:RATE | hotset:SIZE:RATE | "
                         "protected:RATE, joined with + (RATE: page writes a second)")
    vc.add_argument("--seed", type=int, default=None, help="model: the workload's and fill's seed (default 0)")
    vc.add_argument("--policy", default="any", help="where it may migrate: any | none | agents:A,B | "
                                                    "measurements:HEX,...")
    vc.add_argument("--no-postcopy", action="store_true",
                    help="model: never migrate this VM by post-copy (palm migrate --postcopy is refused for it: "
                         "until its last page arrives, a post-copy migration loses it with its source host)")
    vc.add_argument("--fill", default=None, choices=("half", "random", "zero"),
                    help="model: initial memory, half random/half zero (default), random, zero")
    _add("list", "list VMs", cmd_vm, control=True, parent=vm_sub)
    for op, hlp in (("show", "show one VM"), ("digest", "digest of guest memory (protected pages as plaintext)"),
                    ("verify", "check every protected page against its metadata"), ("pause", "pause a VM"),
                    ("resume", "resume a VM"), ("destroy", "destroy a VM and scrub its memory and keys")):
        sp = _add(op, hlp, cmd_vm, control=True, parent=vm_sub)
        sp.add_argument("name").completer = _complete_vms  # type: ignore[attr-defined]
        if op == "digest":
            sp.add_argument("--range", metavar="ADDR:SIZE",
                            help="QEMU VMs: digest only this guest-physical range, e.g. 0x1000000:8M")


def _migrate_command(sub: Any) -> None:
    mg = _add("migrate", "live-migrate a VM to another agent (or --cancel / --resolve one)", cmd_migrate,
              control=True, parent=sub)
    mg.add_argument("name", nargs="?", help="the VM").completer = _complete_vms  # type: ignore[attr-defined]
    mg.add_argument("--to", metavar="HOST:PORT|AGENT|auto",
                    help="the destination agent's --listen address; in a cluster (the agent runs with --etcd) "
                         "also an agent's name, or auto: placed as a drain would place it")
    d = MigrationParams()  # the defaults are the migration's own
    mg.add_argument("--downtime-ms", type=float, default=d.downtime_limit * 1000,
                    help=f"downtime limit (default {d.downtime_limit * 1000:g})")
    mg.add_argument("--max-rounds", type=int, default=d.max_rounds,
                    help=f"stop iterating after this many rounds (default {d.max_rounds})")
    mg.add_argument("--max-factor", type=float, default=d.max_factor,
                    help=f"stop iterating after sending X times the memory (default {d.max_factor:g})")
    mg.add_argument("--downtime-policy", choices=DOWNTIME_POLICIES, default=None,
                    help="model VMs: at --max-rounds/--max-factor with the limit not met, pause anyway (default; "
                         "the summary warns), abort (the VM runs on here), continue iterating until it fits, or "
                         "throttle the guest a step a round until it fits")
    mg.add_argument("--channels", type=int, metavar="N",
                    help="carry the VM on N attested sessions at once, the main one and N-1 data sessions (a "
                         "QEMU guest: QEMU's multifd streams, one a session); 1-16, default: one for every four "
                         "cores of the source's host, at most 8 (a QEMU guest with QEMU 9.0+: at least 2)")
    mg.add_argument("--postcopy", action="store_true",
                    help="model VMs: where the stop-and-copy would not fit the downtime limit (at --max-rounds/"
                         "--max-factor, or after --postcopy-after rounds), switch to post-copy: the VM runs on "
                         "the destination at once and its missing pages follow, each page verified as it "
                         "arrives. Until the last one has arrived, losing the source host loses the VM")
    mg.add_argument("--postcopy-after", type=int, metavar="ROUNDS",
                    help="with --postcopy: switch after this many pre-copy rounds (0-10000; 0: at once, every "
                         "page follows the switch), whatever the expected downtime")
    mg.add_argument("--bandwidth", metavar="RATE", help="cap, e.g. 1Gbit or 100MiB/s")
    mg.add_argument("--cipher", choices=("aesgcm", "chachapoly"), help="default: aesgcm with AES-NI")
    mg.add_argument("--auto-converge", action="store_true", help="throttle the guest if it dirties too fast")
    mg.add_argument("--verify-digest", action="store_true",
                    help="both sides digest memory while paused; commit only if equal (adds downtime)")
    mg.add_argument("--reply-timeout", type=float, default=d.reply_timeout, metavar="SECONDS",
                    help=f"wait this long for the destination's ACCEPT, READY and DONE (default {d.reply_timeout:g})")
    mg.add_argument("--plain-benchmark", action="store_true",
                    help="benchmark-only unencrypted records (refused for protected VMs)")
    which = mg.add_mutually_exclusive_group()
    which.add_argument("--cancel", metavar="ID", help="cancel an in-flight migration (before the handoff): its id, "
                                                      "a unique prefix, or the VM's name")
    which.add_argument("--resolve", metavar="ID", help="ask the destination about an in-doubt migration now (id, "
                                                       "prefix or VM name)")
    mg.add_argument("--override", action="store_true",
                    help="with --resolve: resume the in-doubt VM without the destination (may fork it!)")
    mg.add_argument("--abandon", action="store_true",
                    help="with --resolve and --reason: a post-copy migration whose other host is lost (serving "
                         "here as its source, or pulling here as its destination): declare the VM lost and scrub "
                         "this copy. Nothing runs again; the VM is gone")
    mg.add_argument("--reason", help="with --override or --abandon: why (logged and recorded)")


def _completion_command(sub: Any) -> None:
    co = _add("completion", "print the shell completion script: eval \"$(palm completion bash)\"", cmd_completion,
              json_flag=False, parent=sub)
    co.add_argument("shell", nargs="?", default="bash", choices=("bash", "zsh", "fish", "tcsh"))


def _demo_command(sub: Any) -> None:
    dm = _add("demo", "throw-away authority + two agents on loopback: migrate a protected VM under load", cmd_demo,
              parent=sub)
    dm.add_argument("--memory", default="256M", metavar="SIZE", help="guest memory (default 256M)")
    dm.add_argument("--workload", default="random:2000+protected:500", help="guest workload during migration")
    dm.add_argument("--keep", action="store_true", help="keep the temporary directories")


def build_parser() -> argparse.ArgumentParser:
    """`palm`: its own flags, then each command (group), in the order --help lists them."""
    p = _Parser(prog="palm", description="palm_net: secure live migration of VMs with hypervisor-protected "
                "processes (PALM). Start with `palm demo`; docs/OPERATOR.md walks through a real session.",
                epilog="Sizes: 512M, 2G, 2GiB (binary units; a bare number of memory is MiB, as QEMU's -m). "
                f"Commands find the agent at --control, else ${CONTROL_ENV}, else the default agent's socket. "
                "Shell completion: eval \"$(palm completion bash)\".")
    p.add_argument("--version", action="version", version=f"palm {_version()}")
    p.add_argument("--log-format", choices=("console", "json"), default=None, help="log line format (stderr)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="default info")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _keygen_command(sub)
    _ca_commands(sub)
    _add("measurement", "print this installation's agent measurement", cmd_measurement, parent=sub)
    _agent_command(sub)
    _vm_commands(sub)
    _migrate_command(sub)
    _add("migrations", "in-flight and recent migrations", cmd_migrations, control=True, parent=sub)
    _add("status", "the agent's name, port and counts", cmd_status, control=True, parent=sub)
    _completion_command(sub)
    add_commands(sub, _add, _Parser)
    _demo_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (argcomplete); exits
        import argcomplete

        argcomplete.autocomplete(parser)
    args = sys.argv[1:] if argv is None else argv
    _Parser.argv = list(args)
    groups = {"vm", "ca", "cluster"}
    if not args or (len(args) == 1 and args[0] in groups):  # bare `palm` (or `palm vm`): the help, not an error
        _command_parser(parser, args).print_help()
        return 0
    a = parser.parse_args(argv)
    from palm_net import logs

    try:
        conf_fmt = conf_lvl = None
        if getattr(a, "config", None):
            conf = _load_config(a.config)
            conf_fmt, conf_lvl = conf.get("log_format"), conf.get("log_level")
        logs.configure(a.log_format or conf_fmt or "console", a.log_level or conf_lvl or "info")
    except (ValueError, CliError) as exc:
        print(f"palm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from palm_net.crypto.identity import KeyFileError

    try:
        return int(a.fn(a))
    except CliError as exc:
        print(f"palm: {exc}", file=sys.stderr)
        return exc.code
    except KeyFileError as exc:
        print(f"palm: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("palm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except PermissionError as exc:  # another user's files (root's agent, its keys): one line, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        hint = " (it belongs to root: use sudo)" if os.geteuid() != 0 else ""
        print(f"palm: permission denied:{where}{hint}", file=sys.stderr)
        return EXIT_FAIL
