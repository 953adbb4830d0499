"""`tcprc demo`: a server, a device and an echo service on 127.0.0.1, a tunnel between them.

Everything runs in this process on ephemeral loopback ports; nothing is
configured or left behind.  Exit status 0 when every check passed.
"""

import hashlib
import logging
import os
import socket
import threading
import time
from typing import Callable, List, Tuple

from .ops.config import build_config
from .device.app import DeviceApp
from .server.app import ServerApp

HostPort = Tuple[str, int]


class EchoService:
    """The device's "service": echoes every byte back, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.address: HostPort = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="demo-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for " + what)
        time.sleep(0.01)


def round_trip(address: HostPort, payload: bytes, timeout: float = 60.0) -> Tuple[bytes, float]:
    """Send `payload` through the echo tunnel while reading it back; (echo, seconds)."""
    received: List[bytes] = []
    with socket.create_connection(address, timeout=timeout) as conn:
        started = time.monotonic()

        def send() -> None:
            conn.sendall(payload)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        remaining = len(payload)
        while remaining:
            chunk = conn.recv(min(remaining, 1 << 20))
            if not chunk:
                break
            received.append(chunk)
            remaining -= len(chunk)
        sender.join(timeout)
        elapsed = time.monotonic() - started
    return b"".join(received), elapsed


def run_demo(megabytes: int = 32, out: Callable[[str], None] = print) -> int:
    logging.getLogger("tcprc").setLevel(logging.WARNING)
    service = EchoService()
    # Loopback only, uplinks from loopback only: the demo runs nothing anyone else can reach.
    server_cfg = build_config("server", {"server": {"listen": "127.0.0.1:0", "host": "127.0.0.1:0",
                                                    "allow_from": ["127.0.0.0/8"]},
                                         "control": {"socket": ""}}, "demo")
    server = ServerApp(server_cfg.server)
    server.start()
    device_cfg = build_config("device", {"device": {
        "server": "%s:%d" % server.listen_address,
        "local": "%s:%d" % service.address,
        "reconnect_min": 0.1}, "control": {"socket": ""}}, "demo")
    device = DeviceApp(device_cfg.device)
    failures = 0
    try:
        out("tcprc demo: everything on 127.0.0.1, ephemeral ports")
        out("  service (echo)      %s:%d   the device's LocalAddress:LocalPort" % service.address)
        out("  server uplink port  %s:%d   ServerAddress:ServerPort" % server.listen_address)
        device.start()
        wait_for(lambda: server.host_address is not None, what="the device's LISTEN")
        host = server.host_address
        out("  device dialed out and sent LISTEN; server opened HostAddress:HostPort %s:%d" % host)

        echo, _ = round_trip(host, b"hello through the tunnel\n")
        ok = echo == b"hello through the tunnel\n"
        failures += not ok
        out("1. one client, one line: %s" % ("echoed back intact" if ok else "FAILED: %r" % echo))

        payload = os.urandom(megabytes << 20)
        echo, seconds = round_trip(host, payload)
        ok = hashlib.sha256(echo).digest() == hashlib.sha256(payload).digest()
        failures += not ok
        rate = 2 * len(payload) / seconds / 1e6
        out("2. %d MB up and back down at once: sha256 %s, %.1f s, %.0f MB/s through the tunnel "
            "(both directions together)" % (megabytes, "matches" if ok else "DIFFERS", seconds, rate))

        results: List[bool] = []
        chunks = [os.urandom(256 << 10) for _ in range(10)]

        def one_client(data: bytes) -> None:
            back, _ = round_trip(host, data)
            results.append(back == data)

        threads = [threading.Thread(target=one_client, args=(c,)) for c in chunks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        ok = len(results) == 10 and all(results)
        failures += not ok
        out("3. 10 clients at once over the one uplink, 256 KB each: %s"
            % ("all intact" if ok else "FAILED (%d of 10 intact)" % sum(results)))

        wait_for(lambda: server.status()["clients"] == 0 and device.status()["clients"] == 0,
                 what="streams to close")
        status = device.status()
        out("4. clients hung up; both sides closed their streams (open clients: 0); "
            "device moved %d bytes up, %d down" % (status["bytes_up"], status["bytes_down"]))
    except (OSError, TimeoutError) as exc:
        out("demo FAILED: %s" % exc)
        failures += 1
    finally:
        device.close()
        server.close()
        service.close()
    out("demo %s" % ("passed" if not failures else "FAILED (%d checks)" % failures))
    return 0 if not failures else 1
