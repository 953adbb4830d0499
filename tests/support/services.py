"""Services for the device to reach, on 127.0.0.1, and the data they send."""

import hashlib
import socket
import struct
import threading
from typing import List

from .net import HostPort, recv_exactly


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
            self._talk(conn)
        except (OSError, EOFError):
            pass
        finally:
            with self.lock:
                self.ended += 1
                if conn in self.open:
                    self.open.remove(conn)
            conn.close()

    def _talk(self, conn: socket.socket) -> None:
        """One connection, by `mode`; a subclass serves another protocol here."""
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
