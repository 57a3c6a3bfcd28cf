"""In-process agents for tests: one authority, N agents in one trio loop.

Each agent runs in its own cancel scope so a test can stop it (as a clean
shutdown would) and start a new Agent on the same state directory, keeping
its port, to exercise restart recovery.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from palm_net.agent.agent import Agent, AgentConfig, default_measurement
from palm_net.crypto.identity import CERT_FILE, AgentIdentity, Authority
from palm_net.hypervisor.qemu import kill_all_under
from palm_net.testing import scratch


@dataclass
class Member:
    name: str
    dir: Path
    config: AgentConfig
    agent: Agent | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    port: int = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalCluster:
    def __init__(self, names: tuple[str, ...] = ("a", "b"), in_doubt_wait: float = 5.0,
                 max_incoming: int = 4) -> None:
        self.root = scratch.mkdtemp("palm-test-")
        self.authority = Authority.generate()
        self.authority.save(self.root / "ca")
        self.measurement = default_measurement()
        self.members: dict[str, Member] = {}
        for name in names:
            d = self.root / name
            ident = AgentIdentity.generate(name)
            ident.save(d)
            cert = self.authority.issue(name, ident.static.public, ident.sign_pub, self.measurement)
            (d / CERT_FILE).write_bytes(cert.encode())
            cfg = AgentConfig(state_dir=d, listen="127.0.0.1:0", control=self.root / f"{name}.sock",
                              ca_pub=self.root / "ca" / "ca.pub", memory_dir=self.root / f"{name}-mem",
                              run_dir=self.root / f"{name}-run", images_dir=self.root / f"{name}-images",
                              in_doubt_wait=in_doubt_wait, handshake_timeout=5.0, max_incoming=max_incoming)
            self.members[name] = Member(name, d, cfg)
        self.nursery: trio.Nursery | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, nursery: trio.Nursery, names: tuple[str, ...] = ("a", "b"),
                      **kw: Any) -> AsyncIterator[LocalCluster]:
        """The agents started in ``nursery``; stopped and their directories removed after."""
        c = cls(names, **kw)
        c.nursery = nursery
        try:
            for name in names:
                await c.start(name)
            yield c
        finally:
            for name in list(c.members):
                await c.stop(name)
            c.cleanup()

    def __getitem__(self, name: str) -> Agent:
        agent = self.members[name].agent
        assert agent is not None, f"agent {name} is not running"
        return agent

    def addr(self, name: str) -> str:
        return self.members[name].addr

    async def start(self, name: str) -> Agent:
        assert self.nursery is not None
        m = self.members[name]
        if m.port:
            m.config.listen = f"127.0.0.1:{m.port}"  # a restarted agent keeps its address
        agent = Agent(m.config)
        scope, stopped = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await agent.serve(task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(run)
        m.agent, m.scope, m.stopped, m.port = agent, scope, stopped, agent.listen_port
        return agent

    async def stop(self, name: str) -> None:
        m = self.members[name]
        if m.scope is not None and m.stopped is not None:
            m.scope.cancel()
            await m.stopped.wait()  # its finally blocks have run: its directories are free
        m.agent, m.scope, m.stopped = None, None, None

    def running_copies(self, vm: str) -> list[str]:
        """Agents on which the VM exists and runs (the one-copy rule: exactly one)."""
        out = []
        for m in self.members.values():
            if m.agent is not None and vm in m.agent.vms and m.agent.vms[vm].state == "running":
                out.append(m.name)
        return out

    def cleanup(self) -> None:
        kill_all_under(self.root)  # QEMU VMs outlive their agents by design
        shutil.rmtree(self.root, ignore_errors=True)
