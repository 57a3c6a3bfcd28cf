"""The agent: one trusted hypervisor's migration service on a host.

It owns the host's VMs (the hypervisor model), listens for attested
migration and recovery sessions from other agents, serves the local control
socket, and keeps its durable state in its directory:

    DIR/identity.key   X25519 + Ed25519 identity (0600)
    DIR/agent.cert     certificate from the cluster authority
    DIR/hv.key         the hypervisor's sealing key for VM secrets (0600)
    DIR/state.db       SQLite: the handoff state of every migration
    DIR/memory-dir     where VM memory lives (default: a tmpfs directory)
    DIR/.lock          held while the agent runs: one agent per directory

Every directory it uses is its own (made 0700, or verified: palm_net.hostfs);
defaults are in palm_net.agent.paths.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from palm_net.agent.control import ControlServer
from palm_net.agent.errors import AgentError
from palm_net.agent.limits import Admission, TokenBuckets
from palm_net.agent.paths import MAX_RUN_DIR, default_control, default_run_dir
from palm_net.channel.handshake import ChannelConfig, Purpose, TransportMode, default_ciphers
from palm_net.channel.transport import SecureChannel, accept, connect
from palm_net.crypto.identity import (
    CERT_FILE,
    AgentIdentity,
    AttestationError,
    Certificate,
    KeyFileError,
    compute_measurement,
    load_authority_public,
    read_secret_file,
    validate_name,
)
from palm_net.crypto.noise import CipherName
from palm_net.hostfs import (
    DirLock,
    UnsafePathError,
    create_exclusive,
    ensure_dir,
    make_private_dir,
    read_nofollow,
    verify_dir,
    write_atomic,
)
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import DEFAULT_UIDS, Confinement, QemuError, QemuSpec, QemuVM
from palm_net.hypervisor.vms import AnyVM, open_vm
from palm_net.hypervisor.workload import Workload, WorkloadError, parse_workload
from palm_net.migration.engine import (
    DestinationEngine,
    MigrationFailure,
    MigrationParams,
    MigrationStats,
    describe,
)
from palm_net.migration.orchestrate import (
    MigrationResult,
    migrate_out,
    override_resume,
    recover_once,
    serve_incoming,
    validate_policy,
)
from palm_net.migration.store import HandoffStore, MigrationRow
from palm_net.wire.errors import ProtocolError
from palm_net.wire.messages import Message

log = structlog.get_logger("palm.agent")

AGENT_POLICY = b"palm-net agent policy v2: model hypervisor and QEMU, attested migration only"
MAX_PENDING_HANDSHAKES = 256


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


def default_measurement() -> bytes:
    return compute_measurement(AGENT_POLICY)


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return "?"


async def _close(stream: trio.abc.AsyncResource) -> None:
    with trio.move_on_after(1) as cs:
        cs.shield = True
        await stream.aclose()


@dataclass
class AgentConfig:
    state_dir: Path
    listen: str
    control: Path | None  # None: RUN_DIR/control.sock
    ca_pub: Path
    allow_measurements: list[bytes] = field(default_factory=list)
    max_incoming: int = 4
    max_incoming_memory: int = 16 << 30
    max_incoming_per_peer: int = 2  # KubeVirt's default: 2 outbound migrations per node
    incoming_deadline_per_gib: float = 150.0  # a whole incoming migration within 120 s + this per GiB
    max_connections: int = 512  # connections held at once, handshakes and sessions
    handshake_rate: float = 10.0  # new connections a second per source address (burst: 4x)
    session_rate: float = 5.0  # sessions (BEGIN or QUERY) a second per certified peer (burst: 4x)
    handshake_timeout: float = 10.0
    ciphers: tuple[CipherName, ...] = field(default_factory=default_ciphers)
    allow_plain: bool = False
    memory_dir: Path | None = None
    in_doubt_wait: float = 30.0
    accept_qemu: bool = True  # receive QEMU VMs (their QEMU is started here, paused until COMMIT)
    qemu_accel: str | None = None  # kvm or tcg; None: KVM when /dev/kvm is usable
    run_dir: Path | None = None  # sockets and QEMU jails; None: palm_net.agent.paths.default_run_dir
    qemu_uids: tuple[int, int] = DEFAULT_UIDS  # (first, count) of the uids confined QEMUs run as (root only)

    def __post_init__(self) -> None:
        for name in ("max_incoming", "max_incoming_memory", "max_incoming_per_peer", "incoming_deadline_per_gib",
                     "max_connections", "handshake_rate", "session_rate", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


@dataclass
class LiveMigration:
    mid: bytes
    vm: str
    role: str
    peer: str
    stats: MigrationStats
    started: float
    cancel: trio.CancelScope | None = None
    result: MigrationResult | None = None


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._locks: list[DirLock] = []
        self.vms: dict[str, AnyVM] = {}
        self.live: dict[bytes, LiveMigration] = {}
        self.incoming: dict[int, DestinationEngine] = {}
        self.admission = Admission(cfg.max_incoming, cfg.max_incoming_memory, cfg.max_incoming_per_peer)
        self.handshakes = TokenBuckets(cfg.handshake_rate, 4 * cfg.handshake_rate)  # per source address
        self.sessions = TokenBuckets(cfg.session_rate, 4 * cfg.session_rate)  # per certified peer
        self.connections = 0
        self.counters: dict[str, int] = {}  # refusals by reason, handshakes completed
        self._pending: dict[object, list[Any]] = {}  # key -> [cancel scope, handshake]
        self._refusals: dict[str, int] = {}
        self._refusal_logged = 0.0
        self.listen_port = 0
        self._nursery: trio.Nursery | None = None
        try:
            self._open()
        except UnsafePathError as exc:
            self._release_locks()
            raise AgentError(str(exc)) from None
        except BaseException:
            self._release_locks()
            raise

    def _open(self) -> None:
        """Takes the state directory (one agent per directory), then keys,
        certificate, store and memory directory; every path ours or refused."""
        cfg, d = self.cfg, self.cfg.state_dir
        if not d.exists() and not d.is_symlink():
            raise AgentError(f"state directory {d} does not exist (run: palm keygen --dir {d} --name NAME)")
        verify_dir(d, "state directory")
        self._locks.append(DirLock(d, "state directory"))
        self.run_dir = ensure_dir(cfg.run_dir or default_run_dir(d), "run directory")
        if len(str(self.run_dir)) > MAX_RUN_DIR:
            raise AgentError(f"run directory {self.run_dir} is longer than {MAX_RUN_DIR} characters "
                             "(Unix socket paths are short); choose a shorter --run-dir")
        self.control_path = cfg.control or default_control(d)
        ensure_dir(self.control_path.parent, "control socket directory")
        try:
            self.identity = AgentIdentity.load(d)
            self.authority_pub = load_authority_public(cfg.ca_pub)
        except KeyFileError as exc:
            raise AgentError(str(exc)) from None
        try:
            self.certificate = Certificate.decode(read_nofollow(d / CERT_FILE, 1 << 16))
        except (OSError, UnsafePathError):
            raise AgentError(f"no certificate at {d / CERT_FILE} (run: palm ca issue --agent {d})") from None
        except AttestationError as exc:
            raise AgentError(f"{d / CERT_FILE}: {exc}") from None
        try:
            self.certificate.verify(self.authority_pub)
        except AttestationError as exc:
            raise AgentError(f"own certificate refused: {exc}") from None
        if self.certificate.static_pub != self.identity.static.public:
            raise AgentError(f"{d / CERT_FILE} was issued for another identity key")
        self.measurement = default_measurement()
        if self.certificate.measurement != self.measurement:
            log.warning("certificate measurement differs from this agent's code; peers will refuse it",
                        cert=self.certificate.measurement.hex()[:16], running=self.measurement.hex()[:16])
        allowed = frozenset(cfg.allow_measurements or [self.measurement])
        self.channel_config = ChannelConfig(self.identity, self.certificate, self.authority_pub, self.measurement,
                                            allowed, ciphers=cfg.ciphers, allow_plain=cfg.allow_plain,
                                            handshake_timeout=cfg.handshake_timeout)
        self.sealing_key = self._sealing_key()
        self.memory_dir = self._memory_dir()
        self._locks.append(DirLock(self.memory_dir, "memory directory"))
        self.confinement = Confinement.for_agent(cfg.qemu_uids)
        self.store = HandoffStore(d / "state.db")

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    # -- state directory ----------------------------------------------------

    def _sealing_key(self) -> bytes:
        path = self.cfg.state_dir / "hv.key"
        if not path.exists() and not path.is_symlink():
            fd = create_exclusive(path)  # first start: a new key, never a planted file
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            key = read_secret_file(path)
        except KeyFileError as exc:
            raise AgentError(str(exc)) from None
        if len(key) != 32:
            raise AgentError(f"{path} is not a 32-byte key")
        return key

    def _memory_dir(self) -> Path:
        """Where VM memory lives: --memory-dir (made 0700 or verified), else a
        directory with an unpredictable name made in /dev/shm and recorded in
        the state directory (tmpfs: guest RAM survives an agent restart, not a reboot)."""
        record = self.cfg.state_dir / "memory-dir"
        mdir: Path | None = None
        if self.cfg.memory_dir is not None:
            mdir = ensure_dir(self.cfg.memory_dir, "memory directory")
        else:
            if record.exists() or record.is_symlink():
                recorded = Path(read_nofollow(record, 4096).decode().strip())
                if recorded.exists() or recorded.is_symlink():
                    mdir = verify_dir(recorded, "memory directory")
            if mdir is None:  # first start, or the host rebooted (tmpfs emptied)
                shm = Path("/dev/shm")  # noqa: S108 - the directory made inside is ours alone (hostfs)
                mdir = (make_private_dir(shm, f"palm-{os.geteuid()}-") if shm.is_dir()
                        else ensure_dir(self.cfg.state_dir / "vms", "memory directory"))
        write_atomic(record, (str(mdir) + "\n").encode())
        return mdir

    def _vm_dir(self, name: str) -> Path:
        return self.memory_dir / name

    # -- start-up recovery ------------------------------------------------------

    def load_vms(self) -> None:
        """Reopens VMs and applies the handoff rules to whatever was in flight.

        A VM records the id of the migration it is part of, so a restart acts
        on exactly that migration (a VM name, or even the VM, may have come
        and gone many times before).
        """
        for vm_dir in sorted(p for p in self.memory_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                opened = open_vm(vm_dir, self.sealing_key)
            except HypervisorError as exc:
                log.error("cannot reopen VM, left in place", dir=str(vm_dir), error=str(exc))
                continue
            self.vms[opened.name] = opened
        for name, vm in list(self.vms.items()):
            mid = vm.migration
            row = self.store.get(mid) if mid else None
            bound = log.bind(migration=mid.hex() if mid else None, vm=name, phase="restart")
            if vm.state == "incoming":
                if row is not None and row.role == "destination" and row.state == "committed":
                    try:
                        vm.activate()  # died between "committed" and activation
                        bound.info("committed migration activated after restart")
                    except HypervisorError as exc:  # e.g. its QEMU died with us: lost, say so
                        bound.error("committed VM cannot be activated", error=str(exc))
                else:  # never committed: discard, and never activate it later
                    if row is not None:
                        self.store.transition(row.mid, ("receiving", "prepared"), "aborted", error="agent restarted")
                    vm.scrub()
                    del self.vms[name]
                    bound.warning("incoming migration aborted by restart")
                continue
            if row is None or row.role != "source":
                continue
            if row.state == "sending":
                self.store.transition(row.mid, ("sending",), "aborted", error="agent restarted before handoff")
                row = self.store.get(row.mid)
            if row is not None and row.state == "aborted":
                vm.resume_after_migration()
                bound.warning("outgoing migration aborted by restart, VM resumed")
            elif row is not None and row.state == "done":
                vm.scrub()  # handed over and confirmed: only the scrub was missing
                del self.vms[name]
            # handed_off: stays paused, in doubt; serve() starts its recovery
        for row in self.store.list(role="destination", states=("receiving", "prepared"), limit=1 << 30):
            self.store.transition(row.mid, ("receiving", "prepared"), "aborted", error="agent restarted")
        for running in self.vms.values():
            if running.state == "running":
                self._start_workload(running)

    def in_doubt(self) -> list[bytes]:
        return [r.mid for r in self.store.list(role="source", states=("handed_off",))]

    async def _recovery_loop(self, mid: bytes) -> None:
        delay = 0.5
        while True:
            row = self.store.get(mid)
            if row is None or row.state != "handed_off":
                return
            vm = self._vm_of(row)
            try:
                outcome = await recover_once(self.store, mid, vm, self._connect_recovery)
            except Exception:  # keep asking; never crash the agent over one in-doubt migration
                log.exception("recovery attempt failed", migration=mid.hex(), vm=row.vm, phase="in-doubt")
                outcome = None
            if outcome is not None:
                self._settle_outgoing(vm, outcome)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _vm_of(self, row: MigrationRow) -> AnyVM | None:
        """The VM a migration is about: the one with its identity that records
        that migration, never merely one with its name (names are reused)."""
        vm = self.vms.get(row.vm)
        if vm is not None and vm.vm_id == row.vm_id and vm.migration == row.mid:
            return vm
        return None

    def _forget(self, vm: AnyVM) -> None:
        if self.vms.get(vm.name) is vm:
            del self.vms[vm.name]

    def _settle_outgoing(self, vm: AnyVM | None, outcome: str) -> None:
        """After an in-doubt migration resolved: forget the VM, or run it here again."""
        if vm is None:
            return
        if outcome in ("committed", "done"):
            self._forget(vm)
        else:
            self._start_workload(vm)

    # -- VMs ------------------------------------------------------------------

    def _start_workload(self, vm: AnyVM) -> None:
        if not isinstance(vm, ModelVM):
            return  # a QEMU guest runs its own code
        spec = str(vm.config.get("workload", "idle"))
        try:
            wl = Workload(vm, spec, int(vm.config.get("seed", 0)))
        except WorkloadError as exc:
            log.error("workload not started", vm=vm.name, error=str(exc))
            return
        vm.workload = wl
        wl.start()

    def get_vm(self, name: str) -> AnyVM:
        vm = self.vms.get(name)
        if vm is None:
            raise AgentError(f"unknown VM {name!r}")
        return vm

    def _check_new_vm(self, name: str, policy: str) -> None:
        try:
            validate_name(name)
            validate_policy(policy)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if name in self.vms or self._vm_dir(name).exists():
            raise AgentError(f"a VM named {name!r} already exists")

    def create_vm(self, name: str, memory: int, protected: int = 0, protected_memory: int | None = None,
                  workload: str = "idle", seed: int = 0, policy: str = "any", fill: str = "half",
                  vcpus: int = 1) -> ModelVM:
        self._check_new_vm(name, policy)
        try:
            parse_workload(workload)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if memory < PAGE_SIZE or memory % PAGE_SIZE:
            raise AgentError("memory must be a positive multiple of 4 KiB")
        npages = memory // PAGE_SIZE
        prot_pages = 0
        if protected:
            pm = protected_memory if protected_memory is not None else memory // 4
            prot_pages = max(protected, pm // PAGE_SIZE)
        try:
            vm = ModelVM.create(self._vm_dir(name), name, npages, self.sealing_key, protected_processes=protected,
                                protected_pages=prot_pages, vcpus=vcpus, fill=fill, seed=seed, policy=policy,
                                workload=workload)
        except HypervisorError as exc:
            shutil.rmtree(self._vm_dir(name), ignore_errors=True)
            raise AgentError(str(exc)) from None
        self.vms[name] = vm
        self._start_workload(vm)
        log.info("VM created", vm=name, pages=npages, protected_pages=prot_pages, workload=workload)
        return vm

    def create_qemu_vm(self, name: str, memory: int, args: list[str], vcpus: int = 1,
                       policy: str = "any") -> QemuVM:
        """A VM that is a QEMU process owned by this agent (KVM if usable, else TCG)."""
        self._check_new_vm(name, policy)
        if memory < (1 << 20) or memory % (1 << 20):
            raise AgentError("QEMU memory must be a positive multiple of 1 MiB")
        try:
            vm = QemuVM.create(self._vm_dir(name), self.run_dir, name, memory >> 20, vcpus=vcpus, args=args,
                               policy=policy, accel=self.cfg.qemu_accel, confine=self.confinement)
        except HypervisorError as exc:
            shutil.rmtree(self._vm_dir(name), ignore_errors=True)
            raise AgentError(str(exc)) from None
        self.vms[name] = vm
        log.info("VM created", vm=name, backend="qemu", memory_mib=memory >> 20, accel=vm.spec.accel,
                 pid=vm.pid)
        return vm

    def operable_vm(self, name: str) -> AnyVM:
        """The VM, if the operator may pause, resume or destroy it now: not while
        it migrates, and never while its handoff is in doubt (only the destination's
        word, or a loud override, may decide where it runs)."""
        vm = self.get_vm(name)
        if any(lm.vm == name and lm.result is None for lm in self.live.values()):
            raise AgentError(f"VM {name!r} is migrating")
        mid = vm.migration
        row = self.store.get(mid) if mid else None
        if row is not None and row.role == "source" and row.state == "handed_off":
            raise AgentError(f"VM {name!r} was handed off by migration {mid.hex() if mid else ''} and its outcome "
                             f"is in doubt: use palm migrate --resolve {mid.hex() if mid else ''} [--override]")
        if vm.state == "incoming":
            raise AgentError(f"VM {name!r} is arriving by a migration; it is the destination's only after COMMIT")
        return vm

    def set_run_state(self, name: str, run: bool) -> AnyVM:
        vm = self.operable_vm(name)
        if vm.state not in ("running", "paused"):
            raise AgentError(f"VM {name!r} is {vm.state}")
        (vm.resume if run else vm.pause)()
        log.info("VM resumed" if run else "VM paused", vm=name)
        return vm

    def destroy_vm(self, name: str) -> None:
        vm = self.operable_vm(name)
        vm.scrub()
        if self.vms.get(name) is vm:
            del self.vms[name]
        log.info("VM destroyed", vm=name)

    def _make_incoming(self, msg: Message) -> AnyVM:
        """The incoming VM for an admitted BEGIN (palm_net.agent.limits.Admission).
        Refusals carry a code; their detail stays in our log (proto/PROTOCOL.md 8)."""
        b = msg.body
        try:
            validate_name(b["vm"])  # it names a directory: no "..", no "/"
        except ValueError as exc:
            raise MigrationFailure("malformed", str(exc)) from None
        size = b["pages"] * PAGE_SIZE
        if b["vm"] in self.vms or self._vm_dir(b["vm"]).exists():
            raise MigrationFailure("exists", f"destination already has a VM named {b['vm']!r}")
        if any(v.vm_id == b["vm_id"] for v in list(self.vms.values())):
            raise MigrationFailure("exists", "destination already hosts a VM with this identity")
        free = os.statvfs(self.memory_dir)
        if size > free.f_bavail * free.f_frsize:  # checked before any allocation; the
            raise MigrationFailure("no-space", f"{size >> 20} MiB asked, {free.f_bavail * free.f_frsize >> 20} "
                                               f"MiB free in {self.memory_dir}")  # reservation then makes sure
        vm: AnyVM
        try:
            if b["backend"] == "qemu":
                if not self.cfg.accept_qemu:
                    raise MigrationFailure("backend", "this agent does not accept QEMU VMs")
                spec = QemuSpec.decode(b["spec"])
                if spec.memory_mib * (1 << 20) != size:
                    raise QemuError("QEMU spec's memory disagrees with BEGIN's page count")
                vm = QemuVM.create_incoming(self._vm_dir(b["vm"]), self.run_dir, b["vm"], b["vm_id"], spec,
                                            migration=msg.mid, confine=self.confinement)
            else:
                vm = ModelVM.create_incoming(self._vm_dir(b["vm"]), b["vm"], b["vm_id"], b["pages"], b["vcpus"],
                                             self.sealing_key, migration=msg.mid)
        except HypervisorError as exc:
            shutil.rmtree(self._vm_dir(b["vm"]), ignore_errors=True)
            raise MigrationFailure("no-space" if "no room" in str(exc) else "backend", str(exc)) from None
        self.vms[vm.name] = vm
        return vm

    # -- network --------------------------------------------------------------

    async def _connect(self, addr: str, purpose: Purpose, mode: TransportMode = TransportMode.SECURE,
                       cipher: CipherName | None = None) -> SecureChannel:
        host, port = parse_hostport(addr)
        with trio.fail_after(self.cfg.handshake_timeout):
            stream = await trio.open_tcp_stream(host, port)
        try:
            return await connect(stream, self.channel_config, purpose=purpose, mode=mode, cipher=cipher)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def _connect_recovery(self, addr: str) -> SecureChannel:
        return await self._connect(addr, Purpose.RECOVERY)

    def _admit_handshake(self) -> None:
        """Keeps the pending handshakes bounded: when full, drops the oldest of
        those that got least far (a flood of half-open or garbage peers loses
        its slots before an honest peer that is already mid-handshake)."""
        if len(self._pending) < MAX_PENDING_HANDSHAKES:
            return
        victim = min(self._pending, key=lambda k: self._pending[k][1].progress if self._pending[k][1] else -1)
        self._pending.pop(victim)[0].cancel()

    def _log_refusal(self, code: str, detail: str) -> None:
        """A flood must not turn into a flood of log lines: one summary line a second."""
        now = time.monotonic()
        self._refusals[code] = self._refusals.get(code, 0) + 1
        if now - self._refusal_logged >= 1.0:
            log.warning("handshakes refused", counts=dict(self._refusals), last_reason=detail)
            self._refusals.clear()
            self._refusal_logged = now

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        # Before any work: a cap on connections held, and a rate per source
        # address (a first message costs us a Diffie-Hellman and our
        # certificate, the sender almost nothing).
        if self.connections >= self.cfg.max_connections or not self.handshakes.take(_peer_host(stream)):
            reason = "connections" if self.connections >= self.cfg.max_connections else "rate"
            self._count(f"refused-{reason}")
            self._log_refusal(reason, "connection closed before the handshake")
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.aclose()
            return
        self.connections += 1
        try:
            await self._serve_connection(stream)
        finally:
            self.connections -= 1

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # Every handshake has a deadline and a small buffer, and the number
        # pending is bounded (_admit_handshake).
        scope = trio.CancelScope()
        key = object()
        self._admit_handshake()
        entry: list[Any] = [scope, None]
        self._pending[key] = entry
        channel = None
        try:
            with scope:
                channel = await accept(stream, self.channel_config,
                                       on_start=lambda hs: entry.__setitem__(1, hs))
        except ProtocolError as exc:
            self._count(f"refused-{exc.code}")
            self._log_refusal(exc.code, exc.detail)
        finally:
            self._pending.pop(key, None)
        if channel is not None and not self.sessions.take(channel.result.peer.static_pub):
            self._count("refused-session-rate")
            self._log_refusal("session-rate", f"peer {channel.peer_name} opens sessions too fast")
            await _close(channel.stream)
            return
        if channel is None:
            await _close(stream)
            return
        self._count("handshakes")
        log.debug("session accepted", peer=channel.peer_name, purpose=channel.result.purpose.name)
        engines: list[DestinationEngine] = []

        def track(engine: DestinationEngine) -> None:
            engines.append(engine)
            self.incoming[id(engine)] = engine

        try:
            await serve_incoming(channel, self.store, self.identity.signing, self._make_incoming,
                                 self.cfg.max_incoming_memory // PAGE_SIZE, track, self.admission.admit,
                                 self.cfg.incoming_deadline_per_gib)
        except (ProtocolError, MigrationFailure, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as exc:
            if channel.result.purpose is Purpose.RECOVERY:
                code, reason = describe(exc, type(exc).__name__)
                log.warning("recovery session refused", peer=channel.peer_name, error=code, reason=reason)
            # a migration's failure was logged by the runner; its VM was scrubbed
        except Exception:  # one session's unexpected failure must never take the agent down
            log.exception("incoming session failed", peer=channel.peer_name)
        finally:
            for engine in engines:
                self._settle_incoming(engine)
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await channel.aclose()

    def _settle_incoming(self, engine: DestinationEngine) -> None:
        """After an incoming session ends, whatever way: run it or forget it."""
        self.incoming.pop(id(engine), None)
        if engine.outcome != "committed" and engine.vm is not None:
            engine.fail("closed", "session ended before COMMIT")  # aborted forever, scrubbed
        name = engine.vm_name
        vm = self.vms.get(name) if name else None
        if vm is not None and name is not None:
            if engine.outcome == "committed":
                self._start_workload(vm)
            elif not vm.dir.exists():
                del self.vms[name]
        engine._release()  # its place in the limits: a committed VM is simply ours now

    # -- migrations out -------------------------------------------------------

    async def migrate(self, name: str, to: str, params: MigrationParams, cipher: CipherName | None = None,
                      on_progress: Callable[[MigrationStats], None] | None = None) -> MigrationResult:
        vm = self.operable_vm(name)  # not while migrating, arriving or in doubt
        try:
            parse_hostport(to)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if not self.admission.accepting:
            raise AgentError("agent is shutting down")
        mode = TransportMode.PLAIN_BENCHMARK if params.plain else TransportMode.SECURE

        async def conn(addr: str) -> SecureChannel:
            return await self._connect(addr, Purpose.MIGRATION, mode, cipher)

        scope = trio.CancelScope()
        mid = os.urandom(16)
        lm = LiveMigration(mid, name, "source", to, MigrationStats(), time.time(), scope)

        def progress(stats: MigrationStats) -> None:
            lm.stats = stats
            if on_progress:
                on_progress(stats)

        self.live[mid] = lm
        result: MigrationResult | None = None
        with scope:
            result = await migrate_out(vm, self.store, to, params, conn, self._connect_recovery, progress,
                                       self.cfg.in_doubt_wait, mid=mid)
        if result is None:  # cancelled by the operator before the handoff: the VM runs here
            result = MigrationResult(False, mid, name, "cancelled", lm.stats, "cancelled by operator",
                                     lm.stats.phase, "source" if vm.running else "none (paused, in doubt)")
        lm.result = result
        if result.ok:
            self._forget(vm)
        elif result.status == "in-doubt" and self._nursery is not None:
            self._nursery.start_soon(self._recovery_loop, result.mid)
        elif vm.running and vm.workload is None:
            self._start_workload(vm)
        self._trim_live()
        return result

    def _trim_live(self) -> None:
        done = [m for m, lm in self.live.items() if lm.result is not None]
        for m in done[:-50]:
            del self.live[m]

    def cancel(self, mid_hex: str) -> str:
        for lm in list(self.live.values()):
            if lm.mid.hex() == mid_hex and lm.result is None:
                row = self.store.get(lm.mid)
                if row is not None and row.state != "sending":
                    raise AgentError("migration is past the handoff point; it cannot be cancelled")
                if lm.cancel is not None:
                    lm.cancel.cancel()
                return "cancelling"
        raise AgentError(f"no migration in flight with id {mid_hex}")

    async def resolve(self, mid_hex: str, override: bool, reason: str) -> str:
        try:
            mid = bytes.fromhex(mid_hex)
        except ValueError:
            raise AgentError(f"bad migration id {mid_hex!r}") from None
        row = self.store.get(mid)
        if row is None or row.role != "source" or row.state != "handed_off":
            raise AgentError(f"no in-doubt migration with id {mid_hex}")
        vm = self._vm_of(row)
        if override:
            if vm is None:
                raise AgentError(f"the VM of migration {mid_hex} is no longer here: nothing to resume")
            override_resume(self.store, mid, vm, reason or "operator override")
            self._start_workload(vm)
            return "resumed (override)"
        outcome = await recover_once(self.store, mid, vm, self._connect_recovery)
        if outcome is None:
            return "still in doubt: destination not reachable"
        self._settle_outgoing(vm, outcome)
        return outcome

    def migrations(self) -> list[dict[str, Any]]:
        out = []
        for row in self.store.list(limit=50):
            lm = self.live.get(row.mid)
            stats = lm.stats.as_dict() if lm is not None else row.stats
            out.append({"migration_id": row.mid.hex(), "role": row.role, "vm": row.vm, "peer": row.peer,
                        "state": row.state, "in_flight": lm is not None and lm.result is None,
                        "error": row.error, "updated": row.updated, "stats": stats})
        return out

    # -- the service ----------------------------------------------------------

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_hostport(self.cfg.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise AgentError(f"cannot listen on {self.cfg.listen}: {exc.strerror or exc}") from None
        self.listen_port = listeners[0].socket.getsockname()[1]
        control = ControlServer(self, self.control_path)
        await control.bind()
        self.load_vms()
        log.info("agent started", agent=self.identity.name, listen=f"{host}:{self.listen_port}",
                 control=str(self.control_path),
                 qemu_confinement="seccomp, own uid and empty root per VM" if self.confinement.uids
                 else "seccomp only (agent not root)",
                 measurement=self.measurement.hex()[:16], vms=len(self.vms))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for mid in self.in_doubt():
                    nursery.start_soon(self._recovery_loop, mid)
                nursery.start_soon(control.serve)
                await nursery.start(trio.serve_listeners, self.handle_connection, listeners)
                task_status.started(self)
        finally:
            self.shutdown_sync()
            control.close()

    def shutdown_sync(self) -> None:
        self.admission.accepting = False
        for vm in list(self.vms.values()):
            with contextlib.suppress(Exception):
                if vm.workload is not None:
                    vm.workload.stop()
                    vm.workload = None
                if vm.dir.exists():
                    vm.sync()
                vm.close()
        self.store.close()
        self._release_locks()
        log.info("agent stopped", agent=self.identity.name)


async def run_agent(cfg: AgentConfig) -> None:
    """Runs until SIGINT/SIGTERM; in-flight migrations end by the handoff rules."""
    agent = Agent(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                log.info("shutting down", signal=signal.Signals(sig).name)
                agent.admission.accepting = False
                nursery.cancel_scope.cancel()
                break
