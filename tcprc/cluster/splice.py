"""Carry bytes both ways between two TCP sockets until both directions ended.

One thread per direction, one fixed buffer each.  An end of stream on one side
becomes a half-close (shutdown SHUT_WR) on the other, as TCP carries it; an
error on either side (a reset, a send stuck past the socket's SO_SNDTIMEO)
ends both directions.  The side that finishes last closes both sockets and
reports, so every fd is released on every path.
"""

import socket
import struct
import threading
from typing import Callable, Optional

from ..engine.sockets import shutdown_quietly

BUFFER = 64 * 1024


def bound_sends(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose sends fail after `seconds` without progress (a
    receiver that stopped reading) instead of blocking their thread for good."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class Splice:
    """a <-> b.  run() in the caller's thread carries a -> b and starts a thread for
    b -> a (with `first_to_a`, bytes already read from b, sent first).
    on_done(bytes a->b, bytes b->a, error or "") is called once, after both closed."""

    def __init__(self, a: socket.socket, b: socket.socket, name: str,
                 on_done: Optional[Callable[[int, int, str], None]] = None):
        self.a, self.b = a, b
        self.name = name
        self._on_done = on_done
        self._lock = threading.Lock()
        self._running = 2
        self.counts = [0, 0]     # a -> b, b -> a
        self.error = ""

    def __repr__(self) -> str:
        return "Splice(%s, %d/%d bytes)" % (self.name, self.counts[0], self.counts[1])

    def run(self, first_to_a: bytes = b"") -> None:
        thread = threading.Thread(target=self._pump, args=(self.b, self.a, 1, first_to_a),
                                  name="splice-%s" % self.name, daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:   # no thread to be had: end both now
            self._failed("cannot start a thread: %s" % exc)
            self._finished()
        self._pump(self.a, self.b, 0, b"")

    def abort(self, why: str) -> None:
        """End both directions now (from any thread)."""
        self._failed(why)

    def _pump(self, src: socket.socket, dst: socket.socket, index: int, first: bytes) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            if first:
                dst.sendall(first)
                self.counts[index] += len(first)
            while True:
                n = src.recv_into(buf)
                if not n:
                    break
                dst.sendall(view[:n])
                self.counts[index] += n
            try:
                dst.shutdown(socket.SHUT_WR)   # the half-close, carried as is
            except OSError:
                pass
        except OSError as exc:
            self._failed("%s: %s" % ("a -> b" if index == 0 else "b -> a",
                                     exc.strerror or exc.__class__.__name__))
        finally:
            view.release()
            self._finished()

    def _failed(self, why: str) -> None:
        with self._lock:
            if not self.error:
                self.error = why
        shutdown_quietly(self.a)   # wakes the other direction
        shutdown_quietly(self.b)

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if not last:
            return
        for sock in (self.a, self.b):
            try:
                sock.close()
            except OSError:
                pass
        if self._on_done is not None:
            self._on_done(self.counts[0], self.counts[1], self.error)
