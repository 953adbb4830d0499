"""Client ids the server closed are held until the device's CLOSE answers (issue 9, item 1).

The legacy Lua agent answers every CLOSE from the server with its own, and
may send DATA for the old stream before it; a tcprc device never answers but
may have DATA in flight.  Neither may reach the next client of that id.
Emulated devices here are bare sockets written frame by frame in the test.
"""

import fcntl
import logging
import socket
import struct
import termios
import threading

import pytest

from support.net import raise_fd_limit, recv_exactly
from support.peers import STALE, RawDevice
from support.tunnel import Tunnel
from support.waiting import wait_for
from tcprc.server.ids import ClientIds


@pytest.fixture
def server_app(server):
    # Loopback only: no start-up warning about uplinks from anywhere.
    server.base["allow_from"] = ["127.0.0.0/8"]
    return server


@pytest.fixture
def devices():
    started = []
    yield started
    for device in started:
        device.close()


def start(app, devices, **keys):
    device = RawDevice(app, **keys)
    devices.append(device)
    wait_for(lambda: app.host_address, what="host port open")
    return device


def round_trip(app, tag):
    """A client and one round trip; None when the server refused it (closed at once)."""
    client = socket.create_connection(app.host_address, timeout=10)
    try:
        client.sendall(tag)
        got = b""
        while len(got) < len(tag):
            chunk = client.recv(len(tag) - len(got))
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        got = b""
    if not got:
        client.close()
        return None
    assert got == tag, "client got %r for %r" % (got, tag)
    return client


def fill(app, count):
    """`count` clients that stay connected, each checked by a round trip."""
    clients = []
    for n in range(count):
        client = round_trip(app, b"busy%03d" % n)
        assert client is not None, "client %d refused" % n
        clients.append(client)
    return clients


def cycle(app, device, n):
    """A client on the last free id: accepted once the old stream's frames are
    dealt with, then it must see only its own bytes and not be hung up."""
    client = wait_for(lambda: round_trip(app, b"ping%03d" % n), what="client %d accepted" % n,
                      interval=0.002)
    wait_for(device.settled, what="the device's late frames for the old stream")
    # The device's stale frames went up the uplink before this echo.
    client.sendall(b"pong%03d" % n)
    assert recv_exactly(client, 7) == b"pong%03d" % n
    client.close()
    # Polled tightly: the next client comes as soon as the id is free here.
    wait_for(lambda: app.status()["clients"] == 254, what="client %d gone" % n, interval=0.001)


def test_lua_device_answering_close_late_never_reaches_the_next_client(server_app, devices, caplog):
    raise_fd_limit(4096)
    caplog.set_level(logging.DEBUG, logger="tcprc")
    app = server_app()
    device = start(app, devices, answer=True, delay=0.15)   # later than the short grace
    # With ids to spare the answer comes before id 1 is due again: the server
    # learns that this device answers CLOSE.
    round_trip(app, b"learn00").close()
    wait_for(lambda: device.answered == 1, what="the device's answer")
    clients = fill(app, 254)                                 # ids 2..255, after the answer
    try:
        for n in range(25):                                  # id 1 over and over
            cycle(app, device, n)
        assert app.link_on().ids.answering
        assert device.connects.count(1) == 26
        assert "DATA for unknown client 1 dropped (held until the device's CLOSE)" in caplog.text
        assert "CLOSE for client 1 answers ours" in caplog.text
        assert "(1 closed, awaiting the device's CLOSE)" in caplog.text   # refused meanwhile
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                    and "refused client" not in r.getMessage()]
    finally:
        for client in clients:
            client.close()


def test_answer_read_before_the_pump_exited_counts_as_the_device_close(server_app, devices, caplog):
    raise_fd_limit(4096)
    app = server_app()
    device = start(app, devices, answer=True, delay=0.0)
    clients = fill(app, 254)                                 # ids 1..254
    try:
        link = app.link_on()
        client = round_trip(app, b"first00")                 # id 255
        # Hold the link thread so that the pump's CLOSE goes out, the device's
        # answer is in the uplink's receive buffer, and only then the link
        # runs: the answer is read before the pump's exit is handled.
        gate, blocked = threading.Event(), threading.Event()
        link.loop.call_soon(lambda: (blocked.set(), gate.wait(10)))
        wait_for(blocked.is_set, what="the link thread held")
        client.close()
        wait_for(lambda: device.answered == 1, what="the device's answer")
        unread = lambda: struct.unpack("i", fcntl.ioctl(link.sock.fileno(), termios.FIONREAD,
                                                        b"\0\0\0\0"))[0]
        wait_for(lambda: unread() >= len(STALE) + 8, what="the answer in the uplink buffer")
        gate.set()
        wait_for(lambda: app.status()["clients"] == 254, what="id 255 closed")
        assert "client 255 (127.0.0.1:" in caplog.text and "closed; the peer answered" in caplog.text
        # That answer taught the server the device answers: the next close of id
        # 255 is held until the (now late) answer comes.
        device.delay = 0.15
        for n in range(5):
            cycle(app, device, n)
    finally:
        for client in clients:
            client.close()


def test_data_in_flight_from_a_silent_device_is_dropped_and_the_client_waits(server_app, devices,
                                                                                caplog):
    raise_fd_limit(4096)
    caplog.set_level(logging.DEBUG, logger="tcprc")
    app = server_app()
    device = start(app, devices, answer=False, delay=0.01)  # within the grace
    clients = fill(app, 254)
    try:
        for n in range(20):
            cycle(app, device, n)
        assert device.answered == 0 and not app.link_on().ids.answering
        # The next client waited in the backlog for the grace: never refused.
        assert "refused client" not in caplog.text
        assert "held until the device's CLOSE" in caplog.text
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("protocol", ["legacy", "auto"])
def test_tcprc_device_connection_churn_is_never_refused(service, caplog, protocol):
    """The bench's pattern: connect, one round trip, close, as fast as it goes.
    A legacy tcprc device never answers CLOSE, so ids come back after the short
    grace; in v2 every CLOSE is answered, which frees the id exactly."""
    tunnel = Tunnel(service.address, device_keys={"protocol": protocol})
    try:
        for n in range(600):                                 # the 255 ids, more than twice
            with tunnel.client() as client:
                client.sendall(b"%04d" % n)
                assert recv_exactly(client, 4) == b"%04d" % n
        assert "refused client" not in caplog.text
        assert tunnel.server.link_on().ids.answering == (protocol == "auto")
    finally:
        tunnel.close()


def test_client_ids_hold_rules():
    ids = ClientIds(quarantine=10.0)
    busy = {n: True for n in range(2, 256)}
    assert ids.allocate(busy, now=0.0) == 1
    ids.hold(1, 0.0, 0.05)
    assert ids.allocate(busy, now=0.01) is None and ids.wait == pytest.approx(0.04)
    assert ids.allocate(busy, now=0.06) == 1                 # the grace ran out: reused
    # A device that never answers: every reuse counts against answering, so one
    # CLOSE that merely crossed ours does not make it an answerer.
    for t in (1.0, 2.0):
        ids.hold(1, t, 0.05)
        assert ids.allocate(busy, now=t + 0.1) == 1
    assert ids.answer(1, closing=True) and not ids.answering
    # Answers make it one; its ids are then held for the quarantine, and a client
    # that finds only held ids is refused, not kept waiting.
    for _ in range(4):
        ids.hold(1, 3.0, 0.05)
        assert ids.answer(1)
    assert ids.answering
    ids.hold(1, 4.0, 0.05)
    assert ids.allocate(busy, now=13.9) is None and ids.wait == 0.0
    assert ids.allocate(busy, now=14.1) == 1                 # the quarantine ran out
    assert not ids.answer(1)                                 # reused: not ours any more
    # A late answer for an id whose hold ran out but which is not reused yet counts.
    ids.hold(1, 20.0, 0.05)
    assert ids.answer(1)
    assert ids.allocate({}, now=21.0) == 2 and ids.allocate({1: True}, now=21.0) == 3
