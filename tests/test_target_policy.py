"""The device's target policy on resolved addresses, and the server's default CONNECT.

A tcprc device against an emulated legacy server (test_legacy_interop's
RawPeer), and a tcprc device against a default tcprc server.
"""

import socket

import pytest

from support.net import recv_exactly
from support.peers import LegacyServer
from support.services import Service
from support.tunnel import Tunnel, settings
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.engine.sockets import connect_resolved, resolve_tcp
from tcprc.device.app import DeviceApp
from tcprc.device.policy import allowed_only
from tcprc.wire.frames import CLOSE, CONNECT, DATA


class Listener:
    """A bare listener that only counts connections (a target that must not be dialed)."""

    def __init__(self, host, port=0, family=socket.AF_INET):
        self.sock = socket.socket(family)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]

    def accepted(self):
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def close(self):
        self.sock.close()


def on_same_port(make_first, host, family=socket.AF_INET):
    """make_first() (something with .address and .close()) and a Listener on
    `host` with the same port; a few tries, as that port may be taken there."""
    for _ in range(20):
        first = make_first()
        try:
            return first, Listener(host, first.address[1], family)
        except OSError:
            first.close()
    raise AssertionError("no port free on both addresses")


@pytest.fixture
def legacy():
    srv = LegacyServer()
    apps = []

    def start(local, **keys):
        app = DeviceApp(settings("device", server=srv.address, local=local, **keys))
        app.start()
        apps.append(app)
        peer = srv.accept()
        peer.expect(bytes.fromhex("00000400"))
        return peer

    yield start
    for app in apps:
        app.close()
    srv.close()


def served(peer, client_id, address, port):
    """CONNECT to address:port, then DATA; True when the echo comes back."""
    peer.send(CONNECT, client_id, protocol.encode_connect_payload(address, port))
    peer.send(DATA, client_id, b"ping")
    while True:
        command, got_id, payload = peer.read_frame()
        if got_id == client_id:
            break
        # A refused id's DATA may have been answered with a second CLOSE.
        assert command == CLOSE and got_id < client_id
    if command == CLOSE:
        return False
    assert (command, payload) == (DATA, b"ping")
    peer.send(CLOSE, client_id)
    return True


# ---------------------------------------------------------------- item 2: the default CONNECT
def test_default_server_reaches_a_tcprc_device_whose_local_is_not_port_23(service):
    # The quick start: server with defaults (its CONNECT names 127.0.0.1:23,
    # test_server_full_use_case_against_legacy_device checks the bytes),
    # device --local 127.0.0.1:<svc>.
    tunnel = Tunnel(service.address)
    try:
        with tunnel.client(timeout=10) as client:
            client.sendall(b"quick start")
            assert recv_exactly(client, 11) == b"quick start"
        assert service.accepted == 1
    finally:
        tunnel.close()


def test_legacy_default_target_goes_to_local_only(legacy, service, caplog):
    local = "%s:%d" % service.address
    peer = legacy(local)
    for client_id, address in enumerate(["127.0.0.1", "localhost", "::1", "127.0.0.2"], 1):
        assert served(peer, client_id, address, 23), address
    assert service.accepted == 4
    # Port 23 elsewhere, or another port on loopback, is still refused.
    for client_id, (address, port) in enumerate([("10.0.0.1", 23), ("0.0.0.0", 23),
                                                  ("127.0.0.1", 24)], 10):
        assert not served(peer, client_id, address, port), (address, port)
    assert service.accepted == 4
    # Refused in the pump thread: the CLOSE may be on the wire before the log line.
    wait_for(lambda: "refused client 10: CONNECT to 10.0.0.1:23" in caplog.text, what="the warning")


def test_legacy_default_target_with_a_port_23_elsewhere_is_checked_resolved(legacy, service):
    # With a target on port 23 configured, the stand-in needs the resolved check first.
    peer = legacy("%s:%d" % service.address, allow=["10.9.9.9:23"])
    assert served(peer, 1, "127.0.0.1", 23)
    assert not served(peer, 2, "10.0.0.1", 23)
    assert service.accepted == 1


def test_port_23_listed_in_allow_is_dialed_as_such(legacy, service):
    # The legacy default is only a stand-in for `local` when nothing allows it.
    telnet = Listener("127.0.0.1")
    try:
        peer = legacy("%s:%d" % service.address, allow=["localhost:%d" % telnet.address[1]])
        peer.send(CONNECT, 1, protocol.encode_connect_payload("127.0.0.1", telnet.address[1]))
        wait_for(lambda: telnet.accepted() == 1, what="the allowed target dialed")
        assert service.accepted == 0
    finally:
        telnet.close()


# ---------------------------------------------------------------- item 4: resolved comparison
def test_localhost_reaches_a_local_given_as_127_0_0_1(legacy, service):
    peer = legacy("127.0.0.1:%d" % service.address[1])
    assert served(peer, 1, "localhost", service.address[1])
    assert service.accepted == 1


def test_127_0_0_1_reaches_a_local_given_as_localhost(legacy, service):
    peer = legacy("localhost:%d" % service.address[1])
    assert served(peer, 1, "127.0.0.1", service.address[1])
    assert service.accepted == 1


def test_odd_spellings_of_the_same_address_are_not_a_bypass(legacy, service):
    # The check is on the resolved address: these all are 127.0.0.1:<svc>.
    peer = legacy("127.0.0.1:%d" % service.address[1])
    for client_id, spelling in enumerate(["127.1", "2130706433", "0x7f000001", "0177.0.0.1"], 1):
        assert served(peer, client_id, spelling, service.address[1]), spelling
    assert service.accepted == 4


def test_other_ports_addresses_names_and_spellings_are_refused(legacy, caplog):
    # A decoy on the same port at another loopback address.
    service, decoy = on_same_port(lambda: Service("echo"), "127.0.0.2")
    port = service.address[1]
    other_port = Service("echo")
    try:
        peer = legacy("127.0.0.1:%d" % port)
        refused = [("127.0.0.1", other_port.address[1]),   # other port
                   ("127.0.0.2", port),                    # other address
                   ("0.0.0.0", port),                      # dialing it would reach 127.0.0.1
                   ("10.1.2.3", port),                     # never dialed: refused before any connect
                   ("127.2", port), ("2130706434", port),  # odd spellings of 127.0.0.2
                   ("0x7f000002", port),
                   ("no-such-host.invalid", port)]
        for client_id, (address, target_port) in enumerate(refused, 1):
            assert not served(peer, client_id, address, target_port), address
        assert service.accepted == 0 and other_port.accepted == 0 and decoy.accepted() == 0
        wait_for(lambda: "is not the configured target 127.0.0.1:%d" % port in caplog.text,
                 what="the refusal warning")
        # The link carries on: the configured target still works.
        assert served(peer, 50, "127.0.0.1", port)
    finally:
        other_port.close()
        decoy.close()
        service.close()


def test_a_name_that_resolves_elsewhere_is_refused(legacy):
    # local on 127.0.0.2; `localhost` resolves to 127.0.0.1, where a decoy waits.
    service, decoy = on_same_port(lambda: Listener("127.0.0.2"), "127.0.0.1")
    try:
        peer = legacy("127.0.0.2:%d" % service.address[1])
        peer.send(CONNECT, 1, protocol.encode_connect_payload("localhost", service.address[1]))
        peer.expect(bytes.fromhex("00000201"))
        assert decoy.accepted() == 0 and service.accepted() == 0
    finally:
        service.close()
        decoy.close()


@pytest.mark.parametrize("allowed_family", [socket.AF_INET, socket.AF_INET6])
def test_of_several_addresses_only_the_allowed_one_is_dialed(allowed_family):
    # What getaddrinfo answers for a dual-stack name, built from two real
    # lookups (no name here resolves to both): ::1 and 127.0.0.1, same port.
    v4, v6 = on_same_port(lambda: Listener("127.0.0.1"), "::1", socket.AF_INET6)
    try:
        port = v4.address[1]
        both = resolve_tcp("::1", port) + resolve_tcp("127.0.0.1", port)
        allowed = "127.0.0.1" if allowed_family == socket.AF_INET else "::1"
        chosen = allowed_only(both, [(allowed, port), ("127.0.0.1", port + 1)])
        assert [family for family, _ in chosen] == [allowed_family]
        connect_resolved(chosen, 5).close()
        wanted, other = (v4, v6) if allowed_family == socket.AF_INET else (v6, v4)
        wait_for(lambda: wanted.accepted() == 1, what="the allowed address dialed")
        assert other.accepted() == 0
        assert allowed_only(both, [("127.0.0.2", port), ("localhost", port + 1)]) == []
    finally:
        v4.close()
        v6.close()


def test_localhost_dials_only_its_allowed_addresses(legacy, service):
    # Where localhost is also ::1 (most hosts), a decoy there must stay untouched.
    port = service.address[1]
    try:
        decoy = Listener("::1", port, socket.AF_INET6)
    except OSError:
        decoy = None
    try:
        peer = legacy("127.0.0.1:%d" % port)
        for client_id in range(1, 4):
            assert served(peer, client_id, "localhost", port)
        assert service.accepted == 3
        assert decoy is None or decoy.accepted() == 0
    finally:
        if decoy is not None:
            decoy.close()
