"""Peer connections between servers, the I/O around peerwire: dial_peer() for the
forwarding server, PeerListener for the holder.

The listener accepts on peer_listen, runs each handshake in a thread of its
own under a deadline, at most MAX_PENDING at once and MAX_PENDING_PER_SOURCE
from one source; a peer that fails gets one ERROR line and is closed, with
one (rate-limited) log line.  An authenticated peer is handed to
deliver(PeerArrival), which accepts it (the socket becomes a client of the
device's session) or refuses it with a reason the dialer logs.
"""

import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ..addr import format_hostport, parse_hostport, source_key
from ..engine.ratelog import LimitedLog, SourceLog
from ..engine.sockets import accept_nowait, bind_listener, connect_tcp, tune_uplink_socket
from ..errors import PeerError
from ..settings import LinkSettings
from .peerwire import (MAX_LINE, DialerHandshake, LineReader, ListenerHandshake,
                       PeerHandshakeError, error_line)
from .records import NodeInfo

log = logging.getLogger("tcprc")

HANDSHAKE_TIMEOUT = 5.0     # seconds a peer has for its whole handshake
MAX_PENDING = 64            # handshakes at once
MAX_PENDING_PER_SOURCE = 8  # of those, from one source address (an IPv6 /64)


class PeerRefused(PeerError):
    """The holder authenticated itself and refused the client; str() is its reason."""


class PeerUnreachable(PeerError):
    """No authenticated answer from the peer: refused connection, failed handshake."""


def read_line(sock: socket.socket, reader: LineReader, deadline: float) -> bytes:
    """The next handshake line from `sock` by `deadline` (monotonic)."""
    while True:
        line = reader.next_line()
        if line is not None:
            return line
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no complete handshake line within the deadline")
        sock.settimeout(left)
        data = sock.recv(MAX_LINE)
        if not data:
            raise PeerHandshakeError("the peer closed the connection during the handshake",
                                     "closed")
        reader.feed(data)


def dial_peer(node: NodeInfo, secret: bytes, cluster: str, me: str, device_id: str,
              service: str, timeout: float, settings: LinkSettings) -> Tuple[socket.socket, bytes]:
    """Connect to `node`'s peer address and ask for `device_id` (and `service`):
    (the socket, bytes of the holder already read) once it accepted.
    PeerRefused when it refused, PeerUnreachable when it could not be asked."""
    deadline = time.monotonic() + timeout
    try:
        host, port = parse_hostport(node.peer, allow_empty_host=False)
        sock = connect_tcp(host, port, timeout)
    except (OSError, ValueError) as exc:
        raise PeerUnreachable("cannot connect to node %s at %s: %s"
                              % (node.name, node.peer, getattr(exc, "strerror", None) or exc)) from None
    try:
        handshake = DialerHandshake(secret, cluster, me, device_id, service, expect_node=node.name)
        reader = LineReader()
        sock.sendall(handshake.hello())
        sock.sendall(handshake.on_challenge(read_line(sock, reader, deadline)))
        accepted = handshake.on_verdict(read_line(sock, reader, deadline))
    except PeerHandshakeError as exc:
        sock.close()
        raise PeerUnreachable("node %s at %s: %s" % (node.name, node.peer, exc)) from None
    except socket.timeout:
        sock.close()
        raise PeerUnreachable("node %s at %s: no answer within %g s"
                              % (node.name, node.peer, timeout)) from None
    except OSError as exc:
        sock.close()
        raise PeerUnreachable("node %s at %s: %s" % (node.name, node.peer,
                                                     exc.strerror or exc)) from None
    if not accepted:
        sock.close()
        raise PeerRefused(handshake.reason)
    tune_uplink_socket(sock, settings)
    return sock, reader.rest


def _last_line(sock: socket.socket, line: bytes) -> None:
    """Send `line`, half-close, and read what the peer still sends for a moment:
    closing with unread bytes would reset the connection and lose the line."""
    try:
        sock.settimeout(1.0)
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


class PeerArrival:
    """A client another server forwarded here, its peer authenticated: what
    deliver() gets.  Call accept() to take the socket, or refuse(reason)."""

    def __init__(self, sock: socket.socket, handshake: ListenerHandshake, source: str):
        self._sock = sock
        self._handshake = handshake
        self.device_id = handshake.device_id
        self.service = handshake.service      # "" : the device's host port
        self.peer_node = handshake.peer_node
        self.source = source                  # the peer's ADDR:PORT
        self.accepted = False
        self.reason = ""

    def __repr__(self) -> str:
        return "PeerArrival(device=%r, service=%r, from node %s)" % (
            self.device_id, self.service, self.peer_node)

    def accept(self) -> socket.socket:
        """Tell the peer "accepted" and take the socket: from now on it is the client's
        connection, raw, and the caller's to close.  OSError if the peer is gone (the
        listener closes the socket then)."""
        if self.accepted:
            raise ValueError("accepted twice")
        self._sock.sendall(self._handshake.accept())
        self.accepted = True
        return self._sock

    def refuse(self, reason: str) -> None:
        """The reason the peer logs; the listener sends it and closes."""
        self.reason = reason


Deliver = Callable[[PeerArrival], bool]


class PeerListener:
    """Accepts peer connections on `address` ("ADDR:PORT")."""

    def __init__(self, address: str, secret: bytes, cluster: str, node: str,
                 deliver: Deliver, settings: LinkSettings,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self._bind_to = parse_hostport(address, allow_empty_host=True, allow_zero_port=True)
        self._secret = secret
        self.cluster = cluster
        self.node = node
        self._deliver = deliver
        self.settings = settings
        self.handshake_timeout = handshake_timeout
        self._listener = None      # type: Optional[socket.socket]
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._pending = {}         # type: Dict[Any, int]   source key -> handshakes now
        self._handshakes = {}      # type: Dict[socket.socket, str]
        self._stopping = False
        self._thread = None        # type: Optional[threading.Thread]
        self._failures = SourceLog(log)
        self._accept_errors = LimitedLog(log, 5.0)
        self.address = None        # type: Optional[Tuple[str, int]]
        self.refused = 0           # peers that failed their handshake or were over a limit

    def __repr__(self) -> str:
        return "PeerListener(%s)" % (format_hostport(*self.address) if self.address else "not bound")

    def start(self) -> None:
        """Bind (OSError to the caller) and accept in a thread."""
        self._listener = bind_listener(self._bind_to)
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="cluster-peers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            pending = list(self._handshakes)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5.0)
        for sock in pending:   # their threads see the shutdown and close them
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        accepted = accept_nowait(self._listener)
                    except OSError as exc:   # EMFILE and friends: keep serving, slowly
                        self._accept_errors.warning("cluster: cannot accept a peer: %s",
                                                    exc.strerror or exc)
                        time.sleep(0.1)
                        continue
                    if accepted is not None:
                        self._admit(*accepted)
        except Exception:   # fault barrier: the listener ends, loudly
            log.exception("cluster: the peer listener failed")
        finally:
            selector.close()

    def _admit(self, sock: socket.socket, peer: Any) -> None:
        source = format_hostport(peer[0], peer[1])
        key = source_key(peer[0])
        with self._lock:
            total = sum(self._pending.values())
            over = total >= MAX_PENDING or self._pending.get(key, 0) >= MAX_PENDING_PER_SOURCE
            if not over:
                self._pending[key] = self._pending.get(key, 0) + 1
                self._handshakes[sock] = source
        if over:
            self.refused += 1
            self._failures.warning(key, "cluster: peer %s refused: too many handshakes at once",
                                   source)
            self._refuse_quietly(sock, "too many handshakes at once")
            return
        try:
            threading.Thread(target=self._handshake, args=(sock, source, key),
                             name="cluster-peer-handshake", daemon=True).start()
        except RuntimeError as exc:
            self._done(sock, key)
            log.warning("cluster: peer %s refused: cannot start a thread: %s", source, exc)
            self._refuse_quietly(sock, "busy")

    @staticmethod
    def _refuse_quietly(sock: socket.socket, text: str) -> None:
        try:
            sock.setblocking(False)
            sock.send(error_line(text))
        except OSError:
            pass
        sock.close()

    def _done(self, sock: socket.socket, key: Any) -> None:
        with self._lock:
            self._handshakes.pop(sock, None)
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)

    def _handshake(self, sock: socket.socket, source: str, key: Any) -> None:
        handshake = ListenerHandshake(self._secret, self.cluster, self.node)
        deadline = time.monotonic() + self.handshake_timeout
        reader = LineReader()
        try:
            sock.sendall(handshake.on_hello(read_line(sock, reader, deadline)))
            handshake.on_auth(read_line(sock, reader, deadline))
            if reader.rest:
                raise PeerHandshakeError("bytes after AUTH before our answer", "out of order")
            tune_uplink_socket(sock, self.settings)
        except PeerHandshakeError as exc:
            self._fail(sock, key, source, handshake, str(exc), exc.wire_text)
            return
        except socket.timeout:
            self._fail(sock, key, source, handshake, "no handshake within %g s"
                       % self.handshake_timeout, "handshake timeout")
            return
        except OSError as exc:
            self._fail(sock, key, source, handshake, exc.strerror or str(exc), "")
            return
        finally:
            self._done(sock, key)
        self._hand_over(sock, handshake, source)

    def _fail(self, sock: socket.socket, key: Any, source: str, handshake: ListenerHandshake,
              why: str, wire_text: str) -> None:
        self.refused += 1
        who = " (node %s)" % handshake.peer_node if handshake.peer_node else ""
        self._failures.warning(key, "cluster: peer %s%s refused: %s", source, who, why)
        if wire_text:
            _last_line(sock, error_line(wire_text))
        sock.close()

    def _hand_over(self, sock: socket.socket, handshake: ListenerHandshake, source: str) -> None:
        arrival = PeerArrival(sock, handshake, source)
        took = False
        try:
            took = bool(self._deliver(arrival))
        except OSError as exc:
            if not arrival.accepted:
                log.info("cluster: forwarded client for device %s from node %s: %s",
                         arrival.device_id, arrival.peer_node, exc.strerror or exc)
        except Exception:   # fault barrier: a bug in deliver ends this client only
            log.exception("cluster: delivering a client of device %s from node %s failed",
                          arrival.device_id, arrival.peer_node)
        if arrival.accepted:
            if not took:
                log.error("cluster: deliver accepted the client of device %s and returned "
                          "False: the socket is its own now", arrival.device_id)
            return
        if took:
            log.error("cluster: deliver returned True without accept(): refusing the client "
                      "of device %s", arrival.device_id)
        reason = arrival.reason or "device %s is not here" % arrival.device_id
        log.info("cluster: refused a client of device %s forwarded by node %s: %s",
                 arrival.device_id, arrival.peer_node, reason)
        _last_line(sock, handshake.refuse(reason))
        sock.close()
