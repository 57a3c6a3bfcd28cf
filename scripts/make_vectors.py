#!/usr/bin/env python3
"""Regenerates proto/vectors/*.json (palm_net's own handshake and first records, the
signed cluster policy documents and the protected-context blob's metadata digest).

Run after a deliberate wire change, then review the diff: tests compare the
implementation against these files byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

from palm_net.crypto.noise import CipherName
from palm_net.testing.vectors import build, build_metadata_digest, build_policy

OUT = Path(__file__).resolve().parent.parent / "proto" / "vectors"

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for cipher in CipherName:
        path = OUT / f"handshake_{cipher.value.lower()}.json"
        path.write_text(json.dumps(build(cipher), indent=1) + "\n")
        print(f"wrote {path}")
    path = OUT / "stream_aesgcm.json"
    path.write_text(json.dumps(build(CipherName.AESGCM, backend="qemu"), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "plain_aesgcm.json"
    path.write_text(json.dumps(build(CipherName.AESGCM, plain=True), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "channels_aesgcm.json"
    path.write_text(json.dumps(build(CipherName.AESGCM, channels=2), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "channels_stream_aesgcm.json"
    path.write_text(json.dumps(build(CipherName.AESGCM, backend="qemu", channels=2), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "postcopy_aesgcm.json"
    path.write_text(json.dumps(build(CipherName.AESGCM, postcopy=True), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "metadata_digest.json"
    path.write_text(json.dumps(build_metadata_digest(), indent=1) + "\n")
    print(f"wrote {path}")
    path = OUT / "policy.json"
    path.write_text(json.dumps(build_policy(), indent=1) + "\n")
    print(f"wrote {path}")
