"""Socket helpers of the engine: tuning, bind, connect, non-blocking accept, quiet shutdown.

The one place that creates, tunes and dials sockets (name lookups included);
everything above works with what these return.
"""

import socket
import struct
from typing import Any, List, Optional, Tuple

from ..addr import SockAddr, parse_hostport
from ..settings import LinkSettings

HostPort = Tuple[str, int]


def _lookup_name(host: str) -> Any:
    """An ASCII host as bytes: for a str host, getaddrinfo loads the idna codec
    (with unicodedata and stringprep), about 400 KB of RSS on a gateway that
    dials an IP address or a plain name.  Only other names still go through idna."""
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        return host


def _unresolvable(host: str, exc: Exception) -> socket.gaierror:
    """A name no resolver takes (the idna codec refuses it: an empty label, a
    label too long, a NUL) fails like any other name that does not resolve."""
    return socket.gaierror(socket.EAI_NONAME, "%r is not a valid host name (%s)" % (host, exc))


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection; every failure to resolve `host` is an OSError."""
    try:
        return socket.create_connection((_lookup_name(host), port), timeout=timeout)
    except (UnicodeError, ValueError) as exc:
        raise _unresolvable(host, exc) from None


def resolve_tcp(host: str, port: int) -> List[SockAddr]:
    """Every (family, sockaddr) `host:port` resolves to, in getaddrinfo's order.

    Raises OSError (socket.gaierror) when it does not resolve.
    """
    try:
        found = socket.getaddrinfo(_lookup_name(host), port, 0, socket.SOCK_STREAM)
    except (UnicodeError, ValueError) as exc:
        raise _unresolvable(host, exc) from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in found]


def connect_resolved(candidates: List[SockAddr], timeout: float) -> socket.socket:
    """Connect to the first of `candidates` that answers; no name lookup here."""
    error: Optional[OSError] = None
    for family, sockaddr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else OSError("no address to connect to")


def bind_listener(address: HostPort, backlog: int = 128) -> socket.socket:
    host, port = address
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_for(what: str, address: str) -> socket.socket:
    """bind_listener for an ADDR:PORT setting; an error names the address and what
    it is for ("cannot listen for device uplinks ([server] listen) on ...")."""
    try:
        return bind_listener(parse_hostport(address, allow_empty_host=True, allow_zero_port=True))
    except OSError as exc:
        raise OSError(exc.errno, "cannot listen for %s on %s: %s"
                      % (what, address, exc.strerror or exc)) from None


def tune_uplink_socket(sock: socket.socket, settings: LinkSettings) -> None:
    """Blocking uplink with keepalive, no Nagle, and a bound on blocked sends."""
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", settings.keepalive_idle),
                        ("TCP_KEEPINTVL", settings.keepalive_interval),
                        ("TCP_KEEPCNT", settings.keepalive_count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    # A worker blocked this long on a full uplink means the path is dead.
    seconds = float(settings.send_timeout)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    # Keepalive only probes an idle connection; data left unacknowledged this
    # long (a dead peer behind NAT) makes the kernel drop the uplink too.
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def tune_stream_socket(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (tests may use other socket kinds)


def shutdown_quietly(sock: socket.socket) -> None:
    """Wake any thread blocked on `sock`; the fd stays open for its owner to close."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def accept_nowait(listener: socket.socket) -> Optional[Tuple[socket.socket, Any]]:
    """accept() on a non-blocking listener: (socket, peer), or None when nobody waits.

    The accepted socket is blocking (pumps use blocking sends and receives).
    Raises the OSError of a failed accept (e.g. EMFILE) for the caller's log.
    """
    try:
        sock, peer = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    sock.setblocking(True)
    return sock, peer
