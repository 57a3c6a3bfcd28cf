"""An agent never loses sight of its VMs (issue 21.4): restarted with another memory
directory, or after its memory directory vanished, it refuses to start and names
them, or with --adopt-vms moves them into the directory now in force."""

from __future__ import annotations

import shutil

import pytest

from palm_net.agent.agent import Agent
from palm_net.agent.errors import AgentError
from palm_net.testing.cluster import LocalCluster


@pytest.fixture
async def one(nursery):
    c = LocalCluster(("a",))
    c.nursery = nursery
    yield c
    for name in list(c.members):
        await c.stop(name)
    c.cleanup()


async def _with_vm(c: LocalCluster) -> tuple[str, str]:
    a = await c.start("a")
    a.registry.create_model("vm1", 16 * 4096, protected=1, fill="random")
    digest = a.vms["vm1"].digest()
    old = str(a.memory_dir)
    await c.stop("a")
    return old, digest


async def test_another_memory_dir_is_refused_naming_the_vms_then_adopted(one):
    old, digest = await _with_vm(one)
    cfg = one.members["a"].config
    cfg.memory_dir = one.root / "elsewhere"
    with pytest.raises(AgentError) as refused:
        Agent(cfg)
    msg = str(refused.value)
    assert "vm1" in msg and old in msg and f"--memory-dir {old}" in msg and "--adopt-vms" in msg
    assert "\n" not in msg
    cfg.adopt_vms = True
    a = await one.start("a")
    assert a.vms["vm1"].state == "running" and a.vms["vm1"].digest() == digest
    assert a.vms["vm1"].verify().ok
    assert (one.root / "elsewhere" / "vm1").is_dir() and not (one.root / "a-mem" / "vm1").exists()


async def test_a_vanished_memory_dir_is_refused_naming_the_vms(one):
    old, _ = await _with_vm(one)
    shutil.rmtree(old)
    cfg = one.members["a"].config
    with pytest.raises(AgentError, match=r"vm1.*which is missing"):
        Agent(cfg)
    cfg.adopt_vms = True  # the operator accepts going on without them
    a = await one.start("a")
    assert "vm1" not in a.vms


async def test_the_same_memory_dir_starts_as_before(one):
    await _with_vm(one)
    a = await one.start("a")
    assert a.vms["vm1"].state == "running"
