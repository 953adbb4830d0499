"""A device that a server turns away says so; a CLOSE is ACKed at once."""

import socket

from support.peers import LegacyServer
from support.tunnel import settings
from support.waiting import wait_for
from tcprc.wire import frames as protocol
from tcprc.device.app import DeviceApp
from tcprc.wire.frames import CLOSE, CONNECT, DATA
from tcprc.server.app import ServerApp


def test_a_device_refused_by_a_server_without_takeover_says_so(service, caplog):
    server = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:0", takeover=False))
    server.start()
    address = "%s:%d" % server.listen_address
    keys = dict(server=address, local="%s:%d" % service.address, reconnect_min=5, reconnect_max=5)
    first = DeviceApp(settings("device", **keys))
    first.start()
    second = None
    try:
        wait_for(lambda: server.host_address, what="the first device's LISTEN")
        second = DeviceApp(settings("device", **keys))
        second.start()
        status = wait_for(lambda: second.status()["last_error"] and second.status(),
                          what="the second device's uplink to end")
        # Two tcprc ends speak v2: the server says why in its REJECT.
        assert status["last_error"].startswith("the server rejected this device: host port busy")
        assert "takeover = false" in status["last_error"]
        assert "WARNING" in [r.levelname for r in caplog.records
                             if r.getMessage().endswith(status["last_error"])]
        assert first.status()["state"] == "up" and first.status()["last_error"] == ""
    finally:
        if second is not None:
            second.close()
        first.close()
        server.close()


def test_an_uplink_lost_after_frames_is_not_called_a_refusal(service):
    legacy = LegacyServer()
    app = DeviceApp(settings("device", server=legacy.address, local="%s:%d" % service.address,
                             reconnect_min=5, reconnect_max=5))
    app.start()
    try:
        peer = legacy.accept()
        peer.expect(bytes.fromhex("00000400"))
        peer.send(CONNECT, 1, protocol.encode_connect_payload("", 0))
        peer.send(DATA, 1, b"x")
        peer.expect(bytes.fromhex("0001030178"))
        peer.close()
        error = wait_for(lambda: app.status()["last_error"], what="the uplink to end")
        assert error == "uplink lost: closed by peer"
    finally:
        app.close()
        legacy.close()


def test_a_close_is_acked_at_once_for_a_server_with_nagle(service):
    # The Java server writes with Nagle on: a small frame waits until the
    # previous one is ACKed.  A CLOSE the device does not answer must not wait
    # for its delayed ACK (40 ms or more), or every next client waits too.
    legacy = LegacyServer()   # its sockets keep Nagle on, like the Java server's
    app = DeviceApp(settings("device", server=legacy.address, local="%s:%d" % service.address))
    app.start()
    try:
        peer = legacy.accept()
        peer.expect(bytes.fromhex("00000400"))
        uplink = wait_for(lambda: app._link, what="the device's link").sock
        for client_id in range(1, 4):
            peer.send(CONNECT, client_id, protocol.encode_connect_payload("", 0))
            peer.send(DATA, client_id, b"ping")
            peer.expect(bytes([0, 4, DATA, client_id]) + b"ping")
            # The device answered DATA at once: its socket now delays ACKs
            # (interactive mode), as on a real session.
            ended = service.ended
            peer.send(CLOSE, client_id)
            wait_for(lambda: service.ended > ended, what="the service socket closed on CLOSE")
            # The device acted on the CLOSE; it ACKed it then, not on a timer:
            # the kernel shows it left delayed-ACK mode (TCP_QUICKACK reads 1).
            assert uplink.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        app.close()
        legacy.close()


def test_a_host_port_the_server_cannot_open_is_a_server_error_not_a_busy_port(service):
    """REJECT 7 (server error) when the device's host port cannot be bound (another
    program holds it); REJECT 5 (host port busy) is for a port a live uplink holds."""
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen(1)
        taken = "127.0.0.1:%d" % other_program.getsockname()[1]
        secret = "correct-horse-battery-staple-42"
        server = ServerApp(settings("server", listen="127.0.0.1:0", host="127.0.0.1:0",
                                    devices={"gw1": {"secret": secret, "host": taken}}))
        server.start()
        device = DeviceApp(settings("device", server="%s:%d" % server.listen_address,
                                    local="%s:%d" % service.address, id="gw1", secret=secret,
                                    reconnect_min=5, reconnect_max=5))
        device.start()
        try:
            error = wait_for(lambda: device.status()["last_error"], what="the refusal")
            assert error.startswith("the server rejected this device: server error: cannot "
                                    "open host port %s" % taken), error
        finally:
            device.close()
            server.close()
