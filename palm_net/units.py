"""Sizes and rates as operators write them: 512MiB, 2GiB, 1Gbit, 100MiB/s."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bit|bps|i?B/s|B/s)\s*$", re.IGNORECASE)
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DEC = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
MAX_SIZE = 1 << 50  # 1 PiB: more than any guest, far below where floats lose whole bytes


def parse_size(text: str) -> int:
    """'512MiB' -> bytes.  Binary units (KiB, MiB, GiB, TiB; KB etc. read as binary too)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"malformed size {text!r} (examples: 4096, 512MiB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    value = float(m.group(1)) * _MULT[unit[0] if unit != "B" else ""]
    if not value <= MAX_SIZE:  # also refuses inf (a long run of digits) and nan
        raise ValueError(f"size {text[:40]!r} is too large")
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> float:
    """'1Gbit' -> bytes/s (decimal for bits), '100MiB/s' -> bytes/s (binary)."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"malformed rate {text!r} (examples: 1Gbit, 100MiB/s)")
    num, prefix, unit = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    if not num <= MAX_SIZE:
        raise ValueError(f"rate {text[:40]!r} is too large")
    if unit in ("bit", "bps"):
        return num * _DEC[prefix] / 8
    if unit.startswith("i"):
        return num * _MULT[prefix]
    return num * (_MULT[prefix] if prefix else 1)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
