"""What a VM's configuration may say, checked wherever it comes from (the
operator, or a migration's CPU state): its workload and its migration policy."""

from __future__ import annotations

from dataclasses import dataclass

from palm_net.errors import ErrorCode, MigrationFailure
from palm_net.units import parse_size
from palm_net.wire.messages import PAGE_SIZE

MAX_SPEC_TEXT = 256


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    kind: str  # random, hotset, protected
    rate: float  # writes per second
    pages: int = 0  # hotset size in pages


def parse_workload(spec: str) -> list[Part]:
    parts: list[Part] = []
    for item in spec.split("+"):
        fields = item.strip().split(":")
        kind = fields[0]
        try:
            if kind == "idle" and len(fields) == 1:
                continue
            if kind in ("random", "protected") and len(fields) == 2:
                parts.append(Part(kind, _rate(fields[1])))
            elif kind == "hotset" and len(fields) == 3:
                size = parse_size(fields[1])
                parts.append(Part(kind, _rate(fields[2]), max(1, size // PAGE_SIZE)))
            else:
                raise WorkloadError
        except (ValueError, OverflowError):
            raise WorkloadError(
                f"bad workload {item!r}: use idle, random:RATE, hotset:SIZE:RATE or protected:RATE"
            ) from None
        if parts and not 0 <= parts[-1].rate <= 10_000_000:
            raise WorkloadError(f"bad workload rate in {item!r}")
    return parts


def _rate(text: str) -> float:
    rate = float(text)
    if not 0 <= rate <= 10_000_000:  # also refuses nan and inf
        raise ValueError("rate out of range")
    return rate


def check_workload(spec: object) -> str:
    """A workload spec from anywhere: printable, short, and one that parses (ValueError)."""
    if not isinstance(spec, str) or len(spec) > MAX_SPEC_TEXT or not spec.isprintable():
        raise WorkloadError("a workload is printable text of at most 256 characters")
    parse_workload(spec)
    return spec


def check_policy(policy: str, peer_name: str | None = None, peer_measurement: bytes | None = None) -> None:
    """Per-VM migration policy, in the spirit of SEV's NOSEND / DOMAIN.

    ``any``; ``none`` (never migrates); ``agents:NAME[,NAME...]``;
    ``measurements:HEX[,HEX...]``.  Checked before connecting (``none``) and
    after the handshake, before any page is sent.
    """
    kind, _, arg = policy.partition(":")
    allowed = [a for a in arg.split(",") if a]
    if kind == "any":
        return
    if kind == "none":
        raise MigrationFailure(ErrorCode.POLICY, "the VM's policy forbids migration")
    if kind == "agents":
        if peer_name is not None and peer_name not in allowed:
            raise MigrationFailure(ErrorCode.POLICY, f"the VM's policy does not allow agent {peer_name!r}")
        return
    if kind == "measurements":
        if peer_measurement is not None and peer_measurement.hex() not in allowed:
            raise MigrationFailure(ErrorCode.POLICY, "the VM's policy does not allow the destination's measurement")
        return
    raise MigrationFailure(ErrorCode.POLICY, f"unknown policy {policy!r}")


def validate_policy(policy: object) -> str:
    """A policy from anywhere: printable, short, of a known kind (ValueError)."""
    if not isinstance(policy, str) or len(policy) > MAX_SPEC_TEXT or not policy.isprintable():
        raise ValueError("a policy is printable text of at most 256 characters")
    kind, _, arg = policy.partition(":")
    if kind in ("any", "none") and not arg:
        return policy
    if kind in ("agents", "measurements") and arg:
        return policy
    raise ValueError(f"bad policy {policy!r}: any, none, agents:NAME,... or measurements:HEX,...")
