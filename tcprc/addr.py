"""ADDR:PORT and CIDR strings, parsed and printed the same way everywhere (no I/O:
connecting and name lookups live in engine.sockets)."""

import socket
from typing import List, Tuple


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


WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


def ports_collide(first: str, second: str) -> bool:
    """Would listening on ADDR:PORT `first` and `second` both fail (the one rule the
    config check, the server and `ctl device add` share)?  Yes when the ports are
    equal and not 0 (any free port) and the addresses are equal or either is a
    wildcard: 0.0.0.0 and :: take the port on every address.  ValueError if one
    of them is not ADDR:PORT."""
    host, port = parse_hostport(first, allow_empty_host=True, allow_zero_port=True)
    other, other_port = parse_hostport(second, allow_empty_host=True, allow_zero_port=True)
    return bool(port) and port == other_port and (
        host == other or host in WILDCARD_ADDRESSES or other in WILDCARD_ADDRESSES)


def format_hostport(host: str, port: int) -> str:
    if ":" in host:
        return "[%s]:%d" % (host, port)
    return "%s:%d" % (host, port)


# ---- networks (CIDR), for the server's allow_from ---------------------------------
# Plain ints from inet_pton: the ipaddress module would cost a gateway ~300 KB.
Network = Tuple[int, int, int]      # (bits: 32 or 128, network as int, prefix length)
_MAPPED = 0xFFFF << 32              # ::ffff:0:0/96, IPv4 addresses seen on an IPv6 socket


def _ip_int(text: str) -> Tuple[int, int]:
    """(bits, value) of an IP address; an IPv4-mapped IPv6 address counts as IPv4."""
    text = text.partition("%")[0]    # fe80::1%eth0: the scope is not part of the address
    family, bits = (socket.AF_INET6, 128) if ":" in text else (socket.AF_INET, 32)
    try:
        value = int.from_bytes(socket.inet_pton(family, text), "big")
    except (OSError, ValueError):
        raise ValueError("%r is not an IP address" % text) from None
    if bits == 128 and value >> 32 == 0xFFFF:
        return 32, value & 0xFFFFFFFF
    return bits, value


def parse_network(text: str) -> Network:
    """"10.0.0.0/8", "2001:db8::/32" or a bare address (one host); ValueError if bad."""
    addr, sep, prefix_text = text.strip().partition("/")
    mapped = ":" in addr
    bits, value = _ip_int(addr)
    mapped = mapped and bits == 32
    full = 128 if mapped else bits
    if not sep:
        prefix = full
    elif prefix_text.isdigit() and int(prefix_text) <= full:
        prefix = int(prefix_text)
    else:
        raise ValueError("%r: the prefix length must be 0..%d" % (text, full))
    if mapped:   # ::ffff:10.0.0.0/104 is 10.0.0.0/8
        if prefix < 96:
            raise ValueError("%r: an IPv4-mapped network needs a prefix of at least 96" % text)
        prefix -= 96
    host_bits = (1 << (bits - prefix)) - 1
    if value & host_bits:
        raise ValueError("%r has host bits set (did you mean %s/%d?)"
                         % (text, _ip_text(bits, value & ~host_bits), prefix))
    return bits, value, prefix


def _ip_text(bits: int, value: int) -> str:
    family = socket.AF_INET if bits == 32 else socket.AF_INET6
    return socket.inet_ntop(family, value.to_bytes(bits // 8, "big"))


def address_in(host: str, networks: List[Network]) -> bool:
    """Is `host` (an accepted peer's address) inside one of `networks`?"""
    try:
        bits, value = _ip_int(host)
    except ValueError:
        return False
    for net_bits, network, prefix in networks:
        if net_bits == bits and value >> (bits - prefix) == network >> (bits - prefix):
            return True
    return False


def source_key(host: str) -> Tuple[int, int]:
    """What counts as one source for per-source limits: an IPv4 address or an IPv6 /64
    (one IPv6 host usually holds a whole /64)."""
    try:
        bits, value = _ip_int(host)
    except ValueError:
        return 0, hash(host)
    return (32, value) if bits == 32 else (128, value >> 64)


SockAddr = Tuple[int, Tuple]   # (family, sockaddr) as getaddrinfo gives them


def sockaddr_key(item: SockAddr) -> Tuple:
    """What makes two resolved addresses the same endpoint: family, address,
    port and, for IPv6, the scope (fe80::1 on eth0 is not fe80::1 on eth1)."""
    family, sockaddr = item
    return (family,) + tuple(sockaddr[:2]) + (tuple(sockaddr[3:4]) if family == socket.AF_INET6 else ())
