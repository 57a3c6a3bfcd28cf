"""Where an agent keeps things by default, as a host service does.

- state (identity, certificate, hypervisor key, SQLite): /var/lib/palm as
  root; $XDG_STATE_HOME/palm (~/.local/state/palm) for another user;
- runtime (the control socket, each QEMU's QMP socket and jail):
  /run/palm/TAG as root, $XDG_RUNTIME_DIR/palm/TAG or /tmp/palm-UID/TAG
  otherwise, where TAG names the state directory (several agents may share
  a host);
- guest memory: a directory with an unpredictable name made in /dev/shm
  (tmpfs, like a real guest's RAM), recorded in the state directory.

Every one is created 0700 by the agent or verified (palm_net.hostfs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONTROL_SOCKET = "control.sock"
# Unix socket paths are limited to 107 bytes; the deepest runtime path is
# RUN/<16 hex>/qmp.sock.
MAX_RUN_DIR = 80


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/palm")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "palm"


def runtime_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/palm")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "palm"
    return Path("/tmp") / f"palm-{os.geteuid()}"  # noqa: S108 - made 0700 by us or refused (hostfs)


def default_run_dir(state_dir: Path) -> Path:
    tag = hashlib.blake2b(str(Path(os.path.realpath(state_dir))).encode(), digest_size=4).hexdigest()
    return runtime_base() / tag


def default_control(state_dir: Path) -> Path:
    return default_run_dir(state_dir) / CONTROL_SOCKET
