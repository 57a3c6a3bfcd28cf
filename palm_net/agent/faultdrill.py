"""Fault drills: what a fault of each kind raises, and an agent started with
``PALM_FAULT`` (palm_net.faults names the steps)."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import sys

from palm_net.faults import STEPS, install
from palm_net.hypervisor.backend import HypervisorError
from palm_net.hypervisor.qmp import QmpError


def raiser(kind: str) -> BaseException:
    """The exception a fault of ``kind`` raises: enospc, eio, hypervisor, qmp, timeout, sqlite."""
    if kind == "enospc":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/injected/fault")
    if kind == "eio":
        return OSError(errno.EIO, os.strerror(errno.EIO), "/injected/fault")
    if kind == "hypervisor":
        return HypervisorError("injected hypervisor failure")
    if kind == "qmp":
        return QmpError("injected QMP failure")
    if kind == "timeout":
        return TimeoutError("injected timeout")
    if kind == "sqlite":  # what SQLite raises on a failing or full disk
        return sqlite3.OperationalError("disk I/O error")
    raise ValueError(f"unknown fault kind {kind!r}")


RAISE_KINDS = ("enospc", "eio", "hypervisor", "timeout", "sqlite")


def from_environment(value: str | None = None) -> str | None:
    """An agent started for a fault drill: ``PALM_FAULT=STEP:KIND[,STEP:KIND...]``, KIND
    one of exit (the process dies), stop (SIGTERM to itself), RAISE_KINDS or qmp.  Each
    fires the first time the agent reaches its STEP after the one before fired (a first
    fault can lead to the step of the second).  Returns the setting (for the agent's
    loud start-up line), None when unset."""
    spec = os.environ.get("PALM_FAULT") if value is None else value
    if not spec:
        return None
    plan = []
    for item in spec.split(","):
        step, _, kind = item.rpartition(":")
        if step not in STEPS or kind not in ("exit", "stop", *RAISE_KINDS, "qmp"):
            raise ValueError(f"PALM_FAULT={spec!r}: expected STEP:KIND[,STEP:KIND...] with steps of "
                             f"palm_net.faults.STEPS and KIND exit, stop, {', '.join(RAISE_KINDS)} or qmp")
        plan.append((step, kind))

    def inject(at: str) -> None:
        if not plan or at != plan[0][0]:
            return
        step, kind = plan.pop(0)
        if kind == "stop":  # what systemctl stop sends: the agent's own stop path runs
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if kind == "exit":
            sys.stderr.write(f"PALM_FAULT: process exits at {step}\n")
            sys.stderr.flush()
            os._exit(EXIT_CODE)  # a crash: no finally, no flush, no cleanup
        raise raiser(kind)

    install(inject)
    return spec


EXIT_CODE = 86  # what an agent killed by PALM_FAULT exits with
