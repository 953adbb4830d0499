"""What the registry keeps, without etcd: the digest that tells two servers' device
definitions apart."""

from tcprc.cluster.records import devices_digest
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

