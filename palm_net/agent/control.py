"""The local control API: JSON lines over a Unix socket (mode 0600).

Specified in proto/PROTOCOL.md section 9.  One request per connection line:
``{"v": 1, "op": OP, "args": {...}}``; the answer is one line
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": "..."}``.
``migrate`` first sends ``{"v": 1, "event": "progress", "stats": {...}}`` lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from palm_net.agent.client import CONTROL_VERSION
from palm_net.agent.errors import AgentError
from palm_net.agent.outgoing import OutgoingService, channels_by_default
from palm_net.agent.progress import ProgressMeter
from palm_net.agent.registry import VmRegistry
from palm_net.crypto.noise import CipherName
from palm_net.hypervisor.backend import HypervisorError
from palm_net.hypervisor.qemu import QemuVM
from palm_net.hypervisor.vms import AnyVM
from palm_net.jsonlines import JsonLines, LineError
from palm_net.migration.params import MigrationParams, MigrationStats
from palm_net.trioutil import single_error
from palm_net.units import parse_rate, parse_size


class Controlled(Protocol):
    """What the control API drives: the agent's VMs, its migrations out, its status."""

    registry: VmRegistry
    outgoing: OutgoingService

    @property
    def ciphers(self) -> tuple[CipherName, ...]: ...

    def status(self) -> dict[str, Any]: ...

    async def destinations(self, vm_name: str) -> dict[str, Any]: ...

    async def abandon(self, mid_hex: str, reason: str) -> dict[str, Any]: ...

log = structlog.get_logger("palm.control")

MAX_REQUEST = 64 * 1024


class RequestError(Exception):
    pass


def _arg(args: dict[str, Any], name: str, typ: type, default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise RequestError(f"missing argument {name!r}")
        return default
    val = args[name]
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise RequestError(f"argument {name!r} must be {typ.__name__}")
    return val


def parse_range(text: str, ram: list[tuple[int, int]]) -> tuple[int, int]:
    """ADDR:SIZE (ADDR in hex or decimal, SIZE like 8MiB) inside one of the guest's RAM ranges."""
    a, sep, sz = text.partition(":")
    try:
        addr, size = int(a, 0), parse_size(sz)
    except ValueError:
        raise RequestError(f"bad range {text!r}: use ADDR:SIZE, e.g. 0x1000000:8MiB") from None
    if not sep or size <= 0 or not any(base <= addr and addr + size <= base + n for base, n in ram):
        raise RequestError(f"bad range {text!r}: outside the guest's memory")
    return addr, size


def vm_summary(vm: AnyVM) -> dict[str, Any]:
    info = vm.info
    return {"name": vm.name, "backend": vm.backend, "vm_id": info.vm_id.hex(), "state": vm.state,
            "memory": info.npages * 4096, "pages": info.npages, "protected_processes": info.processes,
            "protected_pages": info.protected_pages, "policy": vm.policy, "vcpus": info.vcpus, **vm.summary()}


Handler = Callable[["ControlServer", dict[str, Any], trio.SocketStream], Awaitable[Any]]


class ControlServer:
    """Serves the control socket: one request a connection, each op a small handler
    over the agent's services (registry, outgoing) and its status."""

    def __init__(self, agent: Controlled, path: Path) -> None:
        self.agent = agent
        self.path = path
        self.sock: trio.socket.SocketType | None = None

    async def bind(self) -> None:
        path = self.path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise AgentError(f"control path {path} exists and is not a socket")
            if await self._alive():
                raise AgentError(f"another agent is listening on {path}")
            path.unlink()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: only this user may drive the agent
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        self.sock = sock

    async def _alive(self) -> bool:
        try:
            s = await trio.open_unix_socket(str(self.path))
        except OSError:
            return False
        await s.aclose()
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def serve(self) -> None:
        assert self.sock is not None
        listener = trio.SocketListener(self.sock)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            lines = JsonLines(MAX_REQUEST)
            req: Any = None
            try:
                with trio.fail_after(30):
                    while req is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        lines.feed(data)
                        req = lines.next()
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except LineError as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._reply(stream, {"ok": False, "error": f"bad request: {exc}"})
                return
            try:
                if req.get("v") != CONTROL_VERSION or not isinstance(req.get("op"), str):
                    raise RequestError(f"bad request: need {{'v': {CONTROL_VERSION}, 'op': ..., 'args': {{...}}}}")
                args = req.get("args") or {}
                if not isinstance(args, dict):
                    raise RequestError("args must be an object")
                handler = self.OPS.get(req["op"])
                if handler is None:
                    raise RequestError(f"unknown operation {req['op'][:40]!r}")
                result = await handler(self, args, stream)
                await self._reply(stream, {"ok": True, "result": result})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as exc:
                known = (RequestError, ValueError, HypervisorError, AgentError)
                msg = str(exc) if isinstance(exc, known) else f"internal error: {type(exc).__name__}: {exc}"
                if not isinstance(exc, known):
                    log.exception("control request failed", op=str(req.get("op")) if isinstance(req, dict) else "?")
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._reply(stream, {"ok": False, "error": msg.splitlines()[0] if msg else "failed"})

    @staticmethod
    async def _reply(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
        obj = {"v": CONTROL_VERSION, **obj}
        await stream.send_all(json.dumps(obj).encode() + b"\n")

    # -- the operations

    async def _status(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return self.agent.status()

    async def _vm_create(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        registry = self.agent.registry
        memory = _arg(args, "memory", str)
        pm = _arg(args, "protected_memory", str, None)
        backend = _arg(args, "backend", str, "model")
        name = _arg(args, "name", str)
        if backend == "qemu":
            qargs = _arg(args, "qemu_args", list, [])
            if not all(isinstance(x, str) for x in qargs):
                raise RequestError("argument 'qemu_args' must be a list of strings")
            if pm or _arg(args, "protected", int, 0):
                raise RequestError("QEMU VMs have no protected processes (that is the model's)")
            vm: AnyVM = await trio.to_thread.run_sync(lambda: registry.create_qemu(
                name, parse_size(memory), qargs, _arg(args, "vcpus", int, 1), _arg(args, "policy", str, "any")))
            return vm_summary(vm)
        if backend != "model":
            raise RequestError(f"unknown backend {backend!r} (model or qemu)")
        if _arg(args, "qemu_args", list, []):
            raise RequestError("--qemu-arg needs --backend qemu")
        vm = registry.create_model(
            name, parse_size(memory), _arg(args, "protected", int, 0), parse_size(pm) if pm else None,
            _arg(args, "workload", str, "idle"), _arg(args, "seed", int, 0), _arg(args, "policy", str, "any"),
            _arg(args, "fill", str, "half"), postcopy=_arg(args, "postcopy", bool, True))
        return vm_summary(vm)

    def _summary(self, vm: AnyVM) -> dict[str, Any]:
        out = vm_summary(vm)
        error = self.agent.registry.not_running.get(vm.name)
        if error is not None:  # this agent's, but its activation or resume failed: said wherever it is shown
            out.update(state="committed-not-running" if vm.state == "incoming" else "resume-failed",
                       activation_error=error)
        return out

    async def _vm_list(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return [self._summary(vm) for vm in sorted(self.agent.registry, key=lambda v: v.name)]

    async def _vm_show(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return self._summary(self.agent.registry.get(_arg(args, "name", str)))

    async def _vm_digest(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        vm = self.agent.registry.get(_arg(args, "name", str))
        rng = _arg(args, "range", str, None)
        if rng is None:
            return {"name": vm.name, "digest": await trio.to_thread.run_sync(vm.digest), "state": vm.state}
        if vm.backend != "qemu":
            raise RequestError("--range needs a QEMU VM (a model VM digests all its memory)")
        addr, size = parse_range(rng, vm.ram_ranges())  # type: ignore[union-attr]
        digest = await trio.to_thread.run_sync(lambda: vm.digest([(addr, size)]))  # type: ignore[call-arg]
        return {"name": vm.name, "digest": digest, "state": vm.state, "range": rng}

    async def _vm_verify(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        vm = self.agent.registry.get(_arg(args, "name", str))
        rep = await trio.to_thread.run_sync(vm.verify)
        return {"name": vm.name, "ok": rep.ok, "checked": rep.checked, "in_process_view": rep.in_process_view,
                "failures": list(rep.failures)}

    async def _vm_pause(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        vm = await trio.to_thread.run_sync(self.agent.registry.set_run_state, _arg(args, "name", str), False)
        return vm_summary(vm)

    async def _vm_resume(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        vm = await trio.to_thread.run_sync(self.agent.registry.set_run_state, _arg(args, "name", str), True)
        return vm_summary(vm)

    async def _vm_destroy(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        name = _arg(args, "name", str)
        await trio.to_thread.run_sync(self.agent.registry.destroy, name)  # a QEMU may take a moment to quit
        return {"name": name, "destroyed": True}

    async def _migrations(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return self.agent.outgoing.migrations()

    async def _migrate_cancel(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return {"status": self.agent.outgoing.cancel(_arg(args, "id", str))}

    async def _migrate_resolve(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return {"status": await self.agent.outgoing.resolve(_arg(args, "id", str), _arg(args, "override", bool, False),
                                                            _arg(args, "reason", str, ""))}

    async def _migrate_abandon(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return await self.agent.abandon(_arg(args, "id", str), _arg(args, "reason", str, ""))

    async def _destinations(self, args: dict[str, Any], _: trio.SocketStream) -> Any:
        return await self.agent.destinations(_arg(args, "vm", str))

    async def _migrate(self, args: dict[str, Any], stream: trio.SocketStream) -> Any:
        bw = _arg(args, "bandwidth", str, None)
        d = MigrationParams()  # what a request leaves out
        params = MigrationParams(
            downtime_limit=_arg(args, "downtime_ms", float, d.downtime_limit * 1000) / 1000,
            max_rounds=_arg(args, "max_rounds", int, d.max_rounds),
            max_factor=_arg(args, "max_factor", float, d.max_factor),
            bandwidth=parse_rate(bw) if bw else None,
            auto_converge=_arg(args, "auto_converge", bool, False),
            plain=_arg(args, "plain", bool, False),
            verify_digest=_arg(args, "verify_digest", bool, False),
            reply_timeout=_arg(args, "reply_timeout", float, d.reply_timeout),
            downtime_policy=_arg(args, "downtime_policy", str, d.downtime_policy),
            channels=_arg(args, "channels", int, 0) or 1,  # none named: the VM's default, below
            postcopy=_arg(args, "postcopy", bool, False),
            postcopy_after=_arg(args, "postcopy_after", int, None),
        )
        params.validate()
        cipher_name = _arg(args, "cipher", str, None)
        cipher = None
        if cipher_name:
            names = {"aesgcm": CipherName.AESGCM, "chachapoly": CipherName.CHACHAPOLY}
            if cipher_name.lower() not in names:
                raise RequestError(f"unknown cipher {cipher_name!r} (aesgcm, chachapoly)")
            cipher = names[cipher_name.lower()]
            if cipher not in self.agent.ciphers:
                raise RequestError(f"cipher {cipher_name} is not available on this agent")
        name, to = _arg(args, "name", str), _arg(args, "to", str)
        vm = self.agent.outgoing.check(name, to, params)  # refused before anything starts: one line
        if not _arg(args, "channels", int, 0) and not params.postcopy:  # (QEMU's: it may ask the binary)
            params.channels = await channels_by_default(vm)
        mid = os.urandom(16)
        meter = ProgressMeter(mid, trio.current_time())
        send, recv = trio.open_memory_channel[dict[str, Any]](1)
        last = [-1.0]
        live: list[dict[str, Any] | None] = [None]  # a QEMU source's own figures, polled

        def progress(stats: MigrationStats) -> None:
            now = trio.current_time()
            if now - last[0] >= 0.2:  # at most 5 updates a second
                last[0] = now
                with contextlib.suppress(trio.WouldBlock):
                    send.send_nowait({"migration_id": mid.hex(), "view": meter.view(stats, now, live[0]),
                                      "stats": stats.as_dict()})

        async def forward() -> None:
            async for event in recv:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._reply(stream, {"event": "progress", **event})

        async def poll_qemu(qvm: QemuVM) -> None:
            while True:
                with contextlib.suppress(HypervisorError):
                    live[0] = await trio.to_thread.run_sync(qvm.migration_progress)
                await trio.sleep(0.5)

        async def watch_client() -> None:
            """The operator's `palm migrate` owns the job: if it goes away (Ctrl-C twice,
            a closed terminal), the migration is cancelled, as virsh aborts its job."""
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(4096):
                    pass
            with contextlib.suppress(AgentError):
                self.agent.outgoing.cancel(mid.hex())
                log.warning("control client went away: migration cancelled", migration=mid.hex(), vm=name)

        with single_error():
            async with trio.open_nursery() as nursery:
                await self._reply(stream, {"event": "started", "migration_id": mid.hex(), "vm": name, "to": to})
                nursery.start_soon(forward)
                async with trio.open_nursery() as side:
                    side.start_soon(watch_client)
                    if isinstance(vm, QemuVM):
                        side.start_soon(poll_qemu, vm)
                    result = await self.agent.outgoing.migrate(name, to, params, cipher, progress, mid=mid)
                    side.cancel_scope.cancel()
                send.close()  # forward sends what is left, then ends
        return result.as_dict()

    OPS: dict[str, Handler] = {
        "status": _status, "vm.create": _vm_create, "vm.list": _vm_list, "vm.show": _vm_show,
        "vm.digest": _vm_digest, "vm.verify": _vm_verify, "vm.pause": _vm_pause, "vm.resume": _vm_resume,
        "vm.destroy": _vm_destroy, "migrate": _migrate, "migrations": _migrations,
        "migrate.cancel": _migrate_cancel, "migrate.resolve": _migrate_resolve, "migrate.abandon": _migrate_abandon,
        "cluster.destinations": _destinations,
    }
