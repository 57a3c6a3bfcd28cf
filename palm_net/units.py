"""Sizes, rates and durations as operators write and read them.

One convention for sizes, QEMU's: units are binary and case-insensitive, with
an optional ``i`` and ``B`` (``512M`` = ``512m`` = ``512MB`` = ``512MiB`` =
512 * 2**20 bytes; ``2G``, ``1T``, ``64K``); ``B`` alone is bytes.  A bare
number is MiB where the size is guest memory (``--memory 4096`` is 4 GiB, as
QEMU reads ``-m 4096``: :func:`parse_memory`); where a bare number is not
obviously memory, the `palm` command asks for a unit.  :func:`parse_size`
(a bare number is bytes) is what the control API, vm.json and the wire keep.
Rates: ``1Gbit`` (decimal, bits), ``100MiB/s`` or ``100M/s`` (binary, bytes).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|(B))?\s*$", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bit|bps|i?B/s|B/s|/s)\s*$", re.IGNORECASE)
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DEC = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
MAX_SIZE = 1 << 50  # 1 PiB: more than any guest, far below where floats lose whole bytes
SIZE_EXAMPLES = "examples: 512M, 2G, 2GiB, 64KiB, 4096B"


def _size(text: str, bare: int) -> tuple[int, bool]:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"malformed size {text[:40]!r} ({SIZE_EXAMPLES})")
    unit = m.group(2) or ""
    mult = _MULT[unit.upper()] if unit else (1 if m.group(3) else bare)
    value = float(m.group(1)) * mult
    if not value <= MAX_SIZE:  # also refuses inf (a long run of digits) and nan
        raise ValueError(f"size {text[:40]!r} is too large")
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value), not (unit or m.group(3))


def parse_size(text: str) -> int:
    """'512MiB', '2G', '512mb' -> bytes (binary units); a bare number is bytes."""
    return _size(text, 1)[0]


def parse_memory(text: str) -> int:
    """Guest memory as QEMU's -m reads it: '4096' is 4096 MiB; '2G', '512M', '2GiB' as parse_size."""
    return _size(text, 1 << 20)[0]


def has_unit(text: str) -> bool:
    """Whether a well-formed size names its unit (ValueError if malformed)."""
    return not _size(text, 1)[1]


def exact_size(n: int) -> str:
    """Bytes as the largest binary unit that divides them exactly: 4GiB, 1536MiB, 4097B."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


def parse_rate(text: str) -> float:
    """'1Gbit' -> bytes/s (decimal for bits), '100MiB/s' or '100M/s' -> bytes/s (binary)."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"malformed rate {text!r} (examples: 1Gbit, 100MiB/s, 100M/s)")
    num, prefix, unit = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    if not num <= MAX_SIZE:
        raise ValueError(f"rate {text[:40]!r} is too large")
    if unit in ("bit", "bps"):
        return num * _DEC[prefix] / 8
    return num * _MULT[prefix]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_rate(bytes_per_s: float | None) -> str:
    return "-" if bytes_per_s is None else f"{format_bytes(bytes_per_s)}/s"


def format_duration(seconds: float | None) -> str:
    """0.0418 -> '41.8 ms', 12.43 -> '12.4 s', 754 -> '12 min 34 s', None -> '-'."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
