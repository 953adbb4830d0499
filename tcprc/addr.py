"""ADDR:PORT strings, parsed and printed the same way everywhere."""

import socket
from typing import List, Optional, Tuple


def parse_hostport(text: str, allow_empty_host: bool = True,
                   allow_zero_port: bool = False) -> Tuple[str, int]:
    """Parse "host:port", "[v6]:port" or ":port" into (host, port).

    Port 0 (any free port) only where the caller binds, with allow_zero_port.

    Raises ValueError with a message fit for a one-line error.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("expected ADDR:PORT, got an empty value")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError("expected [IPV6]:PORT, got %r" % text)
        host, port_text = text[1:close], text[close + 2:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("expected ADDR:PORT, got %r (no port)" % text)
        if ":" in host:
            raise ValueError("expected [IPV6]:PORT for an IPv6 address, got %r" % text)
    if not host and not allow_empty_host:
        raise ValueError("expected ADDR:PORT, got %r (no address)" % text)
    if any(c.isspace() for c in host):
        raise ValueError("address %r contains white space" % host)
    return host, parse_port(port_text, allow_zero_port)


def parse_port(text: str, allow_zero: bool = False) -> int:
    if not text.isdigit():
        raise ValueError("port %r is not a number" % text)
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError("port %d is out of range %d..65535" % (port, low))
    return port


def format_hostport(host: str, port: int) -> str:
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection, with an ASCII host handed over as bytes.

    For a str host, getaddrinfo loads the idna codec (with unicodedata and
    stringprep): about 400 KB of RSS on a gateway that dials an IP address
    or a plain name.  Only other names still go through idna.
    """
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        name = host
    return socket.create_connection((name, port), timeout=timeout)


SockAddr = Tuple[int, Tuple]   # (family, sockaddr) as getaddrinfo gives them


def resolve_tcp(host: str, port: int) -> List[SockAddr]:
    """Every (family, sockaddr) `host:port` resolves to, in getaddrinfo's order.

    Raises OSError (socket.gaierror) when it does not resolve.
    """
    try:
        name = host.encode("ascii")   # no idna codec, as in connect_tcp
    except UnicodeEncodeError:
        name = host
    return [(family, sockaddr) for family, _, _, _, sockaddr
            in socket.getaddrinfo(name, port, 0, socket.SOCK_STREAM)]


def sockaddr_key(item: SockAddr) -> Tuple:
    """What makes two resolved addresses the same endpoint: family, address,
    port and, for IPv6, the scope (fe80::1 on eth0 is not fe80::1 on eth1)."""
    family, sockaddr = item
    return (family,) + tuple(sockaddr[:2]) + (tuple(sockaddr[3:4]) if family == socket.AF_INET6 else ())


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
