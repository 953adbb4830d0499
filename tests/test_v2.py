"""Protocol v2 end to end over real sockets: negotiation, authentication, flow control,
half-close, abortive close, heartbeats and stream failure reasons (docs/protocol.md)."""

import hashlib
import socket
import struct
import threading
import time

import pytest

from support.net import free_port, is_eof, recv_exactly, recv_until_eof
from support.peers import (RawPeer, greet_as_v2_device, greet_as_v2_server,
                           legacy_device)
from support.services import Service, pattern
from support.tunnel import Tunnel, settings, start_device, start_server
from support.waiting import wait_for
from tcprc.device.app import DeviceApp
from tcprc.wire import frames as protocol
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN

SECRET = "correct-horse-battery-staple-42"
OTHER = "a-different-secret-of-enough-bits"


def _fleet_server(legacy=None, **keys):
    """A server with one configured device, 'gw1', whose clients use their own port."""
    devices = {"gw1": {"secret": SECRET, "host": "127.0.0.1:%d" % free_port()}}
    if legacy is not None:
        keys["legacy"] = legacy
    return start_server(devices=devices, **keys)


def _next_stream_frame(peer):
    """The next frame of a v2 uplink that is not a heartbeat."""
    while True:
        frame = peer.read_frame()
        if frame[0] not in (protocol.PING, protocol.PONG):
            return frame


def _round_trip(host, data=b"ping through v2"):
    with socket.create_connection(host, timeout=10) as conn:
        conn.sendall(data)
        assert recv_exactly(conn, len(data)) == data


# ---- negotiation -------------------------------------------------------------------

def test_two_tcprc_ends_speak_v2_with_no_configuration(tunnel):
    wait_for(lambda: tunnel.device.status()["protocol"] == "v2", what="v2 on the device")
    status = tunnel.server.status()
    assert status["protocol"] == "v2" and status["sessions"] == 1
    shared = {row["id"]: row for row in tunnel.server.devices()}[":legacy"]   # no identity
    assert shared["protocol"] == "v2" and shared["state"] == "up"
    _round_trip(tunnel.host)
    wait_for(lambda: tunnel.device.status()["rtt"] is not None, what="a PING answered")
    assert 0 < tunnel.device.status()["rtt"] < 5


def test_an_auto_device_sends_a_legacy_server_nothing_but_legacy_frames(legacy_server, service):
    device = DeviceApp(settings("device", server=legacy_server.address,
                                local="%s:%d" % service.address))
    device.start()
    try:
        peer = legacy_server.accept()
        peer.expect(b"\x00\x00\x04\x00")                  # LISTEN, alone
        assert peer.nothing_for(0.5)                      # no HELLO: no OFFER came
        peer.send(CONNECT, 9, protocol.encode_connect_payload("", 0))
        peer.send(DATA, 9, b"legacy bytes")
        assert peer.read_frame() == (DATA, 9, b"legacy bytes")
        peer.send(CLOSE, 9)
        assert peer.nothing_for(0.3)                      # a legacy CLOSE is not answered
        assert device.status()["protocol"] == "legacy"
    finally:
        device.close()


@pytest.mark.parametrize("keys, why", [
    ({"id": "gw1", "secret": SECRET}, "credentials or TLS configured"),
    ({"protocol": "v2"}, 'protocol = "v2"'),
])
def test_a_device_that_must_speak_v2_never_falls_back(legacy_server, service, caplog, keys, why):
    device = DeviceApp(settings("device", server=legacy_server.address, reconnect_min=5,
                                reconnect_max=5, local="%s:%d" % service.address, **keys))
    device.start()
    try:
        peer = legacy_server.accept()
        peer.expect(b"\x00\x00\x04\x00")
        peer.send(CONNECT, 1, protocol.encode_connect_payload("", 0))
        assert is_eof(peer.sock), "the device hangs up: it never answers legacy frames"
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert "the server speaks only the legacy protocol" in error and why in error
        assert service.accepted == 0
    finally:
        device.close()


def test_a_strict_device_gives_up_on_a_silent_legacy_server(legacy_server, service):
    device = DeviceApp(settings("device", server=legacy_server.address, protocol="v2",
                                connect_timeout=0.5, reconnect_min=5, reconnect_max=5,
                                local="%s:%d" % service.address))
    device.start()
    try:
        peer = legacy_server.accept()          # the Java server says nothing until a client comes
        peer.expect(b"\x00\x00\x04\x00")
        assert is_eof(peer.sock, timeout=5)
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert "no OFFER of protocol v2 within 0.5 s" in error
    finally:
        device.close()


def test_a_legacy_device_sees_one_offer_then_legacy_frames(server):
    app = server()
    peer = legacy_device(app)   # reads exactly 00 00 05 02, as the Lua agent skips it
    with socket.create_connection(app.host_address, timeout=10) as client:
        command, client_id, payload = peer.read_frame()
        assert command == CONNECT and payload == protocol.encode_connect_payload("127.0.0.1", 23)
        client.sendall(b"hi")
        assert peer.read_frame() == (DATA, client_id, b"hi")
    assert app.status()["protocol"] == "legacy"


def test_v2_frames_in_a_legacy_session_are_skipped_and_the_tunnel_carries_on(server, caplog):
    app = server()
    peer = legacy_device(app)
    for command, payload in ((protocol.CREDIT, b"\x00\x01\x00\x00"), (protocol.EOF, b""),
                             (protocol.PING, b"12345678")):
        peer.send(command, 1, payload)
    wait_for(lambda: "skipped unknown command 11" in caplog.text, what="the CREDIT skipped")
    with socket.create_connection(app.host_address, timeout=10) as client:
        command, client_id, _ = peer.read_frame()
        assert command == CONNECT
        peer.send(DATA, client_id, b"still here")
        assert recv_exactly(client, 10) == b"still here"


# ---- authentication ------------------------------------------------------------------

def test_an_authenticated_device_gets_its_own_port(service, caplog):
    app = _fleet_server()
    device = start_device(app, service.address, id="gw1", secret=SECRET)
    try:
        wait_for(lambda: app.device_host_address("gw1"), what="gw1's port")
        _round_trip(app.device_host_address("gw1"))
        assert app.host_address is None, "the shared port stays closed"
        assert device.status()["protocol"] == "v2"
        assert {row["id"]: row for row in app.devices()}["gw1"]["protocol"] == "v2"
        assert SECRET not in caplog.text
    finally:
        device.close()
        app.close()


@pytest.mark.parametrize("device_id, secret, what", [
    ("gw1", OTHER, "bad proof for id gw1"),
    ("gw9", SECRET, "unknown id gw9"),        # the device cannot tell: no enumeration
])
def test_a_wrong_secret_or_unknown_id_is_refused_with_one_line(service, caplog, device_id,
                                                               secret, what):
    app = _fleet_server()
    device = start_device(app, service.address, id=device_id, secret=secret,
                     reconnect_min=30, reconnect_max=30)
    try:
        error = wait_for(lambda: device.status()["last_error"], what="the refusal")
        assert error == "the server rejected this device: bad proof: authentication failed"
        line = wait_for(lambda: [r.getMessage() for r in caplog.records
                                 if "refused:" in r.getMessage() and r.name == "tcprc.server"],
                        what="the server's line")
        assert len(line) == 1 and "device %s" % device_id in line[0] and "127.0.0.1" in line[0]
        assert what in line[0]                    # only the server's log says which
        assert app.device_host_address("gw1") is None and app.host_address is None
        assert app.status()["auth_failures"] == 1
        assert SECRET not in caplog.text and OTHER not in caplog.text
    finally:
        device.close()
        app.close()


def test_a_replayed_handshake_fails():
    app = _fleet_server()
    try:
        first = RawPeer(socket.create_connection(app.listen_address))
        sent, answer = greet_as_v2_device(first, "gw1", SECRET.encode())
        assert answer[0] == protocol.WELCOME
        hello, auth = sent
        first.close()
        replay = RawPeer(socket.create_connection(app.listen_address))
        replay.send(LISTEN, 0)
        replay.expect(protocol.OFFER_FRAME)
        replay.send(protocol.HELLO, 0, hello)
        assert replay.read_frame()[0] == protocol.CHALLENGE   # a fresh nonce
        replay.send(protocol.AUTH, 0, auth)
        command, _, payload = replay.read_frame()
        assert command == protocol.REJECT and protocol.decode_reject(payload)[0] == \
            protocol.REJECT_BAD_PROOF
        assert is_eof(replay.sock)
    finally:
        app.close()


def _refusal_on_the_wire(app, device_id, secret, source):
    """A device that names `device_id` and proves `secret`, from `source`:
    the CHALLENGE it gets and the server's answer to its AUTH (raw bytes)."""
    from tcprc.wire.handshake import DeviceHandshake
    sock = socket.create_connection(app.listen_address, timeout=10, source_address=(source, 0))
    peer = RawPeer(sock)
    try:
        handshake = DeviceHandshake(device_id, secret.encode(), 1 << 18)
        peer.send(LISTEN, 0)
        peer.expect(protocol.OFFER_FRAME)
        peer.send(protocol.HELLO, 0, handshake.hello())
        command, _, challenge = peer.read_frame()
        assert command == protocol.CHALLENGE
        peer.send(protocol.AUTH, 0, handshake.on_challenge(challenge))
        answer = peer.read_frame()
        assert is_eof(peer.sock)
        return challenge, answer
    finally:
        peer.close()


def test_an_unknown_id_and_a_wrong_secret_look_the_same_on_the_wire(caplog):
    app = _fleet_server()
    try:
        # Two sources, so that the first failure does not hold the second CHALLENGE.
        unknown = _refusal_on_the_wire(app, "gw9", SECRET, "127.0.0.1")
        wrong = _refusal_on_the_wire(app, "gw1", OTHER, "127.0.0.2")
        # The CHALLENGE of an unknown id is a CHALLENGE like any other: 37 bytes
        # of version, fresh nonce and window.
        for challenge, _ in (unknown, wrong):
            assert len(challenge) == 37 and protocol.decode_challenge(challenge)[1] > 0
        assert unknown[0][33:] == wrong[0][33:] and unknown[0][1:33] != wrong[0][1:33]
        # ... and the refusal is byte for byte the same.
        assert unknown[1] == wrong[1] == (protocol.REJECT, 0, b"\x02authentication failed")
        wait_for(lambda: len([r for r in caplog.records if "refused:" in r.getMessage()
                              and r.name == "tcprc.server"]) == 2, what="both lines")
        lines = [r.getMessage() for r in caplog.records
                 if "refused:" in r.getMessage() and r.name == "tcprc.server"]
        assert "device gw9 refused: unknown id gw9" in lines[0]
        assert "device gw1 refused: bad proof for id gw1" in lines[1]
        assert app.device_host_address("gw1") is None
    finally:
        app.close()


def test_a_device_refuses_a_server_that_cannot_prove_the_secret(legacy_server, service):
    # An impostor that knows the id but not the secret: it takes the device's
    # AUTH without a check and answers WELCOME with a proof made of what it has.
    from tcprc.wire.handshake import server_proof
    from tcprc.wire.server_handshake import ServerHandshake
    device = DeviceApp(settings("device", server=legacy_server.address, id="gw1", secret=SECRET,
                                local="%s:%d" % service.address, reconnect_min=30,
                                reconnect_max=30))
    device.start()
    try:
        peer = legacy_server.accept()
        assert peer.read_frame() == (LISTEN, 0, b"")
        peer.send_raw(protocol.OFFER_FRAME)
        command, _, hello = peer.read_frame()
        assert command == protocol.HELLO
        impostor = ServerHandshake(lambda device_id: OTHER.encode(), 1 << 18, True)
        challenge = impostor.on_hello(hello)
        peer.send(protocol.CHALLENGE, 0, challenge)
        command, _, auth = peer.read_frame()
        assert command == protocol.AUTH and len(auth) == 33
        proof = server_proof(OTHER.encode(), hello, challenge, auth)
        peer.send(protocol.WELCOME, 0, protocol.encode_welcome("127.0.0.1:1", proof))
        command, _, payload = peer.read_frame()
        assert command == protocol.REJECT
        assert protocol.decode_reject(payload) == (
            protocol.REJECT_BAD_PROOF, "the server failed to prove the secret for id gw1 "
            "(wrong proof)")
        assert is_eof(peer.sock)
        error = wait_for(lambda: device.status()["last_error"], what="the device's error")
        assert "the server failed to prove the secret for id gw1" in error
        assert device.status()["protocol"] != "v2"
    finally:
        device.close()


@pytest.mark.parametrize("payload", [b"\x02\x00" + b"n" * 10,      # truncated
                                     b"\x02" * 65535],             # oversized
                         ids=["truncated", "oversized"])
def test_a_malformed_hello_is_rejected_and_the_port_stays_shut(payload, caplog):
    app = _fleet_server()
    try:
        peer = RawPeer(socket.create_connection(app.listen_address))
        peer.send(LISTEN, 0)
        peer.expect(protocol.OFFER_FRAME)
        peer.send(protocol.HELLO, 0, payload)
        command, _, answer = peer.read_frame()
        assert command == protocol.REJECT
        assert protocol.decode_reject(answer)[0] == protocol.REJECT_MALFORMED
        assert is_eof(peer.sock)
        assert app.host_address is None and app.device_host_address("gw1") is None
    finally:
        app.close()


def test_a_half_sent_handshake_ends_at_the_listen_timeout(caplog):
    app = _fleet_server(listen_timeout=0.5)
    try:
        peer = RawPeer(socket.create_connection(app.listen_address))
        peer.send(LISTEN, 0)
        peer.expect(protocol.OFFER_FRAME)
        peer.send_raw(b"\x00\x40\x06\x00\x02")   # a HELLO header and one byte of it
        assert is_eof(peer.sock, timeout=5)
        wait_for(lambda: "handshake not done within 0.5 s" in caplog.text, what="the log line")
    finally:
        app.close()


def test_repeated_failures_from_one_source_slow_it_down():
    app = _fleet_server()
    try:
        waits, rejected = [], None
        for _ in range(3):
            peer = RawPeer(socket.create_connection(app.listen_address))
            peer.send(LISTEN, 0)
            peer.expect(protocol.OFFER_FRAME)
            from tcprc.wire.handshake import DeviceHandshake
            peer.send(protocol.HELLO, 0, DeviceHandshake("gw1", OTHER.encode(), 1 << 18).hello())
            assert peer.read_frame()[0] == protocol.CHALLENGE
            # The penalty runs from the last failure, which came just before its REJECT.
            waits.append(time.monotonic() - rejected if rejected else 0.0)
            peer.send(protocol.AUTH, 0, protocol.encode_auth(b"\x00" * 32))
            assert peer.read_frame()[0] == protocol.REJECT
            rejected = time.monotonic()
            peer.close()
        # No wait before the first failure; then 0.5 s, then 1 s (lower bounds only).
        assert waits[1] >= 0.45 and waits[2] >= 0.95, waits
    finally:
        app.close()


def test_legacy_sessions_are_refused_once_devices_are_configured(caplog):
    app = _fleet_server(listen_timeout=1.0)
    try:
        peer = RawPeer(socket.create_connection(app.listen_address))
        peer.send(LISTEN, 0)
        peer.expect(protocol.OFFER_FRAME)
        assert is_eof(peer.sock, timeout=5)
        wait_for(lambda: "legacy LISTEN refused" in caplog.text, what="the log line")
        assert app.host_address is None
    finally:
        app.close()


def test_legacy_true_keeps_the_shared_port_for_legacy_devices_beside_configured_ones(service):
    app = _fleet_server(legacy=True)
    device = start_device(app, service.address, id="gw1", secret=SECRET)
    try:
        peer = legacy_device(app)
        wait_for(lambda: app.device_host_address("gw1"), what="gw1's port")
        assert app.host_address != app.device_host_address("gw1")
        with socket.create_connection(app.host_address, timeout=10):
            assert peer.read_frame()[0] == CONNECT
        _round_trip(app.device_host_address("gw1"))
    finally:
        device.close()
        app.close()


def test_only_the_same_id_takes_a_port_over(service):
    app = _fleet_server()
    device = start_device(app, service.address, id="gw1", secret=SECRET)
    try:
        port = wait_for(lambda: app.device_host_address("gw1"), what="gw1's port")
        rogue = RawPeer(socket.create_connection(app.listen_address))
        _, answer = greet_as_v2_device(rogue, "gw1", OTHER.encode())
        assert answer[0] == protocol.REJECT
        assert app.device_host_address("gw1") == port
        _round_trip(port)
        owner = RawPeer(socket.create_connection(app.listen_address))   # gw1 after a NAT drop
        _, answer = greet_as_v2_device(owner, "gw1", SECRET.encode())
        assert answer[0] == protocol.WELCOME
        with socket.create_connection(app.device_host_address("gw1"), timeout=10):
            assert _next_stream_frame(owner)[0] == CONNECT
    finally:
        device.close()
        app.close()


# ---- flow control ------------------------------------------------------------------

def test_a_paused_client_pauses_only_its_own_stream():
    source = Service("source")
    tunnel = Tunnel(source.address)
    size = 20 << 20
    try:
        # Not a tiny SO_RCVBUF: on loopback (MSS 64 KB) its window updates would
        # wait for the sender's zero-window probes, backing off for minutes.
        paused = tunnel.client(timeout=60)
        paused.sendall(struct.pack("!Q", size))
        wait_for(lambda: source.accepted == 1, what="the paused download to start")
        results, errors = {}, []

        def download(n):
            try:
                with tunnel.client(timeout=60) as conn:
                    conn.sendall(struct.pack("!Q", size))
                    results[n] = hashlib.sha256(recv_until_eof(conn)).digest()
            except Exception as exc:   # reported below, with the others' results
                errors.append(exc)
        threads = [threading.Thread(target=download, args=(n,)) for n in range(7)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors and len(results) == 7
        assert set(results.values()) == {hashlib.sha256(pattern(size)).digest()}
        # The paused stream held at most its window on the server, and is still open.
        link = tunnel.server.link_on()
        # Held here: at most its window (grown, maybe, while its kernel buffers
        # still took everything), within the uplink's growth budget.
        from tcprc.wire.streams import GROWTH, GROWTH_BUDGET_WINDOWS
        window = link.session.window
        assert all(s.pending_bytes <= s.rules.window <= GROWTH * window
                   for s in link.streams.values())
        assert link.session.grown() <= GROWTH_BUDGET_WINDOWS * window
        assert tunnel.server.status()["clients"] == 1
        assert recv_until_eof(paused) == pattern(size)
        paused.close()
    finally:
        tunnel.close()
        source.close()


def test_data_past_the_window_closes_that_stream_only(legacy_server, service, caplog):
    device = DeviceApp(settings("device", server=legacy_server.address, window=16384,
                                local="%s:%d" % service.address))
    device.start()
    try:
        peer = legacy_server.accept()
        hello = greet_as_v2_server(peer)
        assert hello[1] == 16384   # the device's window
        peer.send(CONNECT, 1, protocol.encode_connect_payload("", 0))
        peer.send(CONNECT, 2, protocol.encode_connect_payload("", 0))
        peer.send(DATA, 2, b"x" * 16385)
        command, client_id, payload = peer.read_frame()
        while command != CLOSE:     # CREDIT for what the service took first, maybe
            command, client_id, payload = peer.read_frame()
        assert client_id == 2
        assert protocol.decode_close_reason(payload)[0] == protocol.CLOSE_ERROR
        peer.send(DATA, 1, b"stream 1 lives")
        assert peer.read_frame() == (DATA, 1, b"stream 1 lives")
        assert "past its window" in caplog.text
    finally:
        device.close()


# ---- half-close and abortive close ------------------------------------------------------

class ReadToEofThenAnswer:
    """A service that reads until the client's EOF, then answers with the sha256 of it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = self.sock.getsockname()
        self.errors = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            try:
                conn.sendall(hashlib.sha256(recv_until_eof(conn)).digest())
            except OSError as exc:
                self.errors.append(exc)

    def close(self):
        self.sock.close()


def test_half_close_reaches_the_service_and_its_answer_comes_back():
    service = ReadToEofThenAnswer()
    tunnel = Tunnel(service.address)
    try:
        data = pattern(3 << 20)
        with tunnel.client() as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == hashlib.sha256(data).digest()
        assert not service.errors
    finally:
        tunnel.close()
        service.close()


def test_the_service_half_closes_and_the_client_still_sends(service):
    received = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"greeting")
            conn.shutdown(socket.SHUT_WR)
            received.append(recv_until_eof(conn))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    tunnel = Tunnel(listener.getsockname())
    try:
        with tunnel.client() as client:
            assert recv_until_eof(client) == b"greeting"   # EOF, with the stream still open
            client.sendall(b"after your EOF")
            client.shutdown(socket.SHUT_WR)
            thread.join(10)
        assert received == [b"after your EOF"]
        wait_for(lambda: tunnel.server.status()["clients"] == 0, what="the stream closed")
    finally:
        tunnel.close()
        listener.close()


def _reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_reset_reaches_the_service_as_a_reset():
    accepted = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    tunnel = Tunnel(listener.getsockname())
    try:
        client = tunnel.client()
        client.sendall(b"x")
        conn = wait_for(lambda: accepted and accepted[0], what="the service's connection")
        conn.settimeout(10)
        assert recv_exactly(conn, 1) == b"x"
        _reset(client)
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        conn.close()
    finally:
        tunnel.close()
        listener.close()


def test_a_service_reset_reaches_the_client_as_a_reset_and_a_graceful_close_does_not():
    accepted = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)

    def serve():
        for _ in range(2):
            accepted.append(listener.accept()[0])
    threading.Thread(target=serve, daemon=True).start()
    tunnel = Tunnel(listener.getsockname())
    try:
        abrupt = tunnel.client()
        abrupt.sendall(b"a")
        conn = wait_for(lambda: accepted and accepted[0], what="the first connection")
        _reset(conn)
        with pytest.raises(ConnectionResetError):
            while abrupt.recv(10):
                pass
        graceful = tunnel.client()
        graceful.sendall(b"b")
        conn = wait_for(lambda: len(accepted) == 2 and accepted[1], what="the second connection")
        conn.settimeout(10)
        assert conn.recv(1) == b"b"   # unread input would make close() send RST
        conn.sendall(b"bye")
        conn.close()
        assert recv_until_eof(graceful) == b"bye"
    finally:
        tunnel.close()
        listener.close()


# ---- why a stream failed -----------------------------------------------------------

def test_the_server_logs_why_the_device_could_not_open_a_stream(caplog):
    closed_port = free_port()
    tunnel = Tunnel(("127.0.0.1", closed_port))
    try:
        with tunnel.client() as client:
            assert recv_until_eof(client) == b""
        line = wait_for(lambda: [r.getMessage() for r in caplog.records
                                 if "could not open it" in r.getMessage()], what="the line")[0]
        assert ": refused: " in line and "127.0.0.1:" in line
    finally:
        tunnel.close()


# ---- heartbeats ---------------------------------------------------------------------

class BlackHoleRelay:
    """Forwards TCP both ways until black_hole(): then carries nothing on the
    connections it has while keeping them open, as a NAT that lost its mapping.
    New connections are forwarded again (a fresh mapping)."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = "%s:%d" % self.sock.getsockname()
        self.generation = 0
        self.accepted = 0
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def black_hole(self):
        self.generation += 1

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            self.held += [conn, upstream]
            generation = self.generation
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b, generation), daemon=True).start()

    def _pipe(self, a, b, generation):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.generation != generation:
                continue   # swallowed: the path is silent, both TCP ends live on
            try:
                b.sendall(data)
            except OSError:
                return

    def close(self):
        self.sock.close()
        for sock in self.held:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_a_black_holed_uplink_ends_within_the_heartbeat_timeout(service, caplog):
    keys = {"heartbeat_interval": 1.0, "heartbeat_timeout": 2.0}
    app = start_server(**keys)
    relay = BlackHoleRelay(app.listen_address)
    device = DeviceApp(settings("device", server=relay.address, local="%s:%d" % service.address,
                                reconnect_min=0.05, reconnect_max=0.2, **keys))
    device.start()
    try:
        wait_for(lambda: app.status()["protocol"] == "v2", what="the first session")
        first = app.link_on()
        relay.black_hole()
        # TCP alone would not notice for minutes: the heartbeat ends it (no time
        # limit asserted here: the log says which mechanism did).
        wait_for(lambda: relay.accepted == 2, timeout=30, what="the device to redial")
        wait_for(lambda: app.link_on() not in (None, first), timeout=20, what="the new session")
        assert first.wait_stopped(10) and "heartbeat timeout" in first.end_reason
        _round_trip(app.host_address)
        assert "no frame from the peer for" in caplog.text
    finally:
        device.close()
        relay.close()
        app.close()


def test_a_secret_is_rotated_without_losing_the_device(service):
    new = "the-new-secret-for-gw1-rotation"
    app = _fleet_server()
    device = start_device(app, service.address, id="gw1", secret=SECRET)
    try:
        wait_for(lambda: app.device_host_address("gw1"), what="gw1's port")
        host = app.settings.devices["gw1"].host
        rotating = {"gw1": {"host": host, "secret": new, "previous_secret": SECRET}}
        app.apply_settings(settings("server", listen=app.settings.listen, host=app.settings.host,
                                    devices=rotating))
        # Its session restarts (the entry changed) and the old secret still proves it.
        wait_for(lambda: app.device_host_address("gw1") and app.link_on("gw1")
                 and app.link_on("gw1").device_id == "gw1", what="gw1 back with the old secret")
        device.apply_settings(device.settings._replace(secret=app.settings.devices["gw1"].secret))
        wait_for(lambda: device.status()["state"] == "up" and app.device_host_address("gw1"),
                 what="gw1 back with the new secret")
        before = app.link_on("gw1")
        done = {"gw1": {"host": host, "secret": new}}
        app.apply_settings(settings("server", listen=app.settings.listen, host=app.settings.host,
                                    devices=done))
        wait_for(lambda: app.link_on("gw1") not in (None, before) and app.link_on("gw1").listening,
                 what="gw1 back after the old secret is gone")
        _round_trip(app.device_host_address("gw1"))
        assert app.status()["auth_failures"] == 0
    finally:
        device.close()
        app.close()


def test_a_device_behind_a_slow_relay_still_gets_v2(service):
    """The server waits for HELLO by the uplink's TCP round trip, which a relay or a
    proxy in the path hides: a HELLO after that wait, before any client, still
    makes the session v2 (it used to be refused as too late, every redial)."""
    from support.impair import Relay
    app = start_server()
    relay = Relay(app.listen_address, delay=0.3)
    relay.start()
    device = DeviceApp(settings("device", server="%s:%d" % relay.address, reconnect_min=5,
                                reconnect_max=5, local="%s:%d" % service.address))
    device.start()
    try:
        wait_for(lambda: app.status()["protocol"] == "v2" and device.status()["protocol"] == "v2",
                 timeout=20, what="a v2 session through the relay")
        link = app.link_on()
        _round_trip(app.host_address)
        assert app.link_on() is link and device.status()["last_error"] == ""
    finally:
        device.close()
        relay.close()
        app.close()


def test_two_devices_with_any_free_port_get_a_port_each(service):
    devices = {"gw1": {"secret": SECRET, "host": "127.0.0.1:0"},
               "gw2": {"secret": SECRET + "-2", "host": "127.0.0.1:0"}}
    app = start_server(devices=devices)
    one = start_device(app, service.address, id="gw1", secret=SECRET)
    two = start_device(app, service.address, id="gw2", secret=SECRET + "-2")
    try:
        wait_for(lambda: app.device_host_address("gw1") and app.device_host_address("gw2"),
                 what="both ports")
        assert app.device_host_address("gw1") != app.device_host_address("gw2")
        assert app.link_on("gw1") is not app.link_on("gw2")
        _round_trip(app.device_host_address("gw1"))
        _round_trip(app.device_host_address("gw2"))
    finally:
        one.close()
        two.close()
        app.close()


def test_a_stream_that_keeps_up_gets_a_bigger_window_within_the_uplinks_budget():
    from tcprc.wire.streams import GROWTH, GROWTH_BUDGET_WINDOWS
    source = Service("source")
    tunnel = Tunnel(source.address)
    size = 48 << 20
    try:
        with tunnel.client(timeout=60) as conn:
            conn.sendall(struct.pack("!Q", size))
            got = recv_exactly(conn, 8 << 20)
            link = tunnel.server.link_on()
            stream = next(iter(link.streams.values())).rules
            window = link.session.window
            assert window < stream.window <= GROWTH * window
            assert link.session.grown() == stream.window - window <= GROWTH_BUDGET_WINDOWS * window
            got += recv_until_eof(conn)
        assert got == pattern(size)
        wait_for(lambda: not link.streams and link.session.grown() == 0,
                 what="the growth given back")
    finally:
        tunnel.close()
        source.close()
