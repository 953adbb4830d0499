"""Shared test helpers: real sockets on 127.0.0.1, real threads and processes, no mocks."""

import hashlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from tcprc.config import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HostPort = Tuple[str, int]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def settings(role: str, **keys: Any) -> Any:
    """A validated settings section for `role`, from keyword overrides."""
    return getattr(build_config(role, {role: keys}, "test"), role)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            raise EOFError("peer closed with %d bytes missing" % count)
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks, total = [], 0
    while total <= limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise AssertionError("more than %d bytes" % limit)


def is_eof(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closed (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class Service:
    """A service on 127.0.0.1 for the device to reach, one thread per connection.

    Modes, chosen by the connecting test through `mode`:
      echo:   echo every byte
      source: read an 8-byte count N, send N bytes of seeded data, then close
      sink:   read an 8-byte count N, read N bytes, answer their sha256
    It records every accepted connection and when each one ended.
    """

    def __init__(self, mode: str = "echo"):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.1)
        self.address: HostPort = self.sock.getsockname()
        self.accepted = 0
        self.ended = 0
        self.open: List[socket.socket] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                self.accepted += 1
                self.open.append(conn)
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.mode == "echo":
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            elif self.mode == "source":
                (count,) = struct.unpack("!Q", recv_exactly(conn, 8))
                conn.sendall(pattern(count))
            elif self.mode == "sink":
                (count,) = struct.unpack("!Q", recv_exactly(conn, 8))
                digest = hashlib.sha256()
                while count:
                    data = conn.recv(min(count, 1 << 20))
                    if not data:
                        break
                    digest.update(data)
                    count -= len(data)
                conn.sendall(digest.digest())
                # keep the connection until the client goes, like a real service
                while conn.recv(65536):
                    pass
        except (OSError, EOFError):
            pass
        finally:
            with self.lock:
                self.ended += 1
                if conn in self.open:
                    self.open.remove(conn)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        with self.lock:
            for conn in self.open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def pattern(count: int, seed: int = 7) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = seed.to_bytes(8, "big")
    while len(out) < count:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:count])


@pytest.fixture(autouse=True)
def _log_info(caplog):
    """Capture tcprc's INFO lines too: uplink and client events are asserted on."""
    caplog.set_level(logging.INFO, logger="tcprc")


@pytest.fixture
def service():
    svc = Service("echo")
    yield svc
    svc.close()


class Tunnel:
    """A ServerApp and a DeviceApp in this process, joined over 127.0.0.1."""

    def __init__(self, target: HostPort, server_keys: Optional[Dict[str, Any]] = None,
                 device_keys: Optional[Dict[str, Any]] = None):
        from tcprc.device.app import DeviceApp
        from tcprc.server.app import ServerApp
        keys = {"listen": "127.0.0.1:0", "host": "127.0.0.1:0"}
        keys.update(server_keys or {})
        self.server = ServerApp(settings("server", **keys))
        self.server.start()
        dkeys = {"server": "%s:%d" % self.server.listen_address,
                 "local": "%s:%d" % target, "reconnect_min": 0.05, "reconnect_max": 0.5}
        dkeys.update(device_keys or {})
        self.device = DeviceApp(settings("device", **dkeys))
        self.device.start()
        wait_for(lambda: self.server.host_address, what="the device's LISTEN")

    @property
    def host(self) -> HostPort:
        return self.server.host_address

    def client(self, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection(self.host, timeout=timeout)

    def close(self) -> None:
        self.device.close()
        self.server.close()


@pytest.fixture
def tunnel(service):
    t = Tunnel(service.address)
    yield t
    t.close()


def tcprc_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "tcprc"] + list(args)


def run_tcprc(*args: str, timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(tcprc_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


def free_port() -> int:
    """A port that was free a moment ago (for processes that must be told a port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """A socket LISTENs on `port`, seen in /proc without connecting.

    Probing by connecting would be a client to whatever is behind the port:
    iperf3's server, for one, then stays busy with the probe's "test".
    """
    needle = ":%04X " % port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                for line in handle:
                    fields = line.split()
                    if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def port_accepts(address: HostPort) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


class Agents:
    """tcprc processes started by a test, stopped (and checked) at its end."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []

    def start(self, role, *args, config="", env=None):
        """Start `tcprc ROLE`; its log goes to a file (a full pipe would block it)."""
        n = len(self.procs)
        path = self.tmp / ("%s-%d.toml" % (role, n))
        sock = self.tmp / ("%s-%d.sock" % (role, n))
        path.write_text("[control]\nsocket = \"%s\"\n%s" % (sock, config))
        log = open(str(self.tmp / ("%s-%d.log" % (role, n))), "w+")
        proc = subprocess.Popen(tcprc_command(role, "-c", str(path), *args), cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **(env or {})))
        proc.log_file = log
        proc.control_socket = str(sock)
        self.procs.append(proc)
        return proc

    @staticmethod
    def log(proc) -> str:
        with open(proc.log_file.name) as handle:
            return handle.read()

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.log_file.close()


@pytest.fixture
def agents(tmp_path):
    a = Agents(tmp_path)
    yield a
    a.stop_all()


def start_tunnel(agents, target, device_env=None):
    listen, host = free_port(), free_port()
    server = agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % host)
    wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
    device = agents.start("device", "--server", "127.0.0.1:%d" % listen, "--local", "%s:%d" % target,
                          env=device_env)
    wait_for(lambda: listening(host) or device.poll() is not None, what="host port")
    assert server.poll() is None and device.poll() is None
    return server, device, ("127.0.0.1", host)
