"""etcd's own users and roles for a palm cluster: defence in depth under the signatures.

Records and policy documents are signed and checked by every reader
(palm_net.cluster.policy), so a writer can delete what it cannot forge.
etcd's authentication narrows who can write what at all:

- user and role ``agent-NAME``: readwrite on the keys only that agent writes
  (``agents/NAME``, ``known/NAME``, ``drain-status/NAME``), readwrite on
  ``vms/`` and ``slots/`` (a VM record is keyed by VM id and written by
  whichever agent hosts the VM, a slot by its index and taken by any
  draining agent: no key range is one agent's, so these stay writable by
  every agent and rest on their signatures and compare-and-swap), read on
  the whole prefix;
- role ``operator`` (users of the operator's choosing): readwrite on
  ``config/`` and ``drain/`` (the signed policy documents), read on the
  whole prefix;
- ``root`` (etcd's own): everything, including users and roles.

Each call is one of etcd's ``/v3/auth/`` calls through the JSON gateway; all
of them can be repeated (an existing user gets the password given, a role
exactly the permissions listed), so ``set_up`` is run again to add an agent.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from palm_net.cluster.etcd import EtcdClient, Password
from palm_net.cluster.etcdwire import CODE_FAILED_PRECONDITION, EtcdError, prefix_end
from palm_net.cluster.model import Keys
from palm_net.crypto.identity import validate_name

OPERATOR_ROLE = "operator"
READ, WRITE, READWRITE = "READ", "WRITE", "READWRITE"


@dataclass(frozen=True, order=True)
class Perm:
    """A permission of a role: ``key`` alone, or the range [key, range_end)."""

    kind: str  # READ, WRITE or READWRITE
    key: bytes
    range_end: bytes = b""

    def describe(self) -> str:
        where = self.key.decode()
        if self.range_end:
            where += "*" if self.range_end == prefix_end(self.key) else f" .. {self.range_end.decode()}"
        return f"{self.kind.lower()} {where}"


def agent_user(name: str) -> str:
    validate_name(name)
    return f"agent-{name}"


def operator_user(user: str) -> str:
    if user == "root" or user.startswith("agent-"):
        raise EtcdError(f"etcd user {user!r} is not an operator's name (root and agent-* are taken)")
    return user


def _prefix(kind: str, key: bytes) -> Perm:
    return Perm(kind, key, prefix_end(key))


def agent_permissions(keys: Keys, name: str) -> list[Perm]:
    return sorted([
        _prefix(READ, keys.prefix.encode()),
        Perm(READWRITE, keys.agent(name)),
        Perm(READWRITE, keys.known_agent(name)),
        Perm(READWRITE, keys.drain_status(name)),
        _prefix(READWRITE, keys.vms),  # keyed by VM id: any agent may come to host it
        _prefix(READWRITE, keys.slots),  # keyed by index: any draining agent takes one
    ])


def operator_permissions(keys: Keys) -> list[Perm]:
    return sorted([_prefix(READ, keys.prefix.encode()), _prefix(READWRITE, keys.config),
                   _prefix(READWRITE, keys.drains)])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise EtcdError("etcd sent a malformed answer: bad base64 in a role's permission") from None


def _exists(e: EtcdError) -> bool:
    return e.code == CODE_FAILED_PRECONDITION and "already exists" in str(e)


async def role_permissions(etcd: EtcdClient, role: str) -> list[Perm]:
    body = await etcd.auth_call("/v3/auth/role/get", {"role": role})
    perms = body.get("perm") or []
    if not isinstance(perms, list):
        raise EtcdError("etcd sent a malformed answer: a role's perm is not a list")
    out = []
    for p in perms:
        if not isinstance(p, dict):
            raise EtcdError("etcd sent a malformed answer: a role's permission is not an object")
        kind = p.get("permType", READ)  # the gateway leaves out the zero value, READ
        out.append(Perm(kind if kind in (READ, WRITE, READWRITE) else str(kind)[:20], _unb64(p.get("key")),
                        _unb64(p.get("range_end"))))
    return sorted(out)


async def ensure_role(etcd: EtcdClient, role: str, perms: list[Perm]) -> list[str]:
    """Makes ``role`` hold exactly ``perms``; returns what changed."""
    changes: list[str] = []
    try:
        await etcd.auth_call("/v3/auth/role/add", {"name": role})
        changes.append(f"role {role} created")
    except EtcdError as e:
        if not _exists(e):
            raise
    have = await role_permissions(etcd, role)
    for p in have:
        if p not in perms:  # a grant this set-up no longer gives, or one added by hand
            await etcd.auth_call("/v3/auth/role/revoke", {"role": role, "key": _b64(p.key),
                                                          "range_end": _b64(p.range_end)})
            changes.append(f"role {role}: revoked {p.describe()}")
    for p in perms:
        if p not in have:
            await etcd.auth_call("/v3/auth/role/grant", {"name": role, "perm": {
                "permType": p.kind, "key": _b64(p.key), "range_end": _b64(p.range_end)}})
            changes.append(f"role {role}: granted {p.describe()}")
    return changes


async def ensure_user(etcd: EtcdClient, user: str, password: Password, roles: list[str]) -> list[str]:
    """Makes ``user`` exist with ``password`` and hold ``roles`` (among others it may have)."""
    changes: list[str] = []
    try:
        await etcd.auth_call("/v3/auth/user/add", {"name": user, "password": password.reveal()})
        changes.append(f"user {user} created")
    except EtcdError as e:
        if not _exists(e):
            raise
        await etcd.auth_call("/v3/auth/user/changepw", {"name": user, "password": password.reveal()})
        changes.append(f"user {user}: password set")
    body = await etcd.auth_call("/v3/auth/user/get", {"name": user})
    have = body.get("roles") or []
    for role in roles:
        if role not in have:
            await etcd.auth_call("/v3/auth/user/grant", {"user": user, "role": role})
            changes.append(f"user {user}: role {role}")
    return changes


@dataclass
class SetUp:
    """What ``set_up`` is asked to do."""

    agents: dict[str, Password] = field(default_factory=dict)  # agent name -> its etcd password
    operators: dict[str, Password] = field(default_factory=dict)  # etcd user name -> password
    root_password: Password | None = None  # creates (or resets) etcd's root user
    enable: bool = False


async def set_up(etcd: EtcdClient, keys: Keys, what: SetUp) -> list[str]:
    """Roles and users for the agents and operators of the cluster under ``keys``,
    then (``enable``) authentication on.  Needs etcd's root user once auth is on."""
    changes: list[str] = []
    if what.root_password is not None:
        changes += await ensure_user(etcd, "root", what.root_password, ["root"])
    for name, password in sorted(what.agents.items()):
        user = agent_user(name)
        changes += await ensure_role(etcd, user, agent_permissions(keys, name))
        changes += await ensure_user(etcd, user, password, [user])
    if what.operators or what.enable:
        changes += await ensure_role(etcd, OPERATOR_ROLE, operator_permissions(keys))
    for user, password in sorted(what.operators.items()):
        changes += await ensure_user(etcd, operator_user(user), password, [OPERATOR_ROLE])
    if what.enable:
        if not await auth_enabled(etcd):
            try:
                await etcd.auth_call("/v3/auth/enable", {})
            except EtcdError as e:
                if "root user does not exist" in str(e):
                    raise EtcdError("etcd refuses to turn authentication on without its root user: "
                                    "give --root-password-file") from None
                raise
            changes.append("authentication enabled")
    return changes


async def auth_enabled(etcd: EtcdClient) -> bool:
    """Whether etcd checks users: with auth off, authenticate says so (3.4 has no status call)."""
    if etcd.config.credentials is not None:
        return await etcd.authenticated()
    try:
        await etcd.auth_call("/v3/auth/role/list", {})
    except EtcdError as e:
        if "user name is empty" in str(e) or "authentication on" in str(e):
            return True
        raise
    return False
