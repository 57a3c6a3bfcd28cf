"""The cluster on etcd (issue 16): the etcd v3 client the agents share.

:mod:`palm_net.cluster.etcdwire` is the sans-IO half (values, JSON gateway
encoding, parsing); :mod:`palm_net.cluster.etcd` the trio client.
"""

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
