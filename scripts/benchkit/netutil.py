"""Socket and waiting helpers shared by scripts/bench and the tests (stdlib only)."""

import itertools
import random
import socket
import threading
import time
from typing import Any, Callable, Iterator, Tuple

LOCAL = "127.0.0.1"
HostPort = Tuple[str, int]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01, error: type = AssertionError) -> Any:
    """Poll `condition` until it is truthy; raise `error` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(interval)


def _ports_outside_the_ephemeral_range() -> Iterator[int]:
    """Every port that no connect() is handed by the kernel, in a random order, for ever.
    A port the kernel picked for free_port() could go to some outgoing connection
    before its consumer binds it (CI met exactly that); these cannot."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low, high = (int(field) for field in ranges.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999            # Linux's default
    ports = [port for port in range(10000, 65536) if not low <= port <= high]
    random.Random().shuffle(ports)          # seeded from the OS: parallel runs differ
    return itertools.cycle(ports)


_CANDIDATES = _ports_outside_the_ephemeral_range()
_CANDIDATES_LOCK = threading.Lock()


def free_port(*hosts: str) -> int:
    """A port that was free on every one of `hosts` (default 127.0.0.1) a moment ago,
    for processes that must be told a port; never the same twice in a row of ~20,000."""
    hosts = hosts or (LOCAL,)
    for _ in range(1000):
        with _CANDIDATES_LOCK:
            port = next(_CANDIDATES)
        try:
            for host in hosts:
                with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue
    raise OSError("no port free on %s" % ", ".join(hosts))


def recv_exactly(sock: socket.socket, count: int, error: type = EOFError) -> bytes:
    """`count` bytes, or `error` if the peer closes first."""
    chunks, got = [], 0
    while got < count:
        chunk = sock.recv(min(count - got, 1 << 20))
        if not chunk:
            raise error("connection closed after %d of %d bytes" % (got, count))
        chunks.append(chunk)
        got += len(chunk)
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


def listening(port: int) -> bool:
    """A socket LISTENs on `port`, read from /proc without connecting.

    Probing by connecting would be a client to whatever is behind the port:
    iperf3's server, for one, then stays busy with the probe's "test".
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)   # the header
                for line in handle:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration):
            continue
    return False


def port_accepts(address: HostPort) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False
