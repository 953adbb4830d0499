"""Legacy peers emulated byte by byte, and the peer pairs the interop suite runs over."""

import socket
import struct
import threading
from typing import Any, Callable, NamedTuple

from tcprc.wire import frames as protocol
from tcprc.wire.frames import CLOSE, CONNECT, DATA, LISTEN

from .net import recv_exactly
from .waiting import wait_for


class RawPeer:
    """One end of an uplink, spoken by hand."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(10)

    def send(self, command, client_id, payload=b""):
        self.sock.sendall(protocol.encode(command, client_id, payload))

    def send_raw(self, data):
        self.sock.sendall(data)

    def read_frame(self):
        """The next frame, skipping a tcprc server's OFFER as a Lua agent does (a
        zero-length unknown command: it logs "bad command" and reads on)."""
        while True:
            length, command, client_id = struct.unpack("!HBB", recv_exactly(self.sock, 4))
            if command != protocol.OFFER or length:
                return command, client_id, recv_exactly(self.sock, length)

    def expect(self, wire: bytes):
        """The next bytes on the wire, exactly."""
        assert recv_exactly(self.sock, len(wire)) == wire

    def nothing_for(self, seconds):
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(10)
        raise AssertionError("unexpected bytes %r" % data)

    def close(self):
        self.sock.close()


class LegacyServer:
    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.address = "%s:%d" % self.listener.getsockname()

    def accept(self) -> RawPeer:
        conn, _ = self.listener.accept()
        return RawPeer(conn)

    def close(self):
        self.listener.close()


def legacy_device(app) -> RawPeer:
    """A Lua agent's uplink to `app`, once its LISTEN opened the host port.

    The tcprc server answers LISTEN with the zero-length OFFER of protocol
    v2, which the Lua agent logs as a bad command and skips: so does this.
    """
    peer = RawPeer(socket.create_connection(app.listen_address))
    peer.send(LISTEN, 0)
    peer.expect(protocol.OFFER_FRAME)
    wait_for(lambda: app.host_address, what="host port open")
    return peer


STALE = b"STALE!!!"


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


class Pair(NamedTuple):
    """One pairing of the interop suite: `id` reads "<device>/<server>"; the end
    that is not emulated is under test, and `app` builds it from its settings."""
    id: str
    under_test: str                 # "device" or "server"
    app: Callable[[Any], Any]


def _tcprc_device(settings: Any) -> Any:
    from tcprc.device.app import DeviceApp
    return DeviceApp(settings)


def _tcprc_server(settings: Any) -> Any:
    from tcprc.server.app import ServerApp
    return ServerApp(settings)


# A v2 implementation joins the suite with a line here per end it provides.
PAIRS = (
    Pair("tcprc-device/legacy-server", "device", _tcprc_device),
    Pair("legacy-device/tcprc-server", "server", _tcprc_server),
)


def pairs(under_test: str) -> list:
    return [p for p in PAIRS if p.under_test == under_test]


def greet_as_v2_server(peer: RawPeer, window: int = 1 << 18) -> Any:
    """Play a tcprc server on an accepted uplink: LISTEN, OFFER, HELLO, CHALLENGE,
    AUTH, WELCOME (no identity).  Returns the device's HELLO fields."""
    from tcprc.wire.server_handshake import ServerHandshake
    assert peer.read_frame() == (LISTEN, 0, b"")
    peer.send_raw(protocol.OFFER_FRAME)
    command, _, hello = peer.read_frame()
    assert command == protocol.HELLO
    handshake = ServerHandshake(lambda device_id: None, window, legacy_allowed=True)
    peer.send(protocol.CHALLENGE, 0, handshake.on_hello(hello))
    command, _, auth = peer.read_frame()
    assert command == protocol.AUTH
    handshake.on_auth(auth)
    peer.send(protocol.WELCOME, 0, handshake.welcome("127.0.0.1:1"))
    return protocol.decode_hello(hello)


def greet_as_v2_device(peer: RawPeer, device_id: str = "", secret: bytes = b"",
                       window: int = 1 << 18) -> Any:
    """Play a tcprc device on a fresh uplink up to the server's answer to AUTH.
    Returns (frames sent after LISTEN: [HELLO, AUTH] payloads, the server's answer)."""
    from tcprc.wire.handshake import DeviceHandshake
    handshake = DeviceHandshake(device_id, secret or None, window)
    peer.send(LISTEN, 0)
    peer.expect(protocol.OFFER_FRAME)
    hello = handshake.hello()
    peer.send(protocol.HELLO, 0, hello)
    command, _, challenge = peer.read_frame()
    if command != protocol.CHALLENGE:
        return [hello], (command, challenge)
    auth = handshake.on_challenge(challenge)
    peer.send(protocol.AUTH, 0, auth)
    command, _, answer = peer.read_frame()
    return [hello, auth], (command, answer)
