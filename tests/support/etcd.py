"""Real etcd for the cluster tests (benchkit.etcd, shared with scripts/cluster-bench):
EtcdCluster(1 or 3) skips the test when /usr/bin/etcd is not installed."""

import pytest
from benchkit import etcd as _etcd
from benchkit.etcd import EtcdMember, etcd_missing

__all__ = ["EtcdCluster", "EtcdMember"]


class EtcdCluster(_etcd.EtcdCluster):
    def __init__(self, size: int = 1):
        if etcd_missing():
            pytest.skip(etcd_missing())
        super().__init__(size)
