"""What the registry keeps, without etcd: the digest that tells two servers' device
definitions apart, and the cache's memory of the nodes it has seen."""

import logging

from tcprc.cluster.cache import MAX_SEEN, ClusterCache
from tcprc.cluster.etcd import Event, KeyValue
from tcprc.cluster.records import Keys, NodeInfo, devices_digest, encode_node
from tcprc.settings import DeviceEntry, Secret

KEY = b"k" * 16


def entry(host, secret=b"s" * 16, services=None):
    return DeviceEntry("gw1", Secret(secret), host, None, services or {})


def test_the_digest_ignores_each_servers_own_addresses_but_not_ports_or_secrets():
    one = devices_digest(KEY, [entry("10.0.0.1:2301", services={"web": "10.0.0.1:8080"})])
    assert devices_digest(KEY, [entry("10.0.0.2:2301", services={"web": "[::1]:8080"})]) == one
    assert devices_digest(KEY, [entry("10.0.0.1:2302", services={"web": "10.0.0.1:8080"})]) != one
    assert devices_digest(KEY, [entry("10.0.0.1:2301", services={"web": "10.0.0.1:8081"})]) != one
    assert devices_digest(KEY, [entry("10.0.0.1:2301", b"t" * 16,
                                      services={"web": "10.0.0.1:8080"})]) != one
    assert devices_digest(b"j" * 16, [entry("10.0.0.1:2301",
                                            services={"web": "10.0.0.1:8080"})]) != one


def put(keys, name, revision):
    info = NodeInfo(name, "127.0.0.1:9001", "", "test", "d")
    return Event("PUT", KeyValue(keys.node(name), encode_node(info), revision, 1))


def delete(keys, name, revision):
    return Event("DELETE", KeyValue(keys.node(name), b"", revision, 0))


def test_the_cache_remembers_gone_nodes_within_a_bound():
    keys = Keys("c")
    cache = ClusterCache(keys, logging.getLogger("test"))
    cache.apply([put(keys, "s1", 2), put(keys, "s2", 3)])
    cache.apply([delete(keys, "s1", 4)])
    assert sorted(cache.nodes()) == ["s2"]
    assert sorted(cache.seen_nodes()) == ["s1", "s2"]    # s1: "lease expired" in ctl cluster
    cache.reset([], 5)                                    # a listing: nobody now
    assert cache.nodes() == {} and sorted(cache.seen_nodes()) == ["s1", "s2"]

    # Node names that come and go are forgotten, oldest first, past MAX_SEEN; live ones stay.
    cache.apply([put(keys, "live", 6)])
    for n in range(MAX_SEEN + 10):
        cache.apply([put(keys, "n%d" % n, 7 + 2 * n), delete(keys, "n%d" % n, 8 + 2 * n)])
    seen = cache.seen_nodes()
    assert len(seen) == MAX_SEEN and "live" in seen and "s1" not in seen
    assert "n%d" % (MAX_SEEN + 9) in seen
