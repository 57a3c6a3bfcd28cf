#!/usr/bin/env python3
"""Bootstrap and run: the two README Quick start commands go through here.

    python3 scripts/dev.py demo [ARGS]   # venv + install, then `palm demo ARGS`
    python3 scripts/dev.py test [ARGS]   # venv + install with test extras, then lint, types, pytest
    python3 scripts/dev.py palm ARGS     # any palm command from the venv
    python3 scripts/dev.py venv [EXTRAS] # only create or refresh the venv (e.g. `venv test`)

Needs only python3 (3.11+).  The venv lives in .venv and is refreshed when
setup.cfg changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs under any python3
        sys.exit(f"palm_net needs Python 3.11 or newer (this is {sys.version.split()[0]})")
    stamp_key = hashlib.sha256((ROOT / "setup.cfg").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".palm-installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == stamp_key and (BIN / "palm").exists():
        return
    if not (BIN / "python").exists():
        print("dev: creating .venv", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    spec = f".[{extras}]" if extras else "."
    print(f"dev: installing palm_net{f' [{extras}]' if extras else ''} into .venv", file=sys.stderr, flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-e", spec], cwd=ROOT, check=True)
    stamp.write_text(stamp_key)


def run(cmd: list[str]) -> int:
    return subprocess.call(cmd, cwd=ROOT)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what == "demo":
        ensure_venv("")
        return run([str(BIN / "palm"), "demo", *rest])
    if what == "palm":
        ensure_venv("")
        return run([str(BIN / "palm"), *rest])
    if what == "venv":  # e.g. `venv test`: only make sure .venv has these extras
        ensure_venv(rest[0] if rest else "")
        return 0
    if what == "test":
        ensure_venv("test")
        for step in ([str(BIN / "ruff"), "check", "palm_net", "tests", "scripts"],
                     [str(BIN / "mypy"), "--config-file", "setup.cfg"],
                     [str(BIN / "hadolint"), "Dockerfile"]):
            print("dev: " + " ".join(Path(step[0]).name if i == 0 else a for i, a in enumerate(step)), flush=True)
            rc = run(step)
            if rc:
                return rc
        workers = ["-n", os.environ.get("PALM_TEST_WORKERS", "2")]
        return run([str(BIN / "python"), "-m", "pytest", *workers, *rest])
    print(f"dev: unknown command {what!r} (demo, test, palm, venv)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
