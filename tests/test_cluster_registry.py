"""The cluster registry against a real etcd: lease and node key, claims compared on
revision, expiry of a dead server's claims, etcd lost and back, a member of three
lost, the watch resumed (or re-listed) after a break."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from support import ROOT
from support.etcd import EtcdCluster
from support.impair import Relay
from support.waiting import wait_for
from tcprc.cluster.etcd import (Compacted, EtcdClient, EtcdUnavailable, parse_endpoint, put,
                                unchanged_since)
from tcprc.cluster.records import Keys, NodeInfo, decode_claim, decode_node, encode_claim
from tcprc.cluster.registry import Registry, RegistryUnavailable
from tcprc.ops.config import build_config

pytestmark = pytest.mark.e2e   # real etcd processes

HEX = "0123456789abcdef" * 2
TTL = 2


def cluster_settings(urls, node, name, ttl=TTL):
    return build_config("server", {"cluster": {
        "name": name, "node": node, "etcd": list(urls), "peer_listen": "127.0.0.1:9",
        "peer_advertise": "127.0.0.1:%d" % (9000 + len(node)), "secret": HEX,
        "lease_ttl": ttl}}, "test").cluster


class Registries:
    """Registries of one test's cluster (a fresh name: tests share an etcd)."""

    def __init__(self, urls):
        self.urls = urls
        self.name = "t" + uuid.uuid4().hex[:10]
        self.keys = Keys(self.name)
        self.started = []
        self.lost = []           # (node, device, by whom) from every on_claim_lost

    def start(self, node, urls=None, ttl=TTL):
        settings = cluster_settings(urls or self.urls, node, self.name, ttl)
        registry = Registry(settings, NodeInfo(node, settings.peer_advertise, "", "test", "d"),
                            on_claim_lost=lambda device, by: self.lost.append((node, device, by)))
        registry.start()
        self.started.append(registry)
        wait_for(lambda: registry.registry_up, 10, "registry %s up" % node)
        return registry

    def raw(self):
        return EtcdClient([parse_endpoint(url) for url in self.urls], 2.0)

    def value(self, key):
        client = self.raw()
        try:
            kvs, _ = client.range(key)
        finally:
            client.close()
        return kvs[0] if kvs else None

    def stop(self):
        for registry in self.started:
            registry.stop()


@pytest.fixture
def regs(etcd):
    r = Registries(etcd.urls)
    yield r
    r.stop()


def registered(registry, device):
    return registry.claim_state(device) == "registered"


def test_a_lease_and_a_node_key_under_it(regs):
    a = regs.start("a")
    kv = wait_for(lambda: regs.value(regs.keys.node("a")), 5, "the node key")
    assert kv.lease == a.lease != 0
    node = decode_node("a", kv.value)
    assert (node.peer, node.version, node.devices) == ("127.0.0.1:9001", "test", "d")
    client = regs.raw()
    try:
        lease = client.call("/v3/lease/timetolive", {"ID": str(a.lease)})
    finally:
        client.close()
    assert int(lease["grantedTTL"]) == TTL and 0 < int(lease["TTL"]) <= TTL
    wait_for(lambda: a.state().nodes == 1, 5, "its own node key in its cache")
    state = a.state()
    assert state.up and state.state == "up" and "etcd 127.0.1." in state.detail
    a.update_node(http="127.0.0.1:8080")
    wait_for(lambda: decode_node("a", regs.value(regs.keys.node("a")).value).http
             == "127.0.0.1:8080", 5, "the node key updated")


def test_a_newer_claim_of_another_node_wins_and_the_first_is_told(regs):
    a, b = regs.start("a"), regs.start("b")
    token = a.claim("gw1", "192.0.2.1:4000")
    assert a.holder("gw1") is None and a.holds("gw1")
    wait_for(lambda: registered(a, "gw1"), 5, "a's claim written")
    wait_for(lambda: b.holder("gw1") is not None, 5, "b sees a's claim")
    assert b.holder("gw1").name == "a" and b.holder("gw1").peer == "127.0.0.1:9001"
    record = decode_claim("gw1", regs.value(regs.keys.device("gw1")).value, 0, 0)
    assert (record.node, record.source, record.session) == ("a", "192.0.2.1:4000", token.session)

    b.claim("gw1", "192.0.2.1:4001")
    wait_for(lambda: regs.lost, 5, "a told its claim was overwritten")
    assert regs.lost == [("a", "gw1", "b")]
    assert a.claim_state("gw1") == "lost" and not a.holds("gw1")
    wait_for(lambda: a.holder("gw1") is not None, 5, "a sees b holding gw1")
    assert a.holder("gw1").name == "b"
    # The loser's release deletes nothing: b's claim stays.
    a.release(token)
    sentinel = a.claim("gw-sentinel", "192.0.2.9:1")   # written after the release was handled
    wait_for(lambda: registered(a, "gw-sentinel"), 5, "a's next write")
    assert decode_claim("gw1", regs.value(regs.keys.device("gw1")).value, 0, 0).node == "b"
    assert registered(b, "gw1") and regs.lost == [("a", "gw1", "b")]
    a.release(sentinel)
    wait_for(lambda: regs.value(regs.keys.device("gw-sentinel")) is None, 5, "a's release")


def test_a_release_never_deletes_a_claim_newer_than_its_own(regs):
    a = regs.start("a")
    token = a.claim("gw1", "192.0.2.1:4000")
    wait_for(lambda: registered(a, "gw1"), 5, "a's claim written")
    # A newer claim lands straight in etcd (another server's, with its own lease);
    # a's release races with a's watch seeing it: either way it must survive.
    client = regs.raw()
    try:
        lease, _ = client.grant(30)
        ours = regs.value(regs.keys.device("gw1"))
        key = regs.keys.device("gw1")
        ok, _, _ = client.txn([unchanged_since(key, ours.mod_revision)],
                              [put(key, encode_claim("z", "newer", time.time(), "x:1"), lease)], [])
        assert ok
        a.release(token)
        sentinel = a.claim("gw-sentinel", "192.0.2.9:1")
        wait_for(lambda: registered(a, "gw-sentinel"), 5, "a's next write")
        kv = regs.value(regs.keys.device("gw1"))
        assert kv is not None and decode_claim("gw1", kv.value, 0, 0).node == "z"
        # Its own claim it does delete, at once.
        a.release(sentinel)
        wait_for(lambda: regs.value(regs.keys.device("gw-sentinel")) is None, 5, "a's release")
        client.revoke(lease)
    finally:
        client.close()


def test_a_new_session_on_the_same_server_replaces_the_old_one(regs):
    a, b = regs.start("a"), regs.start("b")
    first = a.claim("gw1", "192.0.2.1:4000")
    wait_for(lambda: registered(a, "gw1"), 5, "first claim")
    second = a.claim("gw1", "192.0.2.1:4001")
    wait_for(lambda: decode_claim("gw1", regs.value(regs.keys.device("gw1")).value, 0, 0).session
             == second.session, 5, "the second session written")
    a.release(first)           # the old session's end must not remove the new claim
    assert a.holds("gw1") and not regs.lost
    wait_for(lambda: registered(a, "gw1"), 5, "still registered")
    wait_for(lambda: b.holder("gw1") is not None, 5, "b sees a's claim")
    assert b.holder("gw1").name == "a"
    a.release(second)
    wait_for(lambda: b.holder("gw1") is None, 5, "b sees it released")


def test_a_claim_made_before_the_cache_knew_anything_goes_by_session_age(regs):
    """A server that starts with a device already on it (no cache yet) takes the
    device over from an older claim elsewhere, but not from a newer one."""
    b = regs.start("b")
    b.claim("gw1", "192.0.2.1:1")
    wait_for(lambda: registered(b, "gw1"), 5, "b's claim")
    client = regs.raw()
    try:   # gw2: a claim of node z whose session started in the future (a newer one)
        lease, _ = client.grant(30)
        client.txn([], [put(regs.keys.device("gw2"),
                            encode_claim("z", "s-z", time.time() + 60, "x:1"), lease)], [])
        settings = cluster_settings(regs.urls, "a", regs.name)
        a = Registry(settings, NodeInfo("a", settings.peer_advertise, "", "test", ""),
                     on_claim_lost=lambda device, by: regs.lost.append(("a", device, by)))
        regs.started.append(a)
        a.claim("gw1", "192.0.2.1:2")      # before start: nothing known
        a.claim("gw2", "192.0.2.2:2")
        a.start()
        wait_for(lambda: registered(a, "gw1"), 5, "a takes gw1 over")
        wait_for(lambda: ("b", "gw1", "a") in regs.lost, 5, "b told")
        # the callback runs just after the claim is marked lost: wait for the callback
        wait_for(lambda: ("a", "gw2", "z") in regs.lost, 5, "a yields gw2 to the newer session")
        assert a.claim_state("gw2") == "lost"
        assert decode_claim("gw2", regs.value(regs.keys.device("gw2")).value, 0, 0).node == "z"
        client.revoke(lease)
    finally:
        client.close()


def test_a_server_that_stops_releases_its_claims_at_once(regs):
    a, b = regs.start("a"), regs.start("b")
    a.claim("gw1", "192.0.2.1:1")
    wait_for(lambda: registered(a, "gw1") and b.holder("gw1") is not None, 5, "claimed")
    a.stop()      # revokes the lease before it returns: no waiting for the TTL
    assert regs.value(regs.keys.device("gw1")) is None
    assert regs.value(regs.keys.node("a")) is None
    assert a.state().state == "stopped" and not a.registry_up
    wait_for(lambda: b.holder("gw1") is None, 5, "b sees it released")


CHILD = r"""
import json, sys, time
sys.path.insert(0, %(root)r)
from tcprc.ops.config import build_config
from tcprc.cluster.registry import Registry
from tcprc.cluster.records import NodeInfo
settings = build_config("server", {"cluster": json.loads(sys.argv[1])}, "child").cluster
registry = Registry(settings, NodeInfo(settings.node, settings.peer_advertise, "", "child", ""))
registry.start()
registry.claim("gw9", "192.0.2.9:9")
while registry.claim_state("gw9") != "registered":
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_servers_claims_expire_within_about_a_lease(regs):
    b = regs.start("b")
    table = {"name": regs.name, "node": "k", "etcd": regs.urls, "peer_listen": "127.0.0.1:9",
             "secret": HEX, "lease_ttl": TTL}
    child = subprocess.Popen([sys.executable, "-c", CHILD % {"root": ROOT}, json.dumps(table)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        wait_for(lambda: b.holder("gw9") is not None, 5, "b sees the child's claim")
        assert b.holder("gw9").name == "k"
        child.kill()
        child.wait(10)
        killed = time.monotonic()
        wait_for(lambda: b.holder("gw9") is None, 4 * TTL, "the dead server's claim gone")
        gone_after = time.monotonic() - killed
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    assert regs.value(regs.keys.device("gw9")) is None
    assert regs.value(regs.keys.node("k")) is None
    wait_for(lambda: b.cache.node("k") is None, 5, "b's cache forgets the node")
    print("claim of a killed server gone after %.2f s (lease_ttl %d s)" % (gone_after, TTL))


def test_wait_for_holder_is_woken_by_the_watch_and_by_a_local_claim(regs):
    a, b = regs.start("a"), regs.start("b")
    results = {}

    def wait(name, registry, device, timeout):
        started = time.monotonic()
        node = registry.wait_for_holder(device, timeout)
        results[name] = (node, time.monotonic() - started)

    waiters = [threading.Thread(target=wait, args=("remote", b, "gw5", 30)),
               threading.Thread(target=wait, args=("local", b, "gw6", 30)),
               threading.Thread(target=wait, args=("nobody", b, "gw7", 0.3))]
    for thread in waiters:
        thread.start()
    a.claim("gw5", "192.0.2.5:1")
    b.claim("gw6", "192.0.2.6:1")
    for thread in waiters:
        thread.join(10)
    node, waited = results["remote"]
    assert node is not None and node.name == "a" and not node.local and waited < 30
    node, waited = results["local"]
    assert node is not None and node.name == "b" and node.local and waited < 30
    node, waited = results["nobody"]
    assert node is None and waited >= 0.3


def test_wait_for_holder_not_on_a_node_waits_for_a_claim_elsewhere(regs):
    """A client whose forward to node a failed (a died, its claim not expired yet)
    waits for the device's next holder, not for a's claim it already has."""
    a, b, c = regs.start("a"), regs.start("b"), regs.start("c")
    a.claim("gw8", "192.0.2.8:1")
    wait_for(lambda: b.holder("gw8") is not None, 5, "b sees a's claim")
    assert b.wait_for_holder("gw8", 0.2).name == "a"
    started = time.monotonic()
    assert b.wait_for_holder("gw8", 0.3, not_on="a") is None
    assert time.monotonic() - started >= 0.3
    results = []
    waiter = threading.Thread(target=lambda: results.append(b.wait_for_holder("gw8", 30, "a")))
    waiter.start()
    c.claim("gw8", "192.0.2.8:2")         # the device's next server
    waiter.join(10)
    assert results and results[0] is not None and results[0].name == "c"


def test_the_watch_resumes_from_its_revision_after_a_break_and_relists_when_compacted(
        regs, etcd, caplog):
    host, port = parse_endpoint(etcd.urls[0])
    relay = Relay((host, port)).start()
    try:
        a = regs.start("a", urls=["http://%s:%d" % relay.address])
        b = regs.start("b")
        for device, compact in (("gw-gap", False), ("gw-compacted", True)):
            caplog.clear()
            relay.blackhole(True)          # a's etcd goes silent; b's does not
            # Registry down: a ends its watch (a silent member could hold it for good).
            wait_for(lambda: "registry unavailable" in caplog.text, 4 * TTL, "a's registry down")
            assert not a.registry_up
            b.claim(device, "192.0.2.7:1")
            wait_for(lambda: registered(b, device), 5, "b's claim written during the gap")
            if compact:
                # A second write: the compaction then removes a revision a has not
                # seen (a watch may start at the compacted revision itself).
                b.claim(device + "-2", "192.0.2.7:2")
                wait_for(lambda: registered(b, device + "-2"), 5, "b's second claim")
                client = regs.raw()
                try:
                    _, revision = client.range(regs.keys.prefix)
                    client.call("/v3/kv/compaction", {"revision": str(revision)})
                finally:
                    client.close()
            relay.kill()                  # the held connections go; new ones flow again
            relay.blackhole(False)
            wait_for(lambda: a.registry_up, 10, "a back")
            wait_for(lambda: a.holder(device) is not None, 10, "a sees what happened in the gap")
            assert a.holder(device).name == "b"
            relisted = "listing again" in caplog.text
            assert relisted == compact, caplog.text
    finally:
        relay.close()


def test_the_etcd_client_resumes_a_watch_and_reports_compaction(etcd):
    client = EtcdClient([parse_endpoint(url) for url in etcd.urls], 2.0)
    prefix = ("/w%s/" % uuid.uuid4().hex[:8]).encode()
    try:
        _, start = client.range(prefix)
        for n in range(3):
            client.txn([], [put(prefix + b"k%d" % n, b"", 0)], [])
        stream = client.watch(prefix, prefix[:-1] + b"0", start + 1)
        try:
            seen = []
            while len(seen) < 3:
                seen += stream.next()
        finally:
            stream.close()
        assert [e.kv.key for e in seen] == [prefix + b"k%d" % n for n in range(3)]
        assert [e.kind for e in seen] == ["PUT"] * 3
        _, now = client.range(prefix)
        client.call("/v3/kv/compaction", {"revision": str(now)})
        with pytest.raises(Compacted):
            stream = client.watch(prefix, prefix[:-1] + b"0", start + 1)
            try:
                stream.next()
            finally:
                stream.close()
    finally:
        client.close()


def test_a_watch_cut_in_the_middle_of_an_answer_is_an_ended_stream():
    """etcd (or the path) gone while a batch of events is on its way: the chunked
    answer ends mid-chunk.  The stream says it ended (EtcdUnavailable, which the
    watcher retries quietly), not http.client's IncompleteRead (a traceback)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():   # an etcd that dies while it sends: a created line, half an event
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:   # all of it: unread bytes would make close a reset
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += conn.recv(65536)
            created = b'{"result":{"header":{"revision":"7"},"created":true}}\n'
            event = b'{"result":{"events":[{"kv":{"key":"L3gvYQ=="}}]}}\n'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n" % (len(created), created) +
                         b"%x\r\n%s" % (len(event), event[:20]))
            conn.shutdown(socket.SHUT_WR)   # the answer ends there, in order
            while conn.recv(65536):         # until the client hangs up
                pass
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = EtcdClient([listener.getsockname()], 2.0)
    try:
        stream = client.watch(b"/x/", b"/x0", 8)
        assert stream.created_revision == 7
        with pytest.raises(EtcdUnavailable, match="ended"):
            stream.next()
        stream.close()
    finally:
        client.close()
        listener.close()
        server.join(5)


# -- etcd lost ------------------------------------------------------------------------------

def unavailable(registry, device):
    try:
        registry.holder(device)
    except RegistryUnavailable:
        return True
    return False


def test_etcd_gone_for_three_leases_closes_nothing_and_the_claims_come_back(caplog):
    etcd = EtcdCluster(1)
    regs = Registries(etcd.urls)
    try:
        a, b = regs.start("a"), regs.start("b")
        a.claim("gw1", "192.0.2.1:1")
        b.claim("gw2", "192.0.2.2:1")
        wait_for(lambda: registered(a, "gw1") and registered(b, "gw2"), 5, "claims written")
        wait_for(lambda: a.holder("gw2") is not None and b.holder("gw1") is not None, 5,
                 "each sees the other's")
        last_renewal = time.monotonic() - (TTL - a.state().lease_left)
        etcd.stop_all()
        killed = time.monotonic()
        assert a.holder("gw2").name == "b"        # the cache serves for now
        wait_for(lambda: not a.registry_up and not b.registry_up, 2 * TTL, "registry down")
        assert a.state().state == "down" and "etcd" in a.state().detail
        wait_for(lambda: a.claim_state("gw1") == "unregistered", 2 * TTL, "own claim unbelieved")
        # ... not before the lease would have expired
        assert time.monotonic() - last_renewal >= TTL - 0.05
        wait_for(lambda: unavailable(a, "gw2"), 2 * TTL, "the cache too old to forward")
        while time.monotonic() - killed < 3 * TTL:     # three leases without etcd
            assert a.holds("gw1") and b.holds("gw2") and not regs.lost
            wait_for(lambda: True, 0.1)
        assert a.holds("gw1") and b.holds("gw2") and not regs.lost
        etcd.restart(etcd.members[0])
        wait_for(lambda: a.registry_up and b.registry_up, 10, "registry back")
        wait_for(lambda: registered(a, "gw1") and registered(b, "gw2"), 10, "claims back")
        wait_for(lambda: a.holder("gw2") is not None and b.holder("gw1") is not None, 10,
                 "each sees the other's again")
        assert a.holder("gw2").name == "b" and b.holder("gw1").name == "a"
        assert not regs.lost
        assert "registry unavailable" in caplog.text and "registry available again" in caplog.text
    finally:
        regs.stop()
        etcd.close()


def test_one_member_of_three_killed_changes_nothing_visible_two_stop_the_registry(caplog):
    etcd = EtcdCluster(3)
    try:
        leader = etcd.leader()
        followers = [m for m in etcd.members if m is not leader]
        victim = followers[0]
        rest = [m.client_url for m in etcd.members if m is not victim]
        regs = Registries(rest)
        try:
            a = regs.start("a", urls=[victim.client_url] + rest)   # a talks to the victim
            b = regs.start("b")
            a.claim("gw1", "192.0.2.1:1")
            wait_for(lambda: registered(a, "gw1") and b.holder("gw1") is not None, 5, "claimed")
            lease = a.lease
            victim.kill()
            b.claim("gw2", "192.0.2.2:1")
            deadline = time.monotonic() + 2 * TTL
            while time.monotonic() < deadline:
                assert a.registry_up and b.registry_up
                assert registered(a, "gw1") and b.holder("gw1").name == "a"
                wait_for(lambda: True, 0.05)
            wait_for(lambda: a.holder("gw2") is not None, 5, "a's watch carried on elsewhere")
            assert a.holder("gw2").name == "b" and a.lease == lease
            assert "registering again" not in caplog.text and "unavailable" not in caplog.text

            # A second member lost: no quorum.  The survivor answers "no leader" (its
            # watch too, asked with require-leader): down, nothing closed, then back.
            second = [m for m in etcd.members if m is not victim][0]
            second.kill()
            wait_for(lambda: not a.registry_up and not b.registry_up, 4 * TTL, "no quorum seen")
            assert "no leader" in caplog.text or "timed out" in caplog.text
            assert a.holds("gw1") and b.holds("gw2") and not regs.lost
            etcd.restart(second, wait=False)
            etcd.restart(victim, wait=False)
            wait_for(lambda: a.registry_up and b.registry_up, 20, "quorum back")
            wait_for(lambda: registered(a, "gw1") and registered(b, "gw2"), 10, "claims back")
            wait_for(lambda: b.holder("gw1") is not None and a.holder("gw2") is not None, 10,
                     "each sees the other's")
            assert b.holder("gw1").name == "a" and not regs.lost
        finally:
            regs.stop()
    finally:
        etcd.close()


def test_idle_claims_cost_etcd_nothing_but_the_lease_keepalives(regs):
    """Requests to etcd do not grow with the devices held: a server holding 40
    claims sends what one holding none sends, its keep-alives."""
    a, b = regs.start("a"), regs.start("b")
    for n in range(40):
        a.claim("gw%02d" % n, "192.0.2.1:%d" % (1000 + n))
    wait_for(lambda: a.state().registered == 40, 10, "every claim written")
    wait_for(lambda: len(b.cache.devices()) == 40, 10, "b's cache has them")
    before = a.request_count(), b.request_count()
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started >= TTL, 2 * TTL, "a lease idle")
    sent = a.request_count() - before[0], b.request_count() - before[1]
    keepalives = TTL / (TTL / 3.0)
    assert sent[0] <= keepalives + 2 and abs(sent[0] - sent[1]) <= 1, sent


@pytest.mark.bench
def test_the_cluster_bench_runs_and_every_row_costs_the_same():
    bench = os.path.join(ROOT, "scripts", "cluster-bench")
    proc = subprocess.run([sys.executable, bench, "--parts", "registry", "-n", "0,20", "--ttl", "2",
                           "--window", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "20"], proc.stdout
    assert all("LeaseKeepAlive" in " ".join(row) for row in rows), proc.stdout
    # etcd rpc/s against N=0: a few keep-alives either way, never one per device
    assert 0.5 <= float(rows[1][5]) <= 2.0, proc.stdout


@pytest.mark.bench
def test_the_cluster_bench_smoke_runs_every_part():
    """--smoke: every part small (forwarded against direct, a failover of 5 devices,
    a fleet of 20 with and without [cluster]); each table comes out with figures."""
    bench = os.path.join(ROOT, "scripts", "cluster-bench")
    proc = subprocess.run([sys.executable, bench, "--smoke"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ")}
    for label in ("throughput, 1 stream (Gbit/s)", "throughput, 4 streams (Gbit/s)",
                  "throughput, 1 stream from the device (Gbit/s)"):
        direct, forwarded, ratio = rows[label]
        assert float(direct) > 0 and float(forwarded) > 0 and ratio.endswith("x"), (label, out)
    direct, forwarded, added = rows["latency p50, 64 B ping-pong (us)"]
    assert float(direct) > 0 and float(forwarded) > 0 and added.endswith(" us"), out
    p50, p90, most, missing = rows["all"]
    assert missing == "0" and 0 < float(p50) <= float(most) < 60, out
    for label in ("without [cluster]", "with [cluster], holding them",
                  "with [cluster], holding none"):
        assert float(rows[label][0]) > 5, (label, out)     # RSS in MB
    assert rows["with [cluster], holding them"][3].endswith("(both servers)"), out
    registry = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in registry] == ["0", "5"], out

