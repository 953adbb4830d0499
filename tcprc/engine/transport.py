"""The byte stream under one uplink: what FrameWriter and the link's reader talk to.

A transport looks like the part of a socket they use, with the same
signatures, so the plain one hands out the socket's own methods and the
fast path pays no extra Python call.  Flags are MSG_DONTWAIT (do not wait:
raise BlockingIOError instead) and MSG_MORE (a hint that more follows); a
transport that cannot honour MSG_MORE ignores it.

Threads: recv_into, fileno, tcp_info and quick_ack belong to the link thread;
send, sendall, sendmsg, splice_from and goodbye are called only under the
FrameWriter's lock (one sender at a time); shutdown may come from any
thread (it wakes the others); close is the link thread's, at teardown.
A TLS transport (ssl.SSLObject over MemoryBIO: SSLSocket refuses sendmsg
and flags, and one OpenSSL connection must not be driven from two threads
at once) fits here by doing its reads and writes under its own lock.
"""

import os
import socket
from typing import Any, List, Optional

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)   # Linux only
SPLICE_AVAILABLE = hasattr(os, "splice")


class Transport:
    """Interface; see the module docstring for who calls what."""

    can_splice = False    # splice_from() moves bytes from a pipe without a copy
    version = ""          # the TLS version when the transport encrypts, for status
    # has_buffered() may be true: bytes taken from the socket wait inside the
    # transport, and no readability will announce them (TLS)
    buffers = False

    def fileno(self) -> int:
        raise NotImplementedError

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        raise NotImplementedError

    def send(self, data: Any, flags: int = 0) -> int:
        raise NotImplementedError

    def sendall(self, data: Any, flags: int = 0) -> None:
        raise NotImplementedError

    def sendmsg(self, parts: List[Any]) -> int:
        raise NotImplementedError

    def splice_from(self, pipe: int, count: int) -> None:
        raise NotImplementedError

    def goodbye(self) -> None:
        """An orderly end, sent without waiting, before shutdown(): TLS's
        close_notify.  Under the FrameWriter's lock; quiet if the uplink is
        broken.  A plain TCP connection needs none: its FIN says it."""

    def shutdown(self) -> None:
        """Wake every thread blocked on the transport; quiet if already down."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def has_buffered(self) -> bool:
        """Bytes can be read without the socket being readable (see `buffers`)."""
        return False

    def tcp_info(self, size: int) -> Optional[bytes]:
        """The kernel's struct tcp_info (at most `size` bytes), or None if there is none."""
        return None

    def quick_ack(self) -> None:
        """ACK what was read at once, where the transport can."""


class PlainTransport(Transport):
    """A connected TCP socket (or a socketpair end, in tests), used as is."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # The socket's own methods: no Python frame between the engine and the kernel.
        self.fileno = sock.fileno
        self.recv_into = sock.recv_into
        self.send = sock.send
        self.sendall = sock.sendall
        self.sendmsg = sock.sendmsg
        self.can_splice = SPLICE_AVAILABLE

    def splice_from(self, pipe: int, count: int) -> None:
        fd = self.sock.fileno()
        while count:
            moved = os.splice(pipe, fd, count)
            if not moved:
                raise OSError("splice to the uplink moved nothing")
            count -= moved

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def has_buffered(self) -> bool:
        """Bytes can be read without the socket being readable (see `buffers`)."""
        return False

    def tcp_info(self, size: int) -> Optional[bytes]:
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
        except (AttributeError, OSError):
            return None

    def quick_ack(self) -> None:
        if _QUICKACK is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass


def as_transport(thing: Any) -> Transport:
    """A Transport as is; a bare socket as a PlainTransport."""
    return thing if isinstance(thing, Transport) else PlainTransport(thing)


def looks_like_tls(first_bytes: bytes) -> bool:
    """A TLS ClientHello begins with a handshake record: 0x16, then version 3.x."""
    return first_bytes[:2] == b"\x16\x03"
