"""Each tcprc side against a byte-level emulation of the legacy peer (PROTOCOL.md).

The emulated peer is a bare socket written and read frame by frame in the
test, so every byte tcprc sends is checked as it appears on the wire.  Each
half runs over the peer pairs of support.peers.PAIRS that put its end under
test (ids like "tcprc-device/legacy-server"), so another implementation of a
side joins the same assertions by adding a pair there.
"""

import hashlib
import os
import socket
import struct

import pytest

from support.net import is_eof, recv_exactly, recv_until_eof
from support.peers import RawPeer, legacy_device, pairs
from support.services import Service, pattern
from support.tunnel import Apps
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN


# ---------------------------------------------------------------- tcprc device vs legacy server
@pytest.fixture(params=pairs("device"), ids=lambda pair: pair.id)
def device_app(request):
    """device_app(**keys): the device under test, started; closed at the end."""
    apps = Apps(request.param.app, "device")
    yield apps
    apps.close()


@pytest.fixture
def device_on(device_app, legacy_server, service):
    def start(**keys):
        base = dict(server=legacy_server.address, local="%s:%d" % service.address,
                    reconnect_min=0.05, reconnect_max=0.2)
        base.update(keys)
        app = device_app(**base)
        peer = legacy_server.accept()
        peer.expect(bytes.fromhex("00000400"))        # LISTEN, exactly
        return app, peer

    return start


def test_device_full_use_case_against_legacy_server(device_on, service):
    app, peer = device_on()
    peer.send(CONNECT, 7, protocol.encode_connect_payload("", 23))   # empty: the device's target
    peer.send(DATA, 7, b"hi")
    peer.expect(bytes.fromhex("000203076869"))       # the echo comes back as DATA "hi" for 7
    assert service.accepted == 1
    peer.send(CLOSE, 7)                               # closing case 7
    wait_for(lambda: service.ended == 1, what="service socket closed on CLOSE")
    peer.send(CONNECT, 8, protocol.encode_connect_payload(*service.address))  # exact target
    peer.send(DATA, 8, b"x")
    peer.expect(bytes.fromhex("0001030878"))
    wait_for(lambda: service.open, what="service connection")
    with service.lock:
        service.open[0].shutdown(socket.SHUT_RDWR)    # closing case 6: service goes away
    peer.expect(bytes.fromhex("00000208"))            # CLOSE 8, exactly


def test_device_splits_large_service_output_into_frames_of_at_most_65535(device_app, legacy_server):
    source = Service("source")
    try:
        device_app(server=legacy_server.address, local="%s:%d" % source.address)
        peer = legacy_server.accept()
        peer.expect(bytes.fromhex("00000400"))
        size = 3 << 20
        peer.send(CONNECT, 1, protocol.encode_connect_payload("", 0))
        peer.send(DATA, 1, struct.pack("!Q", size))
        got = bytearray()
        while True:
            command, client_id, payload = peer.read_frame()
            assert client_id == 1
            if command == CLOSE:
                break
            assert command == DATA and 1 <= len(payload) <= 65535
            got += payload
        assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size)).digest()
    finally:
        source.close()


def test_device_writes_maximal_frames_from_server_in_order(device_on):
    sink = None
    app, peer = device_on()
    data = os.urandom(5 * 65535 + 17)
    peer.send(CONNECT, 3, b"\x00\x00\x00\x17")
    for start in range(0, len(data), 65535):
        peer.send(DATA, 3, data[start:start + 65535])
    got = bytearray()
    while len(got) < len(data):
        command, client_id, payload = peer.read_frame()
        assert (command, client_id) == (DATA, 3)
        got += payload
    assert bytes(got) == data
    del sink


def test_device_refuses_targets_outside_its_policy(device_on, service, caplog):
    app, peer = device_on()
    peer.send(CONNECT, 4, protocol.encode_connect_payload("10.0.0.1", 22))
    peer.expect(bytes.fromhex("00000204"))
    peer.send(CONNECT, 5, protocol.encode_connect_payload(service.address[0], service.address[1] + 1))
    peer.expect(bytes.fromhex("00000205"))
    # A target that needs a lookup is refused in its pump thread: the CLOSE is
    # on the wire before the link thread logs why.
    wait_for(lambda: "not the configured target" in caplog.text, what="the refusal warning")
    assert service.accepted == 0
    # The uplink carries on.
    peer.send(CONNECT, 6, protocol.encode_connect_payload("", 23))
    peer.send(DATA, 6, b"ok")
    peer.expect(bytes.fromhex("000203066f6b"))


def test_device_allows_listed_targets(device_app, legacy_server, service):
    other = Service("echo")
    try:
        device_app(server=legacy_server.address, local="%s:%d" % service.address,
                   allow=["%s:%d" % other.address])
        peer = legacy_server.accept()
        peer.expect(bytes.fromhex("00000400"))
        peer.send(CONNECT, 9, protocol.encode_connect_payload(*other.address))
        peer.send(DATA, 9, b"z")
        peer.expect(bytes.fromhex("000103097a"))
        assert other.accepted == 1 and service.accepted == 0
    finally:
        other.close()


def test_device_connect_on_busy_id_replaces_the_stream_silently(device_on, service):
    app, peer = device_on()
    peer.send(CONNECT, 5, protocol.encode_connect_payload("", 23))
    peer.send(DATA, 5, b"a")
    peer.expect(bytes.fromhex("0001030561"))
    peer.send(CONNECT, 5, protocol.encode_connect_payload("", 23))
    wait_for(lambda: service.ended == 1 and service.accepted == 2, what="old stream replaced")
    peer.send(DATA, 5, b"b")
    peer.expect(bytes.fromhex("0001030562"))         # no CLOSE for the old stream came first


def test_device_answers_data_for_unknown_id_with_close_and_ignores_unknown_close(device_on):
    app, peer = device_on()
    peer.send(CLOSE, 42)                              # ignored
    peer.send(DATA, 9, b"lost")
    peer.expect(bytes.fromhex("00000209"))


def test_device_skips_unknown_commands_whole(device_on, caplog):
    app, peer = device_on()
    peer.send(99, 1, bytes([CONNECT, 0, 0, 0]) * 250)   # looks like frames inside: must be skipped
    peer.send(CONNECT, 2, protocol.encode_connect_payload("", 23))
    peer.send(DATA, 2, b"q")
    peer.expect(bytes.fromhex("0001030271"))
    assert "skipped unknown command 99" in caplog.text


def test_device_refuses_malformed_connect_and_keeps_the_link(device_on, caplog):
    app, peer = device_on()
    peer.send(CONNECT, 3, b"\x00\x09127")               # address shorter than its length
    peer.expect(bytes.fromhex("00000203"))
    assert "refused client 3" in caplog.text
    peer.send(CONNECT, 4, protocol.encode_connect_payload("", 23))
    peer.send(DATA, 4, b"k")
    peer.expect(bytes.fromhex("000103046b"))


def test_device_survives_garbage_and_truncation_then_reconnects(device_on, legacy_server, caplog):
    app, peer = device_on()
    peer.send_raw(os.urandom(200_000))
    peer.send_raw(protocol.encode(DATA, 1, b"abcdef")[:7])   # then half a frame, and hang up
    peer.close()
    again = legacy_server.accept()                     # the device dials again by itself
    again.expect(bytes.fromhex("00000400"))
    # The garbage may hold DATA or CONNECT frames the device answers with a
    # CLOSE; the emulated peer never reads those, so its close can be a reset.
    assert any(reason in caplog.text for reason in
               ("in the middle of a frame", "closed by peer", "reset")), caplog.text
    again.send(CONNECT, 1, protocol.encode_connect_payload("", 23))
    again.send(DATA, 1, b"fine")
    again.expect(bytes.fromhex("0004030166696e65"))


def test_device_reports_truncated_frame(device_on, legacy_server, caplog):
    app, peer = device_on()
    peer.send_raw(protocol.encode(DATA, 1, b"abcdef")[:7])
    peer.close()
    legacy_server.accept().expect(bytes.fromhex("00000400"))
    assert "DATA frame for client 1 with 3 of 6 payload bytes" in caplog.text


def test_device_closes_service_sockets_when_uplink_drops(device_on, legacy_server, service):
    app, peer = device_on()
    for n in (1, 2, 3):
        peer.send(CONNECT, n, protocol.encode_connect_payload("", 23))
        peer.send(DATA, n, b"!")
        peer.read_frame()
    assert len(service.open) == 3
    peer.close()
    wait_for(lambda: not service.open, what="service sockets closed after uplink loss")
    legacy_server.accept().expect(bytes.fromhex("00000400"))


def test_device_refuses_connect_when_service_is_down(device_on, service):
    app, peer = device_on()
    service.close()
    peer.send(CONNECT, 11, protocol.encode_connect_payload("", 23))
    peer.expect(bytes.fromhex("0000020b"))            # connect failed: CLOSE 11


# ---------------------------------------------------------------- legacy device vs tcprc server
@pytest.fixture(params=pairs("server"), ids=lambda pair: pair.id)
def server(request):
    """server(**keys): the server under test, on free 127.0.0.1 ports; closed at the end."""
    apps = Apps(request.param.app, "server", listen="127.0.0.1:0", host="127.0.0.1:0")
    yield apps
    apps.close()


def test_server_full_use_case_against_legacy_device(server):
    app = server()
    peer = legacy_device(app)
    client = socket.create_connection(app.host_address, timeout=10)
    # CONNECT client 1 with the default target, explicit (a legacy device cannot
    # dial an empty address): 127.0.0.1:23, exactly as PROTOCOL.md's example.
    peer.expect(bytes.fromhex("000d01010009") + b"127.0.0.1" + bytes.fromhex("0017"))
    client.sendall(b"hello")
    peer.expect(bytes.fromhex("00050301") + b"hello")
    peer.send(DATA, 1, b"world")
    assert recv_exactly(client, 5) == b"world"
    client.close()                                     # closing case 7
    peer.expect(bytes.fromhex("00000201"))
    client2 = socket.create_connection(app.host_address, timeout=10)
    peer.expect(bytes.fromhex("000d01020009") + b"127.0.0.1" + bytes.fromhex("0017"))  # next id
    peer.send(DATA, 2, b"bye")
    peer.send(CLOSE, 2)                                # closing case 6
    assert recv_until_eof(client2) == b"bye"
    client2.close()


def test_server_sends_configured_connect_target(server):
    app = server(connect_address="127.0.0.1", connect_port=22)
    peer = legacy_device(app)
    socket.create_connection(app.host_address, timeout=10)
    assert peer.read_frame() == (CONNECT, 1, protocol.encode_connect_payload("127.0.0.1", 22))


def test_server_closes_all_clients_when_uplink_drops(server):
    app = server()
    peer = legacy_device(app)
    clients = [socket.create_connection(app.host_address, timeout=10) for _ in range(3)]
    for _ in clients:
        assert peer.read_frame()[0] == CONNECT
    peer.close()
    for client in clients:
        assert is_eof(client)
        client.close()
    wait_for(lambda: app.host_address is None, what="host port closed")


def test_server_drops_uplink_that_never_sends_listen(server, caplog):
    app = server(listen_timeout=0.3)
    silent = socket.create_connection(app.listen_address, timeout=10)
    assert is_eof(silent, timeout=5)
    wait_for(lambda: "no LISTEN within 0.3 s" in caplog.text, what="the log line")
    assert app.host_address is None


def test_server_drops_a_peer_that_is_not_a_device(server, caplog):
    app = server(listen_timeout=0.5)
    http = socket.create_connection(app.listen_address, timeout=10)
    http.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert is_eof(http, timeout=5)
    rogue = socket.create_connection(app.listen_address, timeout=10)
    rogue.sendall(protocol.encode(DATA, 1, b"x"))
    assert is_eof(rogue, timeout=5)
    wait_for(lambda: "DATA before LISTEN" in caplog.text, what="the log line")


def test_server_limits_uplinks_waiting_for_listen(server, caplog):
    app = server(max_pending=2, listen_timeout=30)
    waiting = [socket.create_connection(app.listen_address, timeout=10) for _ in range(2)]
    wait_for(lambda: "accepted" in caplog.text and caplog.text.count("accepted") >= 2, what="2 accepted")
    third = socket.create_connection(app.listen_address, timeout=10)
    assert is_eof(waiting[0]), "the one waiting longest makes room"
    wait_for(lambda: "dropped for a newer connection (max_pending = 2)" in caplog.text, what="the log line")
    assert not is_eof(waiting[1], timeout=0.2) and not is_eof(third, timeout=0.2)
    for sock in waiting + [third]:
        sock.close()


def test_server_takeover_by_a_newer_device(server):
    app = server()
    old = legacy_device(app)
    client = socket.create_connection(app.host_address, timeout=10)
    assert old.read_frame()[0] == CONNECT
    new = RawPeer(socket.create_connection(app.listen_address))
    new.send(LISTEN, 0)
    assert is_eof(old.sock), "the old uplink is closed"
    assert is_eof(client), "its clients go with it"
    wait_for(lambda: app.host_address, what="host port reopened")
    client2 = socket.create_connection(app.host_address, timeout=10)
    assert new.read_frame()[0] == CONNECT
    client2.close()


def test_server_refuses_newcomer_without_takeover(server):
    app = server(takeover=False)
    old = legacy_device(app)
    new = RawPeer(socket.create_connection(app.listen_address))
    new.send(LISTEN, 0)
    assert is_eof(new.sock)
    client = socket.create_connection(app.host_address, timeout=10)
    assert old.read_frame()[0] == CONNECT
    client.close()


def test_server_skips_unknown_commands_and_ignores_unexpected_ones(server, caplog):
    app = server()
    peer = legacy_device(app)
    client = socket.create_connection(app.host_address, timeout=10)
    assert peer.read_frame()[0] == CONNECT
    peer.send(200, 1, b"\x00\x01\x03\x01" * 100)         # unknown: skipped whole
    peer.send(CONNECT, 1, b"\x00\x00\x00\x17")          # wrong direction: ignored
    peer.send(DATA, 77, b"nobody")                      # unknown id: dropped
    peer.send(DATA, 1, b"ok")
    assert recv_exactly(client, 2) == b"ok"
    assert "skipped unknown command 200" in caplog.text
    client.close()


def test_device_drops_an_uplink_whose_server_stops_reading(device_app, legacy_server, caplog):
    """A server that never reads: the pumps' sends stall; after send_timeout the
    device gives the uplink up and dials again, rather than hanging forever."""
    source = Service("source")
    try:
        device_app(server=legacy_server.address, local="%s:%d" % source.address,
                   send_timeout=1.0, reconnect_min=0.05, reconnect_max=0.2)
        peer = legacy_server.accept()
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.expect(bytes.fromhex("00000400"))
        peer.send(CONNECT, 1, protocol.encode_connect_payload("", 0))
        peer.send(DATA, 1, struct.pack("!Q", 256 << 20))   # then never read again
        again = legacy_server.accept()
        again.expect(bytes.fromhex("00000400"))
        # SO_SNDTIMEO or TCP_USER_TIMEOUT, whichever the kernel applies first, and
        # seen by a pump's send or by the link's read: the reason must say so.
        reasons = ("uplink write failed: ", "connection lost (reset or timed out)",
                   "uplink error: Connection timed out")
        wait_for(lambda: any("uplink closed: " + r in caplog.text for r in reasons),
                 what="the log line")
        assert "closed by peer" not in caplog.text
        peer.close()
    finally:
        source.close()


def test_server_survives_garbage_after_listen_and_serves_the_next_device(server, caplog):
    app = server()
    peer = legacy_device(app)
    client = socket.create_connection(app.host_address, timeout=10)
    assert peer.read_frame()[0] == CONNECT
    peer.send_raw(os.urandom(300_000))
    peer.send_raw(protocol.encode(DATA, 1, b"abcdef")[:5])   # and half a frame
    peer.close()
    assert is_eof(client)
    wait_for(lambda: app.host_address is None, what="the garbage uplink to end")
    # The server is intact: a proper device gets in and carries a client.
    fresh = legacy_device(app)
    client2 = socket.create_connection(app.host_address, timeout=10)
    _, client_id, _ = fresh.read_frame()
    fresh.send(DATA, client_id, b"alive")
    assert recv_exactly(client2, 5) == b"alive"
    client2.close()
