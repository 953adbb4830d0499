"""Client ids the server closed are held until the device's CLOSE answers (issue 9, item 1).

The legacy Lua agent answers every CLOSE from the server with its own, and
may send DATA for the old stream before it; a tcprc device never answers but
may have DATA in flight.  Neither may reach the next client of that id.
Emulated devices here are bare sockets written frame by frame in the test.
"""

import fcntl
import logging
import resource
import socket
import struct
import termios
import threading

import pytest

from conftest import Tunnel, recv_exactly, settings, wait_for
from tcprc.wire import frames as protocol
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN
from tcprc.server.app import ServerApp
from tcprc.server.ids import ClientIds

STALE = b"STALE!!!"


def _raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("needs %d file descriptors, hard limit is %d" % (need, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class RawDevice:
    """A legacy device spoken by hand, with an echo service behind every client.

    answer=True plays the Lua agent: `delay` seconds after a CLOSE from the
    server it sends DATA for the old stream (`STALE`), then its own CLOSE.
    answer=False plays a device that never answers but reads our CLOSE `delay`
    seconds late, with DATA of the old stream sent just before.
    """

    def __init__(self, app, answer=True, delay=0.15):
        self.sock = socket.create_connection(app.listen_address, timeout=10)
        self.answer = answer
        self.delay = delay
        self.lock = threading.Lock()
        self.connects = []
        self.pending = 0       # CLOSEs from the server whose stale frames are not sent yet
        self.answered = 0
        self.timers = []
        self.send(LISTEN, 0)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, command, client_id, payload=b""):
        with self.lock:
            self.sock.sendall(protocol.encode(command, client_id, payload))

    def _read(self):
        try:
            while True:
                length, command, client_id = struct.unpack("!HBB", recv_exactly(self.sock, 4))
                payload = recv_exactly(self.sock, length)
                if command == CONNECT:
                    with self.lock:
                        self.connects.append(client_id)
                elif command == DATA:
                    self.send(DATA, client_id, payload)      # the echo service
                elif command == CLOSE:
                    with self.lock:
                        self.pending += 1
                    if self.answer:
                        timer = threading.Timer(self.delay, self._answer, (client_id,))
                        self.timers.append(timer)
                        timer.start()
                    else:
                        # Busy elsewhere: the old stream's last DATA leaves before our
                        # CLOSE is read (emulated device lag, not synchronisation).
                        threading.Event().wait(self.delay)
                        self.send(DATA, client_id, STALE)
                        with self.lock:
                            self.pending -= 1
        except (OSError, EOFError):
            pass

    def _answer(self, client_id):
        try:
            self.send(DATA, client_id, STALE)
            self.send(CLOSE, client_id)
        except OSError:
            pass
        with self.lock:
            self.pending -= 1
            self.answered += 1

    def settled(self):
        with self.lock:
            return self.pending == 0

    def close(self):
        for timer in self.timers:
            timer.cancel()
        self.sock.close()
        self.reader.join(5)


@pytest.fixture
def server_app():
    apps = []

    def start(**keys):
        # Loopback only: no start-up warning about uplinks from anywhere.
        base = dict(listen="127.0.0.1:0", host="127.0.0.1:0", allow_from=["127.0.0.0/8"])
        base.update(keys)
        app = ServerApp(settings("server", **base))
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.close()


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
    _raise_fd_limit(4096)
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
        assert app._active.ids.answering
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
    _raise_fd_limit(4096)
    app = server_app()
    device = start(app, devices, answer=True, delay=0.0)
    clients = fill(app, 254)                                 # ids 1..254
    try:
        link = app._active
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
    _raise_fd_limit(4096)
    caplog.set_level(logging.DEBUG, logger="tcprc")
    app = server_app()
    device = start(app, devices, answer=False, delay=0.01)  # within the grace
    clients = fill(app, 254)
    try:
        for n in range(20):
            cycle(app, device, n)
        assert device.answered == 0 and not app._active.ids.answering
        # The next client waited in the backlog for the grace: never refused.
        assert "refused client" not in caplog.text
        assert "held until the device's CLOSE" in caplog.text
    finally:
        for client in clients:
            client.close()


def test_tcprc_device_connection_churn_is_never_refused(service, caplog):
    """The bench's pattern: connect, one round trip, close, as fast as it goes.
    A tcprc device never answers CLOSE, so ids come back after the short grace."""
    tunnel = Tunnel(service.address)
    try:
        for n in range(600):                                 # the 255 ids, more than twice
            with tunnel.client() as client:
                client.sendall(b"%04d" % n)
                assert recv_exactly(client, 4) == b"%04d" % n
        assert "refused client" not in caplog.text
        assert not tunnel.server._active.ids.answering
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
