"""Sockets on 127.0.0.1: ports, exact reads, EOF, listeners seen in /proc."""

import resource
import socket
from typing import Any, Tuple

import pytest
from benchkit.netutil import (HostPort, free_port, is_eof, listening, port_accepts, recv_exactly,
                              recv_until_eof)

__all__ = ["HostPort", "free_port", "is_eof", "listening", "port_accepts", "recv_exactly",
           "recv_until_eof", "raise_fd_limit", "tcp_pair", "read_exactly"]


def raise_fd_limit(need: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `need`, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("needs %d file descriptors, hard limit is %d" % (need, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def tcp_pair() -> Tuple[socket.socket, socket.socket]:
    """(dialed, accepted): a connected TCP pair on 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    finally:
        listener.close()
    return near, far


def read_exactly(source: Any, count: int) -> bytes:
    """`count` bytes through `source.recv_into` (a transport or a socket), or EOFError."""
    got = bytearray()
    buf = bytearray(1 << 16)
    while len(got) < count:
        n = source.recv_into(buf, min(len(buf), count - len(got)))
        if not n:
            raise EOFError("%d of %d bytes" % (len(got), count))
        got += buf[:n]
    return bytes(got)
