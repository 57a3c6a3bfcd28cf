"""Real VMs: QEMU processes started and owned by the agent, driven over QMP.

QEMU's own live migration carries the VM (RAM rounds, device and CPU state);
palm_net carries QEMU's byte stream and adds what QEMU lacks: attestation of
the peer and the one-copy handoff.  The stream passes through a socket pair
whose QEMU end is handed over QMP (``getfd``, then ``migrate fd:`` /
``migrate-incoming fd:``), so no file-system name exists that anyone could
plant or connect to.  More channels (QEMU's multifd, which QEMU 7.2 takes only
on socket URIs) pass through a Unix socket in QEMU's root, open to QEMU's uid
only while the streams connect, each end checked to be this VM's QEMU.  The destination QEMU is started paused with ``-S
-incoming defer``; it stays paused until COMMIT (``cont``); the source stays
paused ("postmigrate") until the handoff rules let it run again or quit it.

A destination QEMU parses a byte stream chosen by another host (QEMU's own
security documentation treats migration streams as untrusted), so every
QEMU is confined (docs/SECURITY.md): seccomp (``-sandbox``), and, when the
agent runs as root, its own unprivileged uid and a chroot into an empty
directory.  Guest RAM is a file in the VM's directory that QEMU opens before
it drops its privileges (``memory-backend-file``, shared), so the agent
reads guest memory for digests directly and reserves its space up front.

A QEMU VM outlives its agent, like a model VM: the agent finds it again by
its directory (vm.json with the pid) and reconnects to its QMP socket.

QEMU VMs have no VMM-protected processes here: that protection is the
embedded model's.  What crosses the wire from a QEMU source is its migration
stream (plaintext guest memory, as QEMU's TLS mode would carry it), sealed
record by record in the attested session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import mmap
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack

from palm_net.hostfs import (
    UnsafePathError,
    create_exclusive,
    make_private_dir,
    open_nofollow,
    read_nofollow,
    reserve,
    reserves_natively,
    verify_dir,
)
from palm_net.hypervisor.backend import DIGEST_PERSON, PAGE_SIZE, HypervisorError, VerifyReport, VmInfo
from palm_net.hypervisor.qmp import QmpClient, QmpError
from palm_net.hypervisor.reserver import Reserver
from palm_net.hypervisor.vmconfig import ConfiguredVM

MIB = 1 << 20
MAX_MEMORY_MIB = 1 << 20  # 1 TiB, the protocol's guest limit
MAX_VCPUS = 64
MAX_ARGS = 32
MAX_ARG_LEN = 256
MAX_SPEC = 4096
QMP_TIMEOUT = 30.0
STREAM_TIMEOUT = 30.0  # longest silence of QEMU's migration stream
# QEMU writes ahead while a batch is sealed (200 KiB by default); not much more:
# what is in flight when QEMU pauses the guest is loaded inside the downtime.
STREAM_SOCKET_BUFFER = 1 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # as root: past net.core.wmem_max
# Options palm_net sets itself; a VM's extra arguments may not repeat them.
OWN_OPTIONS = frozenset({"-machine", "-M", "-m", "-smp", "-accel", "-enable-kvm", "-qmp", "-monitor", "-incoming",
                         "-S", "-daemonize", "-pidfile", "-name", "-nodefaults", "-display", "-serial", "-mon",
                         "-runas", "-chroot", "-sandbox", "-mem-path", "-mem-prealloc"})
# Options that name host resources (files, sockets, backends, disks, networks):
# they could not be recreated on another host from the wire.
HOST_OPTIONS = frozenset({"-chardev", "-readconfig", "-writeconfig", "-object", "-drive", "-blockdev", "-netdev",
                          "-nic", "-net", "-kernel", "-initrd", "-append", "-bios", "-fw_cfg", "-plugin", "-trace",
                          "-D", "-L", "-hda", "-hdb", "-cdrom", "-fsdev", "-virtfs", "-audiodev", "-spice", "-vnc",
                          "-add-fd", "-option-rom", "-global", "-set", "-run-with"})
# What a destination accepts from the wire: devices that use no host
# resource, each with the properties it may set (every PCI device also has
# ``romfile``, which names a host file: never from the wire).
COMMON_DEVICE_PROPS = frozenset({"id", "bus", "addr", "multifunction"})
WIRE_DEVICES: dict[str, frozenset[str]] = {
    "virtio-rng-pci": frozenset({"max-bytes", "period"}),
    "virtio-balloon-pci": frozenset({"deflate-on-oom", "free-page-reporting"}),
    "pvpanic": frozenset({"ioport", "events"}),
    "isa-debug-exit": frozenset({"iobase", "iosize"}),
    "edu": frozenset({"dma_mask"}),
    "pci-testdev": frozenset({"membar"}),
    "i6300esb": frozenset(),
}
RTC_PROPS = frozenset({"base", "clock", "driftfix"})
WIRE_OPTIONS = frozenset({"-cpu", "-device", "-rtc"})
# The generic loader fills guest memory from a host file at reset: the
# source's own business (the incoming stream overwrites that memory anyway).
# QEMU opens that file before it drops root, so it never gets a path: the
# agent opens a file of its images directory itself and QEMU gets the
# descriptor (/proc/self/fd/N); any other host file is refused.
LOCAL_DEVICES = frozenset({"loader"})
LOADER_PROPS = frozenset({"file", "addr", "force-raw", "cpu-num", "data", "data-len"})
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,=:+-]{1,256}")
# seccomp: no obsolete calls, no new processes, no resource control.
# elevateprivileges stays "allow" only where QEMU must drop root itself
# (-runas): QEMU 7.2 installs the filter before it calls setgid/setuid, and
# "deny" kills it there; after that drop no set*id call can regain anything.
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges="
# Dynamic uids for confined QEMUs (one per VM), away from users and from
# systemd's dynamic range; --qemu-uids changes them.
DEFAULT_UIDS = (2_000_000_000, 65536)
GUEST_RAM = "guest.ram"
STREAM_FD = "palm-migration"
# More channels (QEMU's multifd, proto 7.8): QEMU 7.2 takes multifd only on socket
# URIs, so its streams pass through a Unix socket in a directory of its empty root
# that only root and the VM's own uid can reach (relative: QEMU's working directory
# is that root, chrooted or not).  The first bytes of each stream say which it is.
CHANNELS_DIR = "m"
MAIN_MAGIC = b"QEVM"  # QEMU's migration stream
MULTIFD_MAGIC = bytes.fromhex("11223344")  # a multifd channel's first packet
ACCEPT_POLL = 0.5  # the source asks QEMU how its migration goes this often while it waits for a stream


class QemuError(HypervisorError):
    """A QEMU VM cannot be created, driven or migrated; the message is one line."""


# --------------------------------------------------------------------------
# What the hypervisor rewrites on load: kvmclock areas, found in the stream
#
# Under KVM a guest that uses kvmclock tells the host, per vCPU, where its
# pvclock structure is (MSR_KVM_SYSTEM_TIME_NEW: address | enable bit) and,
# once, where its wall clock structure is (MSR_KVM_WALL_CLOCK_NEW).  When the
# destination's QEMU loads the CPU state it writes these MSRs back into KVM,
# and the destination's kernel rewrites both structures in guest RAM (their
# version fields, the TSC-stable flag): so RAM there differs from the
# source's in exactly these bytes.  Their addresses are in the migration
# stream itself: its last part is QEMU's description of the device state it
# carries (the "vmdesc" JSON: each device section's fields with their sizes),
# preceded by the device sections; the CPU sections hold env.system_time_msr
# and env.wall_clock_msr.  Both agents carry the same stream, so both find the
# same areas, and each leaves them out of its digest (proto/PROTOCOL.md 7.7).

TAIL_BYTES = 16 << 20  # the end of the stream kept: device state and its description
PVCLOCK_SIZE = 32  # struct pvclock_vcpu_time_info
WALL_CLOCK_SIZE = 12  # struct pvclock_wall_clock
VM_EOF, VM_SECTION_FULL, VM_SUBSECTION, VM_VMDESCRIPTION, VM_SECTION_FOOTER = 0x00, 0x04, 0x05, 0x06, 0x7E


class StreamTail:
    """The last ``limit`` bytes of a migration stream, in a ring: each read is copied
    in (the stream passes through buffers that are used again), nothing else is kept
    or allocated per read, and the end is searched from its last bytes outwards, so
    the guest's pause pays for the device state, not for the whole ring."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        if limit < 1:
            raise ValueError("a stream tail keeps at least one byte")
        self.limit = limit
        # Mapped, not a bytearray: its pages come as the stream fills them, where a
        # bytearray's 16 MiB were cleared before QEMU's migration could start.
        self._ring = mmap.mmap(-1, limit, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._end = 0  # where the next byte goes
        self.size = 0  # bytes held (at most limit)

    def add(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as whole, whole.cast("B") as view:  # (bytes, whatever the view's items)
            if len(view) >= self.limit:
                view = view[len(view) - self.limit :]
            n, end = len(view), self._end
            first = min(n, self.limit - end)
            self._ring[end : end + first] = view[:first]
            self._ring[: n - first] = view[first:]
            self._end = (end + n) % self.limit
            self.size = min(self.limit, self.size + n)

    def last(self, n: int) -> bytes:
        """The last ``n`` bytes held (all of them if fewer), in stream order."""
        n, end = min(n, self.size), self._end
        if n <= end:
            return bytes(self._ring[end - n : end])
        return bytes(self._ring[self.limit - (n - end) :]) + bytes(self._ring[:end])

    def bytes(self) -> bytes:
        return self.last(self.size)

    def clock_areas(self) -> list[tuple[int, int, str]] | None:
        """kvmclock_areas of the stream's end: tried on its last 256 KiB, then on four
        times more until the whole tail; the same answer as on the whole tail, since the
        parse trusts only the last description whose length reaches the end exactly."""
        window = 256 << 10
        while True:
            areas = kvmclock_areas(self.last(window))
            if areas is not None or window >= self.size:
                return areas
            window *= 4


class StreamSocket(socket.socket):
    """The source's end of QEMU's migration stream; read_stream keeps its tail (the main
    stream's: its end holds the CPU state)."""

    tail: StreamTail | None = None
    head = b""  # its first bytes, read already (to tell the stream apart) and not yet passed on


def _field_size(field: dict[str, Any]) -> int:
    """A described field's bytes; ValueError for a negative size or count (QEMU writes
    none: with one, an offset could point back from the end, and a parse of the last
    bytes would read other bytes than a parse of the whole tail)."""
    size, count = int(field["size"]), int(field.get("array_len", 1))
    if size < 0 or count < 0:
        raise ValueError("a negative field size in QEMU's device description")
    return size * count


def _fields_size(desc: dict[str, Any]) -> int:
    return sum(_field_size(f) for f in desc.get("fields", []))


def _subsections_size(desc: dict[str, Any]) -> int:
    return sum(2 + len(str(s["vmsd_name"]).encode()) + 4 + _fields_size(s) + _subsections_size(s)
               for s in desc.get("subsections", []))


def kvmclock_areas(tail: bytes) -> list[tuple[int, int, str]] | None:
    """(guest-physical address, size, what) of each kvmclock structure named by the CPU
    state at the end of a QEMU migration stream; None if the end of the stream is not
    what QEMU writes (then nothing is left out of a digest: it fails closed)."""
    try:
        # ... QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION, be32 length, the JSON, end of stream.
        at = len(tail)
        while True:
            at = tail.rfind(bytes([VM_EOF, VM_VMDESCRIPTION]), 0, at)
            if at < 0:
                return None
            if int.from_bytes(tail[at + 2 : at + 6], "big") == len(tail) - at - 6:
                break
        desc = json.loads(tail[at + 6 :])
        devices = desc["devices"]
        # Each device section: FULL, be32 id, u8 len, idstr, be32 instance, be32 version,
        # its fields, its subsections (SUBSECTION, u8 len, name, be32 version, fields), FOOTER, be32 id.
        sizes = [14 + len(str(d["name"]).encode()) + _fields_size(d) + _subsections_size(d) + 5 for d in devices]
        pos = at - sum(sizes)
        if pos < 0:
            return None
        areas: list[tuple[int, int, str]] = []
        for dev, size in zip(devices, sizes):
            name = str(dev["name"]).encode()
            header = bytes([VM_SECTION_FULL]) + tail[pos + 1 : pos + 5] + bytes([len(name)]) + name + \
                int(dev["instance_id"]).to_bytes(4, "big") + int(dev["version"]).to_bytes(4, "big")
            if tail[pos : pos + len(header)] != header or tail[pos + size - 5] != VM_SECTION_FOOTER:
                return None  # not the layout the description gives: trust none of it
            if dev["name"] == "cpu":
                off = pos + len(header)
                for f in dev.get("fields", []):
                    n = _field_size(f)
                    value = int.from_bytes(tail[off : off + 8], "big") if f["size"] == 8 else 0
                    cpu = int(dev["instance_id"])
                    if f["name"] == "env.system_time_msr" and value & 1:
                        areas.append((value & ~1, PVCLOCK_SIZE, f"kvmclock of vCPU {cpu}"))
                    elif f["name"] == "env.wall_clock_msr" and value:
                        areas.append((value, WALL_CLOCK_SIZE, "kvmclock wall clock"))
                    off += n
            pos += size
        return sorted(set(areas))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, RecursionError):
        return None


def migration_figures(info: dict[str, Any], digest_excluded: list[str]) -> dict[str, Any]:
    """QEMU's query-migrate answer as the migration record keeps it (MigrationStats.hypervisor):
    times in ms, its round count, what it sent; ``digest_excluded``: the kvmclock
    areas left out of the digest (proto 7.7)."""
    ram = info.get("ram") or {}
    return {"status": info.get("status"), "total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"), "rounds": ram.get("dirty-sync-count"),
            "transferred": ram.get("transferred"), "duplicate_pages": ram.get("duplicate"),
            "normal_pages": ram.get("normal"), "mbps": ram.get("mbps"), "digest_excluded": digest_excluded}


def read_stream(conn: socket.socket, out: memoryview) -> tuple[int, bool]:
    """The next bytes of a migration stream into ``out``: waits for some, then takes
    what else QEMU has written already (up to ``len(out)``; not waiting to fill it,
    so the last bytes before QEMU's pause go on at once).  How many, and whether
    the stream ended.  Blocking: for a worker thread."""
    filled = 0
    try:
        if isinstance(conn, StreamSocket) and conn.head:  # its first bytes, read to tell it apart
            filled = min(len(conn.head), len(out))
            out[:filled], conn.head = conn.head[:filled], conn.head[filled:]
        else:
            n = conn.recv_into(out)  # waits (up to the socket's timeout) for some
            if n == 0:
                return 0, True
            filled = n
        # Then only what is there already.  Not MSG_DONTWAIT: on a socket with a
        # timeout Python waits for readiness first whatever the flags, so the reads
        # went on until the buffer was full, and the last megabyte of the stream
        # (QEMU's zero-page markers come slowly) was held back to the guest's pause.
        ready = select.poll()
        ready.register(conn, select.POLLIN)
        while filled < len(out) and ready.poll(0):
            n = conn.recv_into(out[filled:])
            if n == 0:
                return filled, True
            filled += n
    except OSError as exc:
        raise QemuError(f"QEMU migration stream: {exc.strerror or exc}") from None
    finally:
        if isinstance(conn, StreamSocket) and conn.tail is not None:
            conn.tail.add(out[:filled])
    return filled, False


def read_head(conn: socket.socket, n: int, deadline: float) -> bytes:
    """A stream's first ``n`` bytes (fewer only at its end), read: its first write may
    come in pieces.  QemuError after ``deadline``."""
    head = b""
    while len(head) < n:
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            got = conn.recv(n - len(head))
        except TimeoutError:
            raise QemuError("QEMU's migration stream said nothing") from None
        if not got:
            break
        head += got
    return head


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def parse_qemu_version(banner: str) -> tuple[int, int]:
    """(major, minor) from ``qemu-system-x86_64 --version``'s first line; (0, 0) if none."""
    found = re.match(r"QEMU emulator version (\d+)\.(\d+)", banner)
    return (int(found[1]), int(found[2])) if found else (0, 0)


_versions: dict[tuple[str, int, int, int], tuple[int, int]] = {}  # by the binary's path, inode and mtime


def _binary_version(binary: str) -> tuple[int, int]:
    """A binary's QEMU version, asked once per file (an upgrade in place is a new one);
    (0, 0), not remembered, where it cannot be read now."""
    try:
        st = os.stat(binary)
        key = (binary, st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in _versions:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=QMP_TIMEOUT,
                                 stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                                 check=False).stdout
            version = parse_qemu_version(out)
            if version == (0, 0):
                return version
            _versions[key] = version
        return _versions[key]
    except (OSError, subprocess.SubprocessError):
        return (0, 0)


def skips_unsent_zero_pages() -> bool:
    """QEMU 9.0+ on multifd finds zero pages at the source and, at the destination,
    leaves a page it has not received alone (``multifd_recv_zero_page_process``),
    where its main stream reads every zero page it is sent (``ram_handle_zero``)."""
    return qemu_version() >= (9, 0)


def qemu_version() -> tuple[int, int]:
    """(major, minor) of the QEMU found, (0, 0) if none or unreadable: what its
    command line and its migration's options may use (-run-with chroot= from 8.1,
    -chroot gone in 9.0; -run-with user= from 9.1, -runas gone in 10.0; 9.0 skips
    zero pages it never received on multifd).  Blocking (it may run the binary)."""
    binary = qemu_binary()
    return _binary_version(binary) if binary else (0, 0)


KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


def kvm_usable() -> bool:
    """/dev/kvm opens and really creates a VM (it may exist where nested
    virtualisation is off, and QEMU would then fail to start)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) != 12:
            return False
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def default_accel() -> str:
    return "kvm" if kvm_usable() else "tcg"


# --------------------------------------------------------------------------
# Arguments: what the operator may add, and what may cross the wire


def _check_props(opt: str, what: str, props: list[str], allowed: frozenset[str]) -> None:
    seen: set[str] = set()
    for prop in props:
        key, eq, _ = prop.partition("=")
        if not eq or key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise QemuError(f"QEMU argument {opt} {what}: property {key!r} is not allowed "
                            f"(allowed: {names}; nothing that names a host file or resource)")
        if key in seen:  # QEMU takes the last one: a second file= would bypass every check of the first
            raise QemuError(f"QEMU argument {opt} {what}: property {key!r} given twice")
        seen.add(key)


def _check_wire_value(opt: str, value: str) -> None:
    """A -device, -rtc or -cpu value that may cross the wire: no host resource in it."""
    if not SAFE_VALUE.fullmatch(value):
        raise QemuError(f"QEMU argument {opt} {value[:60]}: only letters, digits and _.,=:+- are allowed")
    if opt == "-device":
        driver, *props = value.split(",")
        if driver not in WIRE_DEVICES:
            raise QemuError(f"QEMU device {driver[:40]} cannot migrate (allowed: "
                            f"{', '.join(sorted(WIRE_DEVICES))}, and -device loader on the source)")
        _check_props(opt, driver, props, WIRE_DEVICES[driver] | COMMON_DEVICE_PROPS)
    elif opt == "-rtc":
        _check_props(opt, "", value.split(","), RTC_PROPS)


def open_loader_files(local: list[str], images_dir: Path | None) -> tuple[list[str], list[int]]:
    """The source-only arguments with each loader ``file=`` replaced by a descriptor
    the agent opened itself: a regular file directly in ``images_dir`` (named by
    its file name, or by a path whose directory is that one), never through a
    symlink.  Returns the arguments and the descriptors to pass (the caller closes
    them); QemuError names the first file refused."""
    out: list[str] = []
    fds: list[int] = []
    dir_fd: int | None = None
    try:
        for arg in local:
            props = arg.split(",")
            files = [i for i, prop in enumerate(props) if prop.startswith("file=")]
            if props[0] != "loader" or not files:
                out.append(arg)
                continue
            if images_dir is None:
                raise QemuError("-device loader,file=... needs the agent's --images-dir: QEMU opens the file as "
                                "root, so it may load only what that directory holds")
            named = props[files[0]].removeprefix("file=")
            parent, leaf = os.path.split(named)
            if not leaf or leaf in (".", "..") or (parent and os.path.realpath(parent) != str(images_dir)):
                raise QemuError(f"loader file {named[:80]!r} is not in the images directory {images_dir}")
            if dir_fd is None:
                dir_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise QemuError(f"loader file {leaf!r} in {images_dir}: {exc.strerror or exc}") from None
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise QemuError(f"loader file {leaf!r} in {images_dir} is not a regular file")
            props[files[0]] = f"file=/proc/self/fd/{fd}"
            out.append(",".join(props))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return out, fds


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Splits a VM's extra QEMU arguments into (wire, local) option/value pairs.

    Raises QemuError naming the first argument that is neither migratable
    nor a source-only device."""
    if len(args) > MAX_ARGS:
        raise QemuError(f"at most {MAX_ARGS} extra QEMU arguments")
    wire: list[str] = []
    local: list[str] = []
    i = 0
    while i < len(args):
        opt = args[i]
        if opt in OWN_OPTIONS:
            raise QemuError(f"QEMU option {opt} is set by palm_net itself")
        if opt in HOST_OPTIONS:
            raise QemuError(f"QEMU option {opt} names a host resource; such a VM cannot migrate (see docs/QEMU.md)")
        if opt not in WIRE_OPTIONS:
            raise QemuError(f"QEMU option {opt[:40]} cannot migrate (allowed: -cpu MODEL, -rtc ..., -device ...)")
        if i + 1 >= len(args):
            raise QemuError(f"QEMU option {opt} needs a value")
        value = args[i + 1]
        if len(value) > MAX_ARG_LEN:
            raise QemuError(f"QEMU argument for {opt} is longer than {MAX_ARG_LEN} characters")
        if opt == "-device" and value.split(",", 1)[0] in LOCAL_DEVICES:
            _check_props(opt, "loader", value.split(",")[1:], LOADER_PROPS)
            local += [opt, value]
        else:
            _check_wire_value(opt, value)
            wire += [opt, value]
        i += 2
    return wire, local


@dataclass(frozen=True)
class QemuSpec:
    """The machine a destination must start to receive the stream (BEGIN's ``spec``)."""

    memory_mib: int
    vcpus: int
    machine: str
    accel: str
    args: tuple[str, ...] = field(default=())

    def encode(self) -> bytes:
        out: bytes = msgpack.packb({"memory_mib": self.memory_mib, "vcpus": self.vcpus, "machine": self.machine,
                                    "accel": self.accel, "args": list(self.args)}, use_bin_type=True)
        return out

    @classmethod
    def decode(cls, blob: bytes) -> QemuSpec:
        """Strict parse of a spec from the wire; QemuError on anything unexpected."""
        if len(blob) > MAX_SPEC:
            raise QemuError("QEMU spec too large")
        try:
            obj = msgpack.unpackb(blob, raw=False, max_array_len=MAX_ARGS, max_map_len=8, max_str_len=MAX_ARG_LEN,
                                  max_bin_len=0, max_ext_len=0, strict_map_key=True)
        except Exception:
            raise QemuError("QEMU spec is not msgpack") from None
        keys = {"memory_mib", "vcpus", "machine", "accel", "args"}
        if type(obj) is not dict or set(obj) != keys:
            raise QemuError(f"QEMU spec must have exactly {sorted(keys)}")
        mem, vcpus, machine, accel, args = (obj[k] for k in ("memory_mib", "vcpus", "machine", "accel", "args"))
        if type(mem) is not int or not 1 <= mem <= MAX_MEMORY_MIB:
            raise QemuError("QEMU spec: memory out of bounds")
        if type(vcpus) is not int or not 1 <= vcpus <= MAX_VCPUS:
            raise QemuError("QEMU spec: vcpus out of bounds")
        if machine not in ("pc", "q35"):
            raise QemuError("QEMU spec: machine must be pc or q35")
        if accel not in ("kvm", "tcg"):
            raise QemuError("QEMU spec: accel must be kvm or tcg")
        if type(args) is not list or not all(type(a) is str for a in args):
            raise QemuError("QEMU spec: args must be a list of strings")
        wire, local = split_args(args)
        if local:
            raise QemuError("QEMU spec: source-only devices cannot be sent")
        return cls(mem, vcpus, machine, accel, tuple(wire))


def process_name(vm_id: bytes) -> str:
    """QEMU's -name for a VM: opaque (every local user reads /proc/PID/cmdline), the
    same for every copy of the VM (its identity, not its reusable name)."""
    return f"palm-{vm_id.hex()[:16]}"


def live_processes(vm_id: bytes) -> list[int]:
    """Live (not zombie) QEMU processes of the VM with this identity, host-wide
    (tests and drills check there is exactly one)."""
    marker = process_name(vm_id).encode()  # QEMU's -name, see QemuVM._command
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if marker in (d / "cmdline").read_bytes().split(b"\0") and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _pid_alive(pid: int, marker: str) -> bool:
    """The process exists and is the QEMU with our QMP socket (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


def _uids_in_use() -> set[int]:
    used = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                used.add(d.stat().st_uid)
    return used


_ALLOCATED: dict[int, float] = {}  # uids handed out lately, not yet seen running
_ALLOCATING = threading.Lock()


def allocate_uid(uids: tuple[int, int] = DEFAULT_UIDS) -> int:
    """An unused uid for one confined QEMU: no account has it, no process runs as it,
    and no other VM started here lately was given it (two may start at once)."""
    base, count = uids
    with _ALLOCATING:
        now = time.monotonic()
        for uid in [u for u, t in _ALLOCATED.items() if now - t > 60]:
            del _ALLOCATED[uid]
        in_use = _uids_in_use() | set(_ALLOCATED)
        for _ in range(64):
            uid = base + secrets.randbelow(count)
            if uid in in_use:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                _ALLOCATED[uid] = now
                return uid
    raise QemuError(f"no free uid in {base}..{base + count - 1} for a confined QEMU")


def kill_all_under(root: Path) -> int:
    """Kills the QEMU of every VM directory below ``root`` (test and drill
    clean-up: a QEMU outlives its agent by design).  Returns how many."""
    killed = 0
    for cfg_path in root.rglob("vm.json"):
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict) or config.get("backend") != "qemu" or not config.get("run_dir"):
            continue
        run_dir = Path(str(config["run_dir"]))
        pid = config.get("pid")
        if isinstance(pid, int) and _pid_alive(pid, str(run_dir / "qmp.sock")):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        shutil.rmtree(run_dir, ignore_errors=True)
    return killed


@dataclass(frozen=True)
class Confinement:
    """How this agent confines the QEMUs it starts (docs/SECURITY.md)."""

    uids: tuple[int, int] | None = DEFAULT_UIDS  # None: QEMU keeps the agent's uid (no -runas, no chroot)
    # Without uids QEMU (which parses a peer's stream) would run as the agent, with the
    # host's / and the agent's files in reach: only when the operator said so.
    allow_unconfined: bool = False

    @classmethod
    def for_agent(cls, uids: tuple[int, int] = DEFAULT_UIDS, allow_unconfined: bool = False) -> Confinement:
        """Root can give each QEMU its own uid and an empty root; another user cannot."""
        return cls(uids if os.geteuid() == 0 else None, allow_unconfined)

    @property
    def refusal(self) -> str | None:
        """Why no QEMU may start here, or None."""
        if self.uids is None and not self.allow_unconfined:
            return ("QEMU guests are refused: this agent does not run as root, so QEMU would run as the agent's "
                    "uid with the host's / and the agent's keys in reach; run the agent as root, or accept that "
                    "with --qemu-unconfined")
        return None


# --------------------------------------------------------------------------
# The VM


def blamed_argument(args: list[str], line: str) -> str:
    """The option of ``args`` (with its value) that QEMU's error ``line`` is about, or "":
    QEMU names the option itself (``-cpu foo: ...``) or only a part of its value (``unable
    to find CPU model 'foo'``, ``Property 'host-x86_64-cpu.nosuchflag' not found``)."""
    pairs = [(args[i], args[i + 1]) for i in range(len(args) - 1)
             if args[i].startswith("-") and not args[i + 1].startswith("-")]
    for opt, val in pairs:
        if f"{opt} {val}" in line:
            return f"{opt} {val}"
    best, score = "", 0
    for opt, val in pairs:
        for part in re.split(r"[,=]", val):
            word = part.lstrip("+-")
            if len(word) >= 3 and len(word) > score and re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", line):
                best, score = f"{opt} {val}", len(word)
    return best


def start_failure(tail: str, args: list[str]) -> str:
    """One line for a QEMU that died starting: its last stderr line, the argument it blames."""
    msg = re.sub(r"^\S*qemu-system-\w+: ", "", tail.strip())
    blamed = blamed_argument(args, msg)
    out = f"QEMU did not start: {msg}"
    if blamed and not msg.startswith(blamed):
        out += f" (the argument it blames: {blamed})"
    if "kvm_buf_set_msrs" in msg or "kvm_put_msrs" in msg:
        cpu = next((f"-cpu {v}" for o, v in itertools.pairwise(args) if o == "-cpu"), "the default CPU")
        out += (f" (KVM refused the CPU's MSRs of {cpu}: this host's KVM, nested perhaps, does not support all "
                "it passes through; name a model such as -cpu max, or leave -cpu out)")
    return out


class QemuVM(ConfiguredVM):
    """One QEMU VM owned by the agent.  Thread-safe: QMP calls are serialised."""

    backend = "qemu"

    def __init__(self, vm_dir: Path, config: dict[str, Any]) -> None:
        self.dir = vm_dir
        self.config = config
        self.name: str = config["name"]
        self.vm_id = bytes.fromhex(config["vm_id"])
        self.spec = QemuSpec(config["memory_mib"], config["vcpus"], config["machine"], config["accel"],
                             tuple(config["args"]))
        self.local_args: list[str] = list(config.get("local_args", []))
        self.run_dir = Path(config["run_dir"])  # QMP socket and the empty root: made by us, 0700
        self.qmp_path = str(self.run_dir / "qmp.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self.workload: Any = None  # QEMU guests run their own code
        self.paused_at: float | None = None  # monotonic time QEMU stopped the guest for stop-and-copy
        self._incoming: list[socket.socket] = []  # the destination's ends of the streams, the main one first
        self._tail: StreamTail | None = None  # the end of the stream of the migration under way
        self._areas_due = False  # a stream ended: its kvmclock areas, found at the first digest
        self._areas_lock = threading.Lock()  # (an operator's digest may run beside READY's)
        self._reserver: Reserver | None = None  # its RAM file's helper: reserves (incoming), faults in
        self._ram_reserved = True  # the RAM file was reserved when it was made (else: by _reserver)
        # What this VM's digest leaves out while it is paused for a migration (see kvmclock_areas).
        self.digest_excluded: list[tuple[int, int, str]] = []

    def __repr__(self) -> str:
        return f"QemuVM({self.name!r}, {self.spec.memory_mib} MiB, state={self.state})"

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def _new(cls, vm_dir: Path, run_parent: Path, confine: Confinement, config: dict[str, Any],
             reserve_now: bool = True) -> QemuVM:
        """Makes the VM's directories and its guest RAM file: its space reserved now, or
        (``reserve_now`` False: an incoming VM, on a file system that allocates natively)
        by a helper thread while the stream arrives, see Reserver."""
        vm_dir.mkdir(mode=0o700)
        try:
            run_dir = make_private_dir(run_parent, "")
            os.mkdir(run_dir / "root", 0o500)  # the chroot: empty, and QEMU's uid may not write there
            config["run_dir"] = str(run_dir)
            config["uid"] = allocate_uid(confine.uids) if confine.uids else None
            fd = create_exclusive(vm_dir / GUEST_RAM)
            try:
                reserved = reserve_now or not reserves_natively(fd)  # (else it would race QEMU's writes)
                if reserved:
                    reserve(fd, config["memory_mib"] * MIB, "the guest's memory")
                else:
                    os.ftruncate(fd, config["memory_mib"] * MIB)
            finally:
                os.close(fd)
        except (UnsafePathError, OSError) as exc:
            shutil.rmtree(vm_dir, ignore_errors=True)
            if config.get("run_dir"):
                shutil.rmtree(config["run_dir"], ignore_errors=True)
            raise QemuError(str(exc) if isinstance(exc, UnsafePathError) else
                            f"cannot prepare the VM: {exc.strerror or exc}") from None
        vm = cls(vm_dir, config)
        vm._ram_reserved = reserved
        return vm

    @classmethod
    def create(cls, vm_dir: Path, run_parent: Path, name: str, memory_mib: int, *, vcpus: int = 1,
               args: list[str] | None = None, policy: str = "any", accel: str | None = None, machine: str = "pc",
               confine: Confinement | None = None, images_dir: Path | None = None) -> QemuVM:
        confine = confine or Confinement.for_agent()
        if confine.refusal is not None:
            raise QemuError(confine.refusal)
        if qemu_binary() is None:
            raise QemuError("qemu-system-x86_64 not found (install Debian's qemu-system-x86)")
        if not 1 <= memory_mib <= MAX_MEMORY_MIB:
            raise QemuError("QEMU memory must be between 1 MiB and 1 TiB")
        if not 1 <= vcpus <= MAX_VCPUS:
            raise QemuError(f"vcpus must be between 1 and {MAX_VCPUS}")
        wire, local = split_args(list(args or []))
        config: dict[str, Any] = {
            "backend": "qemu", "name": name, "vm_id": os.urandom(16).hex(), "memory_mib": memory_mib,
            "vcpus": vcpus, "machine": machine, "accel": accel or default_accel(), "args": wire,
            "local_args": local, "state": "running", "policy": policy, "migration": None, "pid": None,
        }
        vm = cls._new(vm_dir, run_parent, confine, config)
        try:
            vm._start(incoming=False, images_dir=images_dir)
        except BaseException:  # whatever failed, nothing of the VM stays behind
            shutil.rmtree(vm.dir, ignore_errors=True)
            shutil.rmtree(vm.run_dir, ignore_errors=True)
            raise
        # Reserved already: its pages cleared now, not at QEMU's first touch (a migration's
        # first pass reads every page the guest never wrote).  Best effort: a speed-up only.
        with contextlib.suppress(OSError, RuntimeError):
            vm._reserver = Reserver(vm.dir / GUEST_RAM, None, memory_mib * MIB, "the guest's memory",
                                    fault_in=True, reserved=True)
        return vm

    @classmethod
    def create_incoming(cls, vm_dir: Path, run_parent: Path, name: str, vm_id: bytes, spec: QemuSpec,
                        migration: bytes | None = None, confine: Confinement | None = None) -> QemuVM:
        """A paused QEMU waiting for the stream (-S -incoming defer); runs only after activate()."""
        confine = confine or Confinement.for_agent()
        if confine.refusal is not None:
            raise QemuError(confine.refusal)
        if qemu_binary() is None:
            raise QemuError("qemu-system-x86_64 not found on the destination")
        if spec.accel == "kvm" and not kvm_usable():
            raise QemuError("the source runs under KVM and /dev/kvm is not usable here")
        config: dict[str, Any] = {
            "backend": "qemu", "name": name, "vm_id": vm_id.hex(), "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus, "machine": spec.machine, "accel": spec.accel, "args": list(spec.args),
            "local_args": [], "state": "incoming", "policy": "any",
            "migration": migration.hex() if migration else None, "pid": None,
        }
        vm = cls._new(vm_dir, run_parent, confine, config, reserve_now=False)
        try:
            # Faulted in at once where QEMU reads every page it is sent; a QEMU that leaves
            # alone those it is not sent data for (9.0+, on multifd) is faulted in only if
            # its stream comes on one channel after all (listen_stream): faulted in from
            # here and called off there, two channels took 3.5 s against 2.0 (4 runs each).
            vm._reserver = Reserver(vm.dir / GUEST_RAM, None, spec.memory_mib * MIB, "the guest's memory",
                                    fault_in=not skips_unsent_zero_pages(), reserved=vm._ram_reserved)
            vm._start(incoming=True)
            vm._q().execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        except BaseException as exc:  # nothing of it stays: its helper stopped, QEMU and files gone
            vm.scrub()
            if isinstance(exc, (QmpError, OSError, RuntimeError)):
                raise QemuError(f"destination QEMU did not start: {exc}") from None
            raise
        return vm

    @property
    def channels_wanted(self) -> int:
        """Two where QEMU skips unsent zero pages on multifd (the main stream and one
        multifd stream): the destination then clears only the pages the guest wrote."""
        return 2 if skips_unsent_zero_pages() else 1

    def listen_stream(self, channels: int) -> None:
        """The incoming QEMU listens for the stream: one channel through a socket pair
        (``migrate-incoming fd:``); more with multifd, its main stream connected first
        (QEMU 7.2 takes the first connection as the main one), then one a channel."""
        q = self._q()
        helper = self._reserver
        try:
            if helper is not None and skips_unsent_zero_pages() and (  # see create_incoming
                    channels == 1 or q.execute("query-migrate-parameters").get("zero-page-detection") != "multifd"):
                helper.start_fault_in()  # (an old machine type's QEMU reads every zero page it is sent)
            if channels == 1:
                ours = self._pass_stream_fd(q)
                self._incoming.append(ours)
                ours.settimeout(STREAM_TIMEOUT)
                q.execute("migrate-incoming", uri=f"fd:{STREAM_FD}")
            else:
                self._multifd(q, channels)
                with self._channels_dir() as where:
                    q.execute("migrate-incoming", uri=f"unix:{CHANNELS_DIR}/in")
                    for _ in range(channels):
                        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        self._incoming.append(conn)
                        conn.settimeout(STREAM_TIMEOUT)
                        with contextlib.suppress(OSError):
                            conn.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, STREAM_SOCKET_BUFFER)
                        conn.connect(f"{where}/in")
                        # m/ is QEMU's: a QEMU that a stream took over could leave a symlink there to any
                        # socket of the host's (the agent's control socket): only QEMU itself is sent to.
                        self._check_peer(conn)
        except (QemuError, QmpError, OSError) as exc:
            self._close_incoming()  # (nothing was sent on them)
            raise QemuError(f"destination QEMU does not listen for the stream: {exc}") from None
        self._tail = StreamTail()

    @staticmethod
    def _multifd(q: QmpClient, channels: int) -> None:
        """QEMU's multifd on, with one multifd channel per DATA session (both sides)."""
        q.execute("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        q.execute("migrate-set-parameters", **{"multifd-channels": channels - 1})

    @contextlib.contextmanager
    def _channels_dir(self) -> Iterator[str]:
        """The directory of the multifd sockets in QEMU's root, for as long as the streams
        take to connect: the VM's uid may pass through its root (group, execute only) and
        owns this directory; yields a short path to it for the agent (a Unix socket's path
        has 108 bytes at most).  Then the root is as it was (empty, QEMU may not write
        there) and the directory gone: the connections need neither."""
        root = self.run_dir / "root"
        where = root / CHANNELS_DIR
        uid = self.config.get("uid")
        verify_dir(self.run_dir, "QEMU run directory")
        os.chmod(root, 0o700)  # (an unconfined agent owns the root it may not write either)
        try:
            if os.path.lexists(where):  # left by an agent stopped while its streams connected
                if where.is_symlink() or not where.is_dir():
                    os.unlink(where)
                else:
                    shutil.rmtree(where)
            os.mkdir(where, 0o700)
            if isinstance(uid, int):
                os.chown(where, uid, uid)
                os.chown(root, os.geteuid(), uid)
                os.chmod(root, 0o510)  # noqa: S103 (its group is the VM's own; run_dir is 0700 anyway)
            fd = os.open(where, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
        finally:
            os.chown(root, os.geteuid(), os.getegid())
            # First, confined: QEMU's uid reaches nothing there from here on (root removes m/ all the same).
            os.chmod(root, 0o500 if isinstance(uid, int) else 0o700)
            shutil.rmtree(where, ignore_errors=True)  # (what QEMU left there too; never followed)
            os.chmod(root, 0o500)

    def _pass_stream_fd(self, q: QmpClient) -> socket.socket:
        """A socket pair for the migration stream; QEMU gets one end by SCM_RIGHTS."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, STREAM_SOCKET_BUFFER)
        try:
            q.execute("getfd", pass_fd=theirs.fileno(), fdname=STREAM_FD)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # QEMU holds its own copy now: its close is our end of stream
        return ours

    def _command(self, incoming: bool, local: list[str] | None = None, ram_fd: int | None = None) -> list[str]:
        binary = qemu_binary()
        if binary is None:
            raise QemuError("qemu-system-x86_64 not found")
        s = self.spec
        uid = self.config.get("uid")
        # No operator's name and no path on the command line (any local user reads it):
        # an opaque -name, and the RAM file as a descriptor the agent opened.
        ram = f"/proc/self/fd/{ram_fd}" if ram_fd is not None else str(self.dir / GUEST_RAM)
        cmd = [binary, "-name", process_name(self.vm_id),
               "-machine", f"{s.machine},accel={s.accel},memory-backend=pc.ram",
               "-object", f"memory-backend-file,id=pc.ram,mem-path={ram},size={s.memory_mib}M,share=on",
               "-m", str(s.memory_mib), "-smp", str(s.vcpus), "-nodefaults", "-display", "none",
               "-serial", "none", "-monitor", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
               "-sandbox", SANDBOX + ("allow" if uid is not None else "deny")]
        if uid is not None:  # each version's spelling of the same drop (qemu_version)
            version, root = qemu_version(), self.run_dir / "root"
            if version >= (9, 1):
                cmd += ["-run-with", f"user={uid}:{uid},chroot={root}"]
            elif version >= (8, 1):
                cmd += ["-runas", f"{uid}:{uid}", "-run-with", f"chroot={root}"]
            else:
                cmd += ["-runas", f"{uid}:{uid}", "-chroot", str(root)]
        cmd += [*s.args, *(self.local_args if local is None else local)]
        if incoming:
            cmd += ["-S", "-incoming", "defer"]
        return cmd

    def _start(self, incoming: bool, images_dir: Path | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        local, fds = ([], []) if incoming else open_loader_files(self.local_args, images_dir)
        ram_fd = open_nofollow(self.dir / GUEST_RAM, os.O_RDWR | os.O_CLOEXEC)
        fds.append(ram_fd)
        log = open_nofollow(self.dir / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            # Own session: a signal to the agent's process group leaves the VM
            # running.  An empty working directory and environment: QEMU gets
            # nothing of the agent's but what the command line names (and the
            # loader files the agent opened for it).
            self.proc = subprocess.Popen(self._command(incoming, local, ram_fd), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True, cwd=self.run_dir / "root",
                                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, pass_fds=tuple(fds))
        except OSError as exc:
            raise QemuError(f"cannot start QEMU: {exc.strerror or exc}") from None
        finally:
            os.close(log)
            for fd in fds:
                os.close(fd)
        self.config["pid"] = self.proc.pid
        self._save_config()
        try:
            self.qmp = QmpClient.connect(self.qmp_path, QMP_TIMEOUT, alive=lambda: self.proc is not None and
                                         self.proc.poll() is None)
            if not incoming:  # a QEMU that dies as its vCPUs first run (KVM refusing the CPU's MSRs) dies now
                self.qmp.execute("query-status", timeout=QMP_TIMEOUT)
        except QmpError as exc:
            tail = self._log_tail()
            self._kill()
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            raise QemuError(start_failure(tail or str(exc), [*self.spec.args, *self.local_args])) from None

    def _log_tail(self) -> str:
        """QEMU's last log line: for the local log and operator only, never for a peer."""
        try:
            text = read_nofollow(self.dir / "qemu.log", 1 << 20)
        except (OSError, UnsafePathError):
            return ""
        lines = text.decode(errors="replace").strip().splitlines()
        return lines[-1][:200] if lines else ""

    @classmethod
    def open(cls, vm_dir: Path, config: dict[str, Any]) -> QemuVM:
        """Finds a VM's QEMU again after an agent restart.  A VM whose QEMU is
        gone loads in state "dead" (it can only be destroyed)."""
        if not isinstance(config.get("run_dir"), str):
            raise QemuError(f"{vm_dir}: vm.json names no run directory")
        vm = cls(vm_dir, config)
        pid = config.get("pid")
        alive = isinstance(pid, int) and _pid_alive(pid, vm.qmp_path)
        if alive:
            try:
                verify_dir(vm.run_dir, "QEMU run directory")
                vm.qmp = QmpClient.connect(vm.qmp_path, 5.0)
            except (QmpError, UnsafePathError):
                alive = False
        if not alive and vm.state != "incoming":  # an incoming one is scrubbed by the handoff rules
            vm.config["state"] = "dead"
        return vm

    def _q(self) -> QmpClient:
        if self.qmp is None:
            raise QemuError(f"QEMU of VM {self.name!r} is not running")
        return self.qmp

    @property
    def pid(self) -> int | None:
        pid = self.config.get("pid")
        return pid if isinstance(pid, int) else None

    def _kill(self) -> None:
        """Ends the QEMU process: QMP quit, then SIGKILL if it lingers.  An incoming QEMU
        (never run: nothing to keep) is killed at once: one whose multifd load was cut
        may wait in QEMU's multifd sync for good, deaf to QMP."""
        if self.state == "incoming" and self.proc is not None:
            self.proc.kill()
        if self.qmp is not None:
            with contextlib.suppress(QmpError):
                self.qmp.execute("quit", timeout=5)
            self.qmp.close()
            self.qmp = None
        pid = self.pid
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif pid is not None:
            deadline = time.monotonic() + 5
            while _pid_alive(pid, self.qmp_path) and time.monotonic() < deadline:
                time.sleep(0.02)  # not our child (agent restarted): no wait() to block on
            if _pid_alive(pid, self.qmp_path):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    # -- state -----------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What `palm vm show` adds for this backend (QEMU's own status, asked with a short wait)."""
        try:
            status = self.qemu_status(timeout=1.0) if self.state != "dead" else "dead"
        except HypervisorError as exc:
            status = f"unreachable ({exc})"
        return {"workload": "guest", "writes": 0, "resident": True, "pid": self.pid, "accel": self.spec.accel,
                "qemu_args": [*self.spec.args, *self.local_args], "qemu_status": status}

    def migration_spec(self) -> bytes:
        """BEGIN's spec: the machine the destination starts (proto 7.7)."""
        return self.spec.encode()

    @property
    def info(self) -> VmInfo:
        return VmInfo(self.name, self.vm_id, self.spec.memory_mib * MIB // PAGE_SIZE, self.spec.vcpus, 0, 0)

    def migration_progress(self) -> dict[str, Any]:
        """QEMU's query-migrate while it migrates, for a progress display (a short
        wait: QmpError if QMP is busy, e.g. waiting for the end of the migration)."""
        return dict(self._q().execute("query-migrate", timeout=0.5))

    def qemu_status(self, timeout: float = QMP_TIMEOUT) -> str:
        return str(self._q().execute("query-status", timeout=timeout)["status"])

    def pause(self) -> None:
        self._run_state("stop", "paused")

    def resume(self) -> None:
        # QEMU lets "cont" run a source after its migration completed
        # (postmigrate): only the handoff rules decide whether we may.
        self._run_state("cont", "running")

    def _run_state(self, command: str, state: str) -> None:
        if self.state not in ("running", "paused"):
            raise QemuError(f"cannot {command} a VM in state {self.state}")
        self._q().execute(command)
        self.config["state"] = state
        self._save_config()

    def resume_after_migration(self) -> None:
        """The source again owns the VM (failure before the handoff point, or
        the destination's abort token): stop QEMU's migration and run."""
        with self._areas_lock:
            self.digest_excluded, self._tail, self._areas_due = [], None, False
        q = self._q()
        with contextlib.suppress(QmpError):
            q.execute("migrate_cancel")
        status = str(q.execute("query-migrate").get("status", "none"))
        if status in ("active", "cancelling", "device", "pre-switchover", "setup", "wait-unplug"):
            q.wait_event(lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in
                         ("cancelled", "failed", "completed"), QMP_TIMEOUT)
        if self.state == "paused" or self.qemu_status() != "running":
            self.config["state"] = "paused"
            try:
                self.resume()
            except QmpError:
                # QEMU restarts a guest itself when its migration fails late.
                if self.qemu_status() != "running":
                    raise
                self.config["state"] = "running"
                self._save_config()
        self.set_migration(None)  # last: a failure before leaves the record a restart resumes from

    def sync(self) -> None:
        self._save_config()  # the guest's memory lives in QEMU's RAM file, which QEMU keeps
        if self.state == "incoming":
            self._stage_activation()

    def _close_incoming(self) -> None:
        for conn in self._incoming:
            conn.close()
        self._incoming = []

    def close(self) -> None:
        """Lets go of the QEMU (the VM keeps running; the next agent reconnects)."""
        self._stop_reserving()
        self._close_incoming()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def _reserved(self) -> None:
        """All of an incoming VM's RAM file is allocated: nothing QEMU writes can fault on a
        full file system.  What is left of its fault-in is called off, not waited for: the
        guest is paused, and the CPU is the load's and the handoff's now (the thread is
        joined when the VM is scrubbed or closed)."""
        if self._reserver is not None:
            self._reserver.wait(self.spec.memory_mib * MIB, writing=False)
            self._reserver.stop(join=False)

    def _stop_reserving(self) -> None:
        if self._reserver is not None:
            self._reserver.stop()
            self._reserver = None

    def scrub(self) -> None:
        """Ends the VM: QEMU quits and its RAM file goes (tmpfs pages are zeroed before reuse)."""
        self._stop_reserving()
        self._close_incoming()
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def activate(self) -> None:
        if self.state != "incoming":
            raise QemuError(f"only an incoming VM can be activated (state {self.state})")
        self._q().execute("cont")  # QmpError: not running; the caller retries (the row is COMMITTED)
        with self._areas_lock:  # (an operator's digest may be finding them): running, the guest owns them again
            self.digest_excluded, self._tail, self._areas_due = [], None, False
        self._flip_activation()

    def verify(self) -> VerifyReport:
        """Nothing protected to check (see the module docstring); QEMU must be alive."""
        try:
            self.qemu_status()
        except (QemuError, QmpError) as exc:
            return VerifyReport(0, 0, (f"QEMU not answering: {exc}",))
        return VerifyReport(0, 0, ())

    # -- memory ----------------------------------------------------------

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical (address, size) of RAM: the pc/q35 machines put what
        does not fit below the PCI hole above 4 GiB."""
        size = self.spec.memory_mib * MIB
        low_max = 0xE0000000 if self.spec.machine == "pc" else 0xB0000000
        if size < low_max:
            return [(0, size)]
        low = 0xC0000000 if self.spec.machine == "pc" else 0x80000000  # gigabyte-aligned split
        return [(0, low), (1 << 32, size - low)]

    def _ram_offset(self, addr: int, size: int) -> int:
        """Where guest-physical [addr, addr+size) lies in the RAM file: the
        ranges of ram_ranges() follow each other in it, in order."""
        offset = 0
        for base, n in self.ram_ranges():
            if base <= addr and addr + size <= base + n:
                return offset + addr - base
            offset += n
        raise QemuError(f"guest-physical range {addr:#x}+{size:#x} is not RAM")

    def read_ram(self, addr: int, size: int) -> bytes:
        """Guest-physical memory, read from the RAM file QEMU shares with us."""
        offset = self._ram_offset(addr, size)
        fd = open_nofollow(self.dir / GUEST_RAM, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def start_page_digest(self) -> None:
        """QEMU's stream carries no page boundaries we could hash as it passes: the
        digest is of the whole RAM file, at READY (proto 7.7)."""

    def page_digest(self) -> str:
        return self.digest()

    def digest(self, ranges: list[tuple[int, int]] | None = None) -> str:
        """BLAKE2b-256 of guest RAM, or of the given guest-physical (address, size) ranges.

        All of RAM, while paused for a migration whose stream named kvmclock areas
        (``digest_excluded``): their bytes read as zeros, and their list hashed
        first, so that equal digests mean equal RAM outside exactly these areas
        and the same areas left out (proto/PROTOCOL.md 7.7)."""
        if ranges is None and self._areas_due:
            with self._areas_lock:
                self._find_areas_due()
        h = hashlib.blake2b(digest_size=32, person=DIGEST_PERSON)
        step = 16 * MIB
        holes: list[tuple[int, int]] = []
        if ranges is None and self.digest_excluded:
            h.update(b"palm-kvmclock-excluded" + b"".join(addr.to_bytes(8, "little") + size.to_bytes(4, "little")
                                                         for addr, size, _ in self.digest_excluded))
            holes = [(self._ram_offset(addr, size), size) for addr, size, _ in self.digest_excluded]
        fd = open_nofollow(self.dir / GUEST_RAM, os.O_RDONLY)
        try:
            for base, size in ranges or self.ram_ranges():
                start = self._ram_offset(base, size)
                for off in range(start, start + size, step):
                    data = os.pread(fd, min(step, start + size - off), off)
                    cut = [(o, n) for o, n in holes if o < off + len(data) and off < o + n]
                    if cut:
                        buf = bytearray(data)
                        for o, n in cut:
                            lo, hi = max(o, off) - off, min(o + n, off + len(data)) - off
                            buf[lo:hi] = bytes(hi - lo)
                        data = bytes(buf)
                    h.update(data)
        finally:
            os.close(fd)
        return h.hexdigest()

    # -- migration: source -------------------------------------------------

    def start_stream(self, downtime_limit: float, bandwidth: float | None, auto_converge: bool,
                     channels: int = 1) -> list[socket.socket]:
        """Starts QEMU's migration into a socket pair, or with multifd into ``channels``
        connections; returns our ends (the main stream's first), from which
        ``read_stream`` takes each stream until QEMU closes it."""
        q = self._q()
        q.execute("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True},
            {"capability": "auto-converge", "state": auto_converge},
            {"capability": "multifd", "state": channels > 1}])
        # QEMU caps migration at 128 MiB/s by default; ours is the channel's pace.
        q.execute("migrate-set-parameters", **{
            "downtime-limit": max(1, int(downtime_limit * 1000)),
            "max-bandwidth": int(bandwidth) if bandwidth else 1 << 40})
        if channels > 1:
            self._multifd(q, channels)
        q.events.clear()
        self._tail = StreamTail()
        with self._areas_lock:
            self.digest_excluded, self._areas_due = [], False
        if channels > 1:
            conns = self._accept_streams(q, channels)
        else:
            conn = StreamSocket(fileno=self._pass_stream_fd(q).detach())
            conns = [conn]
            try:
                q.execute("migrate", uri=f"fd:{STREAM_FD}")
            except BaseException:
                conn.close()
                raise
        cast(StreamSocket, conns[0]).tail = self._tail
        for c in conns:
            c.settimeout(STREAM_TIMEOUT)
        return conns

    @staticmethod
    def _accept_one(q: QmpClient, listener: socket.socket, deadline: float) -> socket.socket:
        """QEMU's next connection; QemuError once QEMU's migration failed (it makes no
        more) or the stream's timeout passed."""
        while True:
            listener.settimeout(max(0.0, min(ACCEPT_POLL, deadline - time.monotonic())))
            try:
                return listener.accept()[0]
            except TimeoutError:
                info = q.execute("query-migrate")
                if info.get("status") in ("failed", "cancelled"):
                    why = info.get("error-desc", "no reason given")
                    raise QemuError(f"QEMU migration {info['status']}: {why}") from None
                if time.monotonic() >= deadline:
                    raise QemuError("QEMU did not open all its migration streams") from None

    def _check_peer(self, conn: socket.socket) -> None:
        """The other end of a multifd socket is this VM's QEMU process (SO_PEERCRED), or QemuError."""
        pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        if pid != self.pid:
            raise QemuError(f"the VM's migration socket leads to process {pid}, not its QEMU")

    def _accept_streams(self, q: QmpClient, channels: int) -> list[socket.socket]:
        """QEMU's connections to our socket in its root, each checked to come from this VM's
        QEMU (SO_PEERCRED) and told apart by its first bytes: the main stream, then the
        multifd channels in the order they came."""
        conns: list[socket.socket] = []
        main: socket.socket | None = None
        with self._channels_dir() as where:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{where}/out")
                listener.bind(f"{where}/out")
                uid = self.config.get("uid")
                if isinstance(uid, int):  # QEMU connects as its own uid (m/ is its: never follow what is there)
                    os.chown(f"{where}/out", uid, uid, follow_symlinks=False)
                listener.listen(channels)
                q.execute("migrate", uri=f"unix:{CHANNELS_DIR}/out")
                deadline = time.monotonic() + STREAM_TIMEOUT
                while len(conns) < channels:
                    conn = StreamSocket(fileno=self._accept_one(q, listener, deadline).detach())
                    conns.append(conn)
                    conn.settimeout(STREAM_TIMEOUT)
                    self._check_peer(conn)
                    magic = conn.head = read_head(conn, 4, deadline)  # (read_stream passes it on first)
                    if magic == MAIN_MAGIC and main is None:
                        main = conn
                    elif magic != MULTIFD_MAGIC:
                        raise QemuError("a migration stream of QEMU's that is neither its main one nor multifd")
            except BaseException:
                for c in conns:
                    c.close()
                raise
            finally:
                listener.close()
                with contextlib.suppress(OSError):
                    os.unlink(f"{where}/out")
        if main is None:
            for c in conns:
                c.close()
            raise QemuError("QEMU opened no main migration stream")
        return [main, *(c for c in conns if c is not main)]

    def finish_stream(self, digest: bool = False) -> dict[str, Any]:
        """After QEMU closed the stream: its migration must have completed (the guest
        is then paused, "postmigrate"); returns QEMU's figures (migration_figures).
        QemuError otherwise.  The kvmclock areas of its stream's end are found now if
        ``digest`` (the migration's digest follows), else at a first digest, if any:
        not in every pause (the search took 4-5 ms of it)."""
        q = self._q()
        ev = q.wait_event(lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in
                          ("completed", "failed", "cancelled"), QMP_TIMEOUT)
        info: dict[str, Any] = q.execute("query-migrate")
        if ev["data"]["status"] != "completed":
            raise QemuError(f"QEMU migration {ev['data']['status']}: {info.get('error-desc', 'no reason given')}")
        self.config["state"] = "paused"  # postmigrate: QEMU keeps the guest stopped
        self._save_config()
        self.paused_at = self._stop_time(q)
        with self._areas_lock:
            self._areas_due = True
            if digest:
                self._find_areas_due()
        return migration_figures(info, [f"{what} {addr:#x}+{size}" for addr, size, what in self.digest_excluded])

    def _find_areas_due(self) -> None:
        """The stream's kvmclock areas, if still to be found (under _areas_lock)."""
        if self._areas_due:
            self._find_clock_areas()
            self._areas_due = False

    def _find_clock_areas(self) -> None:
        """After the whole stream passed: the kvmclock areas its CPU state names (in RAM)."""
        areas = self._tail.clock_areas() if self._tail is not None else None
        self._tail = None
        ram = self.ram_ranges()
        self.digest_excluded = [a for a in areas or []
                                if any(base <= a[0] and a[0] + a[1] <= base + n for base, n in ram)]

    @staticmethod
    def _stop_time(q: QmpClient) -> float:
        """When QEMU stopped the guest, on our monotonic clock (QMP events carry wall time)."""
        for ev in reversed(q.events):
            if ev.get("event") == "STOP":
                ts = ev.get("timestamp", {})
                wall = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
                return time.monotonic() - max(0.0, time.time() - wall)
        return time.monotonic()

    # -- migration: destination --------------------------------------------

    def stream_in(self, data: bytes | bytearray | memoryview, channel: int = 0) -> None:
        if channel >= len(self._incoming):
            raise QemuError("no incoming migration on this VM")
        if self._tail is not None and not channel:  # (the CPU state is at the main stream's end)
            self._tail.add(data)
        try:
            self._incoming[channel].sendall(data)
        except OSError as exc:
            raise QemuError(f"destination QEMU stopped reading the stream: {exc.strerror or exc}") from None

    def interrupt_stream(self) -> None:
        for conn in self._incoming:  # shut down, not closed: a writer thread may be in sendall
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def end_stream(self) -> None:
        """The whole stream was handed over: wait for QEMU to load it (paused), and for
        its RAM file to be wholly reserved (NoRoomError if it cannot be)."""
        if not self._incoming:
            raise QemuError("no incoming migration on this VM")
        self._reserved()
        for conn in self._incoming:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        try:
            ev = self._q().wait_event(lambda e: e.get("event") == "MIGRATION" and e["data"]["status"] in
                                      ("completed", "failed"), QMP_TIMEOUT)
        except QmpError as exc:
            raise QemuError(f"destination QEMU did not finish loading: {exc}; {self._log_tail()}") from None
        self._close_incoming()
        if ev["data"]["status"] != "completed":
            raise QemuError(f"destination QEMU refused the stream: {self._log_tail()}")
        status = self.qemu_status()
        if status == "running":
            raise QemuError("destination QEMU runs before COMMIT")
        # Its kvmclock areas matter to a digest only (--verify-digest's at PREPARE, the
        # operator's): found then, not in every pause (the search took 3-7 ms of it).
        self._areas_due = True
