"""The cluster on etcd (issue 16): the etcd v3 client the agents share.

:mod:`palm_net.cluster.etcdwire` is the sans-IO half (values, JSON gateway
encoding, parsing); :mod:`palm_net.cluster.etcd` the trio client.

The names below are imported on first use (PEP 562): an agent without
``--etcd`` imports only :mod:`palm_net.cluster.gate` from here, not etcd's
client and its HTTP and TLS modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from palm_net.cluster.etcd import EtcdClient, EtcdConfig, Watch
    from palm_net.cluster.etcdwire import (
        Compare,
        Delete,
        EtcdError,
        Event,
        Get,
        KeyValue,
        Lease,
        OpResult,
        Put,
        RangeResult,
        TxnResult,
        WatchBatch,
        prefix_end,
    )

__all__ = ["Compare", "Delete", "EtcdClient", "EtcdConfig", "EtcdError", "Event", "Get", "KeyValue", "Lease",
           "OpResult", "Put", "RangeResult", "TxnResult", "Watch", "WatchBatch", "prefix_end"]

_FROM_ETCD = frozenset({"EtcdClient", "EtcdConfig", "Watch"})


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module("palm_net.cluster.etcd" if name in _FROM_ETCD else "palm_net.cluster.etcdwire")
    return getattr(module, name)
