"""Forwarding between two servers over real sockets: the holder's peer listener
authenticates the peer both ways, hands the client to deliver(), and the
bytes go through intact both ways with half-close; a wrong secret, a silent
peer, a flood from one source each end in one line."""

import hashlib
import os
import socket
import threading
import time
import uuid

import pytest

from support.net import free_port, recv_until_eof, tcp_pair
from support.waiting import wait_for
from tcprc.cluster.app import Cluster
from tcprc.cluster.peers import MAX_PENDING_PER_SOURCE, PeerListener, read_line
from tcprc.cluster.peerwire import DialerHandshake, LineReader
from tcprc.ops.config import build_config

pytestmark = pytest.mark.e2e   # real etcd

HEX = "0123456789abcdef" * 2
WRONG = "fedcba9876543210" * 2
SERVER = build_config("server", {}, "test").server


def cluster_settings(urls, node, name, secret=HEX):
    return build_config("server", {"cluster": {
        "name": name, "node": node, "etcd": list(urls),
        "peer_listen": "127.0.0.1:%d" % free_port(), "secret": secret, "lease_ttl": 2}},
        "test").cluster


class Holder:
    """deliver() of a holder: gw1 is here (its clients go to `serve`); others are not."""

    def __init__(self, serve=None):
        self.arrivals = []
        self.serve = serve
        self.threads = []

    def __call__(self, arrival):
        self.arrivals.append(arrival)
        if arrival.device_id != "gw1":
            arrival.refuse("device %s is not here" % arrival.device_id)
            return False
        sock = arrival.accept()
        thread = threading.Thread(target=self.serve, args=(sock, arrival), daemon=True)
        self.threads.append(thread)
        thread.start()
        return True


@pytest.fixture
def pair_of_servers(etcd):
    """(holder s1, forwarder s2, the holder's deliver): two started Clusters."""
    name = "f" + uuid.uuid4().hex[:8]
    started = []

    def start(serve=None):
        holder = Holder(serve)
        s1 = Cluster(cluster_settings(etcd.urls, "s1", name), SERVER, holder)
        s2 = Cluster(cluster_settings(etcd.urls, "s2", name), SERVER, Holder())
        for cluster in (s1, s2):
            cluster.start()
            started.append(cluster)
        wait_for(lambda: s1.registry_up and s2.registry_up, 10, "both in the registry")
        return s1, s2, holder

    yield start
    for cluster in started:
        cluster.stop()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def sha_echo(sock, arrival):
    """Send 4 MB while reading everything; after the client's half-close, the
    SHA-256 of what came, then close."""
    data = os.urandom(4 << 20)
    arrival.sent = hashlib.sha256(data).hexdigest()
    sock.settimeout(30)

    def send():
        sock.sendall(data)
    sender = threading.Thread(target=send)
    sender.start()
    digest, total = hashlib.sha256(), 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        total += len(chunk)
    sender.join(30)
    sock.sendall(digest.hexdigest().encode() + b" %d" % total)
    sock.close()


def test_a_forwarded_client_carries_megabytes_both_ways_with_half_close(pair_of_servers):
    s1, s2, holder = pair_of_servers(serve=sha_echo)
    s1.claim("gw1", "192.0.2.1:1")
    wait_for(lambda: s2.holder("gw1") is not None, 5, "s2 sees s1 holding gw1")
    node = s2.holder("gw1")
    assert node.name == "s1" and node.peer == s1.settings.peer_advertise
    before = open_fds()

    user, accepted = tcp_pair()           # accepted: what s2's host port would hand over
    s2.forward(node, "gw1", "", accepted)
    payload = os.urandom(8 << 20)
    user.settimeout(30)

    def send():
        user.sendall(payload)
        user.shutdown(socket.SHUT_WR)     # the half-close: s1's side must see EOF
    sender = threading.Thread(target=send)
    sender.start()
    got = recv_until_eof(user)
    sender.join(30)
    user.close()
    arrival = holder.arrivals[0]
    assert (arrival.device_id, arrival.service, arrival.peer_node) == ("gw1", "", "s2")
    body, trailer = got[:4 << 20], got[4 << 20:]
    assert hashlib.sha256(body).hexdigest() == arrival.sent
    assert trailer == hashlib.sha256(payload).hexdigest().encode() + b" %d" % len(payload)
    wait_for(lambda: s2.forwarded() == 0, 10, "the forward finished")
    wait_for(lambda: open_fds() <= before, 10, "every fd of the forward released")


def test_a_refusal_reaches_the_forwarding_side_with_its_reason(pair_of_servers, caplog):
    s1, s2, holder = pair_of_servers()
    node = s1.registry.me._replace(local=False)
    failures = []
    done = threading.Event()

    def on_failure(client, reason, refused):
        failures.append((reason, refused))
        client.close()
        done.set()
        return True

    user, accepted = tcp_pair()
    s2.forward(node, "gw2", "web", accepted, on_failure)
    assert done.wait(10)
    assert failures == [("node s1 refused: device gw2 is not here", True)]
    assert (holder.arrivals[0].device_id, holder.arrivals[0].service) == ("gw2", "web")
    # Without on_failure the client is closed and the reason logged.
    user2, accepted2 = tcp_pair()
    s2.forward(node, "gw3", "", accepted2)
    user2.settimeout(10)
    assert user2.recv(1) == b""
    wait_for(lambda: "forwarding to node s1 failed: node s1 refused: device gw3 is not here"
             in caplog.text, 5, "the reason logged")
    user.close()
    user2.close()
    wait_for(lambda: s2.forwarded() == 0, 5, "nothing left")


def test_a_peer_with_the_wrong_secret_gets_one_line_and_nothing_else(pair_of_servers, caplog):
    s1, s2, holder = pair_of_servers(serve=sha_echo)
    s1.claim("gw1", "192.0.2.1:1")
    host, port = s1.listener.address
    # By hand: the dialer's side with the wrong secret.
    sock = socket.create_connection((host, port), timeout=10)
    handshake = DialerHandshake(WRONG.encode(), s1.settings.name, "s9", "gw1", "")
    sock.sendall(handshake.hello())
    challenge = read_line(sock, LineReader(), time.monotonic() + 10)
    sock.sendall(handshake.on_challenge(challenge))
    rest = recv_until_eof(sock)
    sock.close()
    assert rest == b"ERROR authentication failed\n"
    assert holder.arrivals == []
    wait_for(lambda: "refused: node s9: bad proof of the cluster secret" in caplog.text, 5,
             "the one log line")
    assert caplog.text.count("bad proof") == 1 and HEX not in caplog.text

    # Through the API: a server of another secret cannot forward a client.
    other = Cluster(cluster_settings([s1.settings.etcd[0]], "s9", s1.settings.name, WRONG),
                    SERVER, Holder())
    failures = []
    user, accepted = tcp_pair()
    other.forward(s1.registry.me, "gw1", "", accepted,
                  lambda client, reason, refused: failures.append((reason, refused)) or False)
    user.settimeout(10)
    assert user.recv(1) == b""            # closed, not a byte of the device
    user.close()
    assert len(failures) == 1 and not failures[0][1]
    assert "node s1 refused us: authentication failed" in failures[0][0]
    assert holder.arrivals == []


def test_the_listener_bounds_handshakes_per_source_and_in_time(caplog):
    arrivals = []
    listener = PeerListener("127.0.0.1:0", HEX.encode(), "c", "s1",
                            lambda arrival: arrivals.append(arrival) or False, SERVER,
                            handshake_timeout=0.5)
    listener.start()
    silent = []
    try:
        for _ in range(MAX_PENDING_PER_SOURCE):
            silent.append(socket.create_connection(listener.address, timeout=10))
        wait_for(lambda: listener.pending() == MAX_PENDING_PER_SOURCE, 5, "handshakes pending")
        extra = socket.create_connection(listener.address, timeout=10)
        assert recv_until_eof(extra) == b"ERROR too many handshakes at once\n"
        extra.close()
        for sock in silent:               # each silent peer: one line at its deadline
            assert recv_until_eof(sock) == b"ERROR handshake timeout\n"
            sock.close()
        wait_for(lambda: listener.pending() == 0, 5, "the slots free again")
        garbage = socket.create_connection(listener.address, timeout=10)
        garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert recv_until_eof(garbage) == b"ERROR expected TCPRC-PEER/1 HELLO\n"
        garbage.close()
        long_line = socket.create_connection(listener.address, timeout=10)
        long_line.sendall(b"x" * 4096)
        assert recv_until_eof(long_line) == b"ERROR line too long\n"
        long_line.close()
        wait_for(lambda: listener.pending() == 0, 5, "no handshake left")
        assert arrivals == [] and listener.refused == MAX_PENDING_PER_SOURCE + 3
        assert caplog.text.count("no handshake within 0.5 s") == MAX_PENDING_PER_SOURCE
        assert "not a tcprc peer" in caplog.text
    finally:
        for sock in silent:
            sock.close()
        listener.stop()


def test_a_stopping_cluster_ends_its_forwards_and_leaves_etcd(pair_of_servers):
    blocked = threading.Event()

    def hold(sock, arrival):
        blocked.set()
        sock.settimeout(30)
        recv_until_eof(sock)
        sock.close()
    s1, s2, holder = pair_of_servers(serve=hold)
    s1.claim("gw1", "192.0.2.1:1")
    wait_for(lambda: s2.holder("gw1") is not None, 5, "s2 sees gw1")
    user, accepted = tcp_pair()
    s2.forward(s2.holder("gw1"), "gw1", "", accepted)
    assert blocked.wait(10)
    assert s2.forwarded() == 1
    s2.stop()
    user.settimeout(10)
    assert recv_until_eof(user) == b""
    user.close()
    wait_for(lambda: s2.forwarded() == 0, 5, "the forward ended")
    wait_for(lambda: s1.registry.cache.node("s2") is None, 5, "s2's node key gone at once")
