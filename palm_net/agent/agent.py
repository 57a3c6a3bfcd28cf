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

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from palm_net.agent import abandon, faultdrill
from palm_net.agent.clustering import AgentCluster
from palm_net.agent.control import ControlServer
from palm_net.agent.errors import AgentError
from palm_net.agent.incoming import IncomingLimits, IncomingService
from palm_net.agent.limits import bound_malloc, freeze_heap, release_free_memory
from palm_net.agent.outgoing import OutgoingService, parse_hostport
from palm_net.agent.paths import MAX_RUN_DIR, default_control, default_run_dir
from palm_net.agent.registry import VmRegistry
from palm_net.agent.vmindex import adopt_vms, check_start
from palm_net.channel.handshake import ChannelConfig, Purpose, TransportMode, default_ciphers
from palm_net.channel.transport import SecureChannel, connect
from palm_net.crypto.identity import (
    CERT_FILE,
    IDENTITY_FILE,
    AgentIdentity,
    AttestationError,
    Certificate,
    KeyFileError,
    compute_measurement,
    load_authority_public,
    read_secret_file,
)
from palm_net.crypto.noise import CipherName
from palm_net.hostfs import (
    CONTROL_DIR,
    LOCK_FILE,
    DirLock,
    UnsafePathError,
    create_exclusive,
    ensure_dir,
    make_private_dir,
    memory_backing,
    read_nofollow,
    verify_dir,
    write_atomic,
)
from palm_net.hypervisor.backend import describe_error
from palm_net.hypervisor.qemu import DEFAULT_UIDS, Confinement
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffStore

if TYPE_CHECKING:
    from palm_net.cluster.etcd import EtcdConfig  # only with --etcd: not imported otherwise

log = structlog.get_logger("palm.agent")

AGENT_POLICY = b"palm-net agent policy v2: model hypervisor and QEMU, attested migration only"
PRUNE_EVERY = 3600.0  # seconds between prunes of finished migrations
ACTIVATION_RETRY = (1.0, 60.0)  # first and longest wait between activations of a committed VM


def default_measurement() -> bytes:
    return compute_measurement(AGENT_POLICY)


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
    max_incoming_memory_per_peer: int | None = None  # None: half of max_incoming_memory
    incoming_deadline_per_gib: float = 150.0  # a whole incoming migration within 120 s + this per GiB
    max_connections: int = 512  # connections held at once, handshakes and sessions
    handshake_rate: float = 10.0  # new connections a second per source address (burst: 4x)
    session_rate: float = 5.0  # sessions (BEGIN or QUERY) a second per certified peer (burst: 4x)
    handshake_timeout: float = 10.0
    ciphers: tuple[CipherName, ...] = field(default_factory=default_ciphers)
    allow_plain: bool = False
    memory_dir: Path | None = None
    images_dir: Path | None = None  # files a QEMU guest's -device loader may load (made 0700 or verified)
    adopt_vms: bool = False  # VMs the state records in another memory directory: moved here (else: refused)
    in_doubt_wait: float = 30.0
    accept_qemu: bool = True  # receive QEMU VMs (their QEMU is started here, paused until COMMIT)
    qemu_unconfined: bool = False  # an agent not root may run QEMU with its own uid and / (said loudly)
    qemu_accel: str | None = None  # kvm or tcg; None: KVM when /dev/kvm is usable
    run_dir: Path | None = None  # sockets and QEMU jails; None: palm_net.agent.paths.default_run_dir
    qemu_uids: tuple[int, int] = DEFAULT_UIDS  # (first, count) of the uids confined QEMUs run as (root only)
    # the cluster (docs/CLUSTER.md): etcd, how others reach this agent, what it offers; metrics
    etcd: EtcdConfig | None = None  # None: no cluster, everything as without it
    etcd_prefix: str = "/palm/"
    advertise: str | None = None  # HOST:PORT other agents reach this one at (default: --listen)
    capacity: int | None = None  # guest memory this host offers (default: the memory directory's file system)
    cluster_lease_ttl: int = 10
    cluster_reconcile_every: float = 15.0
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on

    def __post_init__(self) -> None:
        for name in ("max_incoming", "max_incoming_memory", "max_incoming_per_peer", "incoming_deadline_per_gib",
                     "max_connections", "handshake_rate", "session_rate", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


class Agent:
    """The agent: its identity and directories, and the three services that own
    its state: the VM registry, the incoming service, the outgoing service."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._locks: list[DirLock] = []
        self.listen_port = 0
        try:
            self._open()
        except UnsafePathError as exc:
            self._failed_start()
            raise AgentError(str(exc)) from None
        except BaseException:
            self._failed_start()
            raise
        self.outgoing = OutgoingService(self.store, self.registry, self._connect_migration, self._connect_recovery,
                                        lambda: self.cfg.in_doubt_wait)
        self.registry.migrating = self.outgoing.migrating
        limits = IncomingLimits(cfg.max_incoming, cfg.max_incoming_memory, cfg.max_incoming_per_peer,
                                cfg.max_incoming_memory_per_peer or cfg.max_incoming_memory // 2,
                                cfg.incoming_deadline_per_gib, cfg.max_connections, cfg.handshake_rate,
                                cfg.session_rate)
        self.incoming = IncomingService(self.channel_config, self.store, self.identity.signing, self.registry,
                                        limits, cfg.accept_qemu and self.confinement.refusal is None)
        self.cluster = AgentCluster(self)  # the peer gate; with --etcd the cluster member, with --metrics those

    def _open(self) -> None:
        """Takes the state directory (one agent per directory), then keys,
        certificate, store and memory directory; every path ours or refused."""
        cfg = self.cfg
        if not cfg.state_dir.exists() and not cfg.state_dir.is_symlink():
            raise AgentError(f"state directory {cfg.state_dir} does not exist "
                             f"(run: palm keygen --dir {cfg.state_dir} --name NAME)")
        # From here on, the verified real paths (a symlink on the way is not followed later).
        self.state_dir = d = verify_dir(cfg.state_dir, "state directory")
        self._locks.append(DirLock(d, "state directory"))
        self.run_dir = ensure_dir(cfg.run_dir or default_run_dir(d), "run directory")
        if len(str(self.run_dir)) > MAX_RUN_DIR:
            raise AgentError(f"run directory {self.run_dir} is longer than {MAX_RUN_DIR} characters "
                             "(Unix socket paths are short); choose a shorter --run-dir")
        control = cfg.control or default_control(d)
        self.control_path = ensure_dir(control.parent, CONTROL_DIR) / control.name
        if not (d / IDENTITY_FILE).exists() and not (d / IDENTITY_FILE).is_symlink():
            raise AgentError(f"no agent identity in {d} (run: palm keygen --dir {d} --name NAME, "
                             f"then: palm ca issue --ca CA_DIR --agent {d})")
        try:
            self.identity = AgentIdentity.load(d)
            self.authority_pub = load_authority_public(cfg.ca_pub)
        except KeyFileError as exc:
            raise AgentError(str(exc)) from None
        try:
            self.certificate = Certificate.decode(read_nofollow(d / CERT_FILE, 1 << 16))
        except (OSError, UnsafePathError):
            raise AgentError(f"no certificate at {d / CERT_FILE} "
                             f"(run: palm ca issue --ca CA_DIR --agent {d})") from None
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
        self.confinement = Confinement.for_agent(cfg.qemu_uids, cfg.qemu_unconfined)
        self.store = HandoffStore(d / "state.db")
        images = ensure_dir(cfg.images_dir, "images directory") if cfg.images_dir is not None else None
        self.registry = VmRegistry(self.memory_dir, self.run_dir, self.sealing_key, self.store, self.confinement,
                                   cfg.qemu_accel, migrating=lambda name: False, state_dir=d, images_dir=images)

    def _failed_start(self) -> None:
        """A start that failed leaves nothing it made: an empty memory directory of its own
        goes (the next start makes a new one), the locks are released."""
        if getattr(self, "memory_dir", None) is not None:
            self._remove_empty_memory_dir()
        self._release_locks()

    def _release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    # -- state directory ----------------------------------------------------

    def _sealing_key(self) -> bytes:
        path = self.state_dir / "hv.key"
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
        record = self.state_dir / "memory-dir"
        mdir: Path | None = None
        if self.cfg.memory_dir is not None:
            # Checked before the directory is made: one that vanished is not made anew silently.
            to_move = check_start(self.state_dir, Path(os.path.realpath(self.cfg.memory_dir)), self.cfg.adopt_vms)
            mdir = ensure_dir(self.cfg.memory_dir, "memory directory")
        else:
            if record.exists() or record.is_symlink():
                recorded = Path(read_nofollow(record, 4096).decode().strip())
                if recorded.is_symlink() or (recorded.exists() and recorded.lstat().st_uid != os.geteuid()):
                    # Not ours: someone planted the name while it was gone (a reboot
                    # empties /dev/shm).  Its VMs, if any, are not to be trusted: a new one.
                    log.warning("recorded memory directory is not this agent's; making a new one",
                                dir=str(recorded))
                elif recorded.exists():
                    mdir = verify_dir(recorded, "memory directory")
            to_move = check_start(self.state_dir, mdir, self.cfg.adopt_vms)  # before a new one is made
            if mdir is None:  # first start, or the host rebooted (tmpfs emptied)
                shm = Path("/dev/shm")  # noqa: S108 - the directory made inside is ours alone (hostfs)
                mdir = (make_private_dir(shm, f"palm-{os.geteuid()}-") if shm.is_dir()
                        else ensure_dir(self.state_dir / "vms", "memory directory"))
        # Never lose sight of the VMs the state records (in another directory, or one gone).
        adopt_vms(self.state_dir, to_move, mdir)
        write_atomic(record, (str(mdir) + "\n").encode())
        return mdir

    # -- network --------------------------------------------------------------

    async def _connect(self, addr: str, purpose: Purpose, mode: TransportMode = TransportMode.SECURE,
                       cipher: CipherName | None = None) -> SecureChannel:
        host, port = parse_hostport(addr)
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"no answer within {self.cfg.handshake_timeout:g} s") from None
        except OSError as exc:  # trio's "all attempts failed": say why the first one did
            causes = exc.__cause__.exceptions if isinstance(exc.__cause__, BaseExceptionGroup) else ()
            why = next((os.strerror(e.errno) for e in causes if isinstance(e, OSError) and e.errno), None)
            raise OSError(exc.errno, why or exc.strerror or str(exc)) from None
        try:
            return await connect(stream, self.channel_config, purpose=purpose, mode=mode, cipher=cipher)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise

    async def _connect_recovery(self, addr: str) -> SecureChannel:
        return await self._connect(addr, Purpose.RECOVERY)

    async def _connect_migration(self, addr: str, plain: bool, cipher: CipherName | None,
                                 purpose: Purpose = Purpose.MIGRATION) -> SecureChannel:
        """A MIGRATION session, or one of its DATA sessions (proto 7.8)."""
        if not self.incoming.accepting:
            raise AgentError("agent is shutting down")
        mode = TransportMode.PLAIN_BENCHMARK if plain else TransportMode.SECURE
        channel = await self._connect(addr, purpose, mode, cipher)
        if channel.result.peer.static_pub == self.identity.static.public:
            with trio.move_on_after(1):
                await channel.aclose()
            raise AgentError(f"{addr} is this agent ({self.identity.name}): a VM cannot migrate to the agent "
                             "it runs on")
        await self.cluster.check_outgoing(channel)  # revoked, or not allowed by the cluster's list
        return channel

    # -- the service ----------------------------------------------------------

    @property
    def vms(self) -> dict[str, Any]:
        return self.registry.vms

    @property
    def ciphers(self) -> tuple[CipherName, ...]:
        return self.cfg.ciphers

    def status(self) -> dict[str, Any]:
        inc = self.incoming
        out = {"agent": self.identity.name, "listen_port": self.listen_port, "vms": len(self.registry),
               "measurement": self.measurement.hex(), "accepting": inc.accepting, "incoming": len(inc.runs),
               "connections": inc.connections, "counters": dict(inc.counters),
               "committed_not_running": dict(self.registry.not_running)}
        cluster = self.cluster.status()
        if cluster is not None:
            out["cluster"] = cluster
        return out

    async def destinations(self, vm_name: str) -> dict[str, Any]:
        """Where `palm migrate VM --to NAME|auto` may go (palm_net.agent.clustering)."""
        return await self.cluster.destinations(vm_name)

    async def abandon(self, mid_hex: str, reason: str) -> dict[str, Any]:
        """`palm migrate --resolve ID --abandon --reason WHY`: a post-copy migration whose other
        host is lost, declared lost here (palm_net.agent.abandon)."""
        return await abandon.abandon(self.store, self.registry, self.outgoing, self.incoming, mid_hex, reason)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_hostport(self.cfg.listen)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            self._closed_unstarted()
            raise AgentError(f"cannot listen on {self.cfg.listen}: {exc.strerror or exc}") from None
        self.listen_port = listeners[0].socket.getsockname()[1]
        control = ControlServer(self, self.control_path)
        try:
            await control.bind()
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            self._closed_unstarted()
            raise
        try:
            self.registry.load()
            pruned = self.store.prune()
            log.info("agent started", agent=self.identity.name, listen=f"{host}:{self.listen_port}",
                     control=str(self.control_path),
                     qemu_confinement="seccomp, own uid and empty root per VM" if self.confinement.uids
                     else "UNCONFINED: seccomp only, the agent's uid and / (--qemu-unconfined)"
                     if self.confinement.allow_unconfined else "none: QEMU guests refused (agent not root)",
                     measurement=self.measurement.hex()[:16], vms=len(self.registry), pruned_rows=pruned,
                     guest_memory=f"{self.memory_dir}: {memory_backing(self.memory_dir)}")
            async with trio.open_nursery() as nursery:
                self.outgoing.nursery = nursery
                for mid in self.outgoing.in_doubt():
                    nursery.start_soon(self.outgoing.recover, mid)
                nursery.start_soon(control.serve)
                nursery.start_soon(self._prune)
                nursery.start_soon(self._activations)
                await self.cluster.start(nursery)
                await nursery.start(trio.serve_listeners, self.incoming.handle, listeners)
                task_status.started(self)
        finally:
            self.close()
            control.close()

    async def _prune(self) -> None:
        while True:
            await trio.sleep(PRUNE_EVERY)
            self.store.prune()

    async def _activations(self) -> None:
        """What failed to happen to a VM after its migration, retried with back-off (1 s
        doubling to a minute): committed VMs activated, the source's resumed, handed-over
        copies scrubbed; until they are, or the operator acts there."""
        reg, delay = self.registry, ACTIVATION_RETRY[0]
        while True:
            if not reg.not_running and not reg.to_scrub:
                reg.retry_wanted = trio.Event()
                await reg.retry_wanted.wait()
                delay = ACTIVATION_RETRY[0]
            await trio.sleep(delay)
            for name in list(reg.not_running):
                vm = reg.vms.get(name)
                if vm is None or reg.migrating(name):
                    continue
                try:
                    reg.activated(vm, await trio.to_thread.run_sync(reg.activate, vm))
                except STORAGE_ERRORS as exc:  # the state database failed too: next time
                    log.warning("retry failed", vm=name, error=describe_error(exc))
            for mid, gone in list(reg.to_scrub.items()):
                try:
                    await trio.to_thread.run_sync(self.store.scrub_handed_over, mid, gone)
                except STORAGE_ERRORS as exc:
                    log.warning("scrub of a handed-over copy failed again", vm=gone.name, error=describe_error(exc))
                    continue
                del reg.to_scrub[mid]
                log.info("handed-over copy scrubbed", vm=gone.name, migration=mid.hex())
            delay = min(delay * 2, ACTIVATION_RETRY[1])

    def close(self) -> None:
        self.incoming.stop_accepting()
        self.registry.close()
        self.store.close()
        self._remove_empty_memory_dir()
        self._release_locks()
        log.info("agent stopped", agent=self.identity.name)

    def _closed_unstarted(self) -> None:
        """serve() failed before the agent started: closed as at a stop, without saying it stopped."""
        self.registry.close()
        self.store.close()
        self._failed_start()

    def _remove_empty_memory_dir(self) -> None:
        """A memory directory the agent made itself and that holds no VM goes at a
        clean stop (the next start makes a new one); one named by --memory-dir stays."""
        if self.cfg.memory_dir is not None:
            return
        try:
            if {p.name for p in self.memory_dir.iterdir()} == {LOCK_FILE}:
                (self.memory_dir / LOCK_FILE).unlink()
                self.memory_dir.rmdir()
        except OSError as exc:
            log.warning("memory directory left in place", dir=str(self.memory_dir), error=exc.strerror)


async def run_agent(cfg: AgentConfig) -> None:
    """Runs until SIGINT/SIGTERM; in-flight migrations end by the handoff rules."""
    bound_malloc()  # this process is an agent from now on
    freeze_heap()  # its modules, classes and functions: never walked by a full collection (not its VMs)
    try:
        drill = faultdrill.from_environment()
    except ValueError as exc:
        raise AgentError(str(exc)) from None
    if drill is not None:
        log.warning("FAULT DRILL: this agent fails on purpose at one step (PALM_FAULT); never in production",
                    fault=drill)
    agent = Agent(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve)
        release_free_memory()  # what start-up freed (compiling modules, loading the state): ~2 MiB
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                log.info("shutting down", signal=signal.Signals(sig).name)
                agent.incoming.stop_accepting()
                if agent.incoming.committing:
                    log.warning("waiting for commit windows in progress before stopping",
                                sessions=agent.incoming.committing)
                nursery.cancel_scope.cancel()
                break
