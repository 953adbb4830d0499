"""Checked streams for fault runs: a service that echoes, sends or swallows, and its clients.

A client's first 9 bytes name what it wants: mode (b"e" echo, b"s" source:
the service sends COUNT seeded bytes and closes, b"k" sink: the client sends
COUNT bytes and the service answers their sha256, b"h" half-close: the client
sends COUNT bytes and shuts its sending side, the service answers the sha256
of everything up to that EOF and closes: protocol v2 only, a legacy tunnel
ends the whole stream at the client's EOF) and u64 COUNT; the source's seed is
the count.  Every client ends in one outcome:

    complete   every byte came back as sent (sha256 equal)
    cut        the stream ended early (EOF or reset) with a correct prefix: a fault's close
    corrupt    a byte differed from what was sent: never acceptable
    hung       nothing ended it within the deadline: never acceptable
    aborted    the client reset it itself (SO_LINGER 0), as asked
"""

import hashlib
import socket
import struct
import threading
import time
from typing import Callable, List, NamedTuple, Optional

from .impair import abort
from .net import recv_exactly
from .services import Service, pattern

HEADER = struct.Struct("!cQ")
OUTCOMES = ("complete", "cut", "corrupt", "hung", "aborted")


class MixedService(Service):
    """The service behind the device, one thread per connection, on 127.0.0.1:
    each connection's header picks what it does (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("mixed")

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(120)   # a stream the tunnel forgot must not keep a thread for ever
        mode, count = HEADER.unpack(recv_exactly(conn, HEADER.size))   # EOF before it: closed
        if mode == b"e":
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        elif mode == b"s":
            conn.sendall(pattern(count, seed=count))
        elif mode == b"k":
            digest = hashlib.sha256()
            while count:
                data = conn.recv(min(count, 65536))
                if not data:
                    return
                digest.update(data)
                count -= len(data)
            conn.sendall(digest.digest())
            while conn.recv(65536):
                pass
        elif mode == b"h":
            digest = hashlib.sha256()
            while True:   # up to the client's EOF, which it sends after COUNT bytes
                data = conn.recv(65536)
                if not data:
                    break
                digest.update(data)
            conn.sendall(digest.digest())


class Result(NamedTuple):
    mode: str
    size: int
    outcome: str
    received: int       # payload bytes checked (echoed, sourced, or the digest's input)
    detail: str


def run_stream(connect: Callable[[], socket.socket], mode: str, size: int,
               deadline: float = 120.0, pause: float = 0.0, abort_after: Optional[int] = None,
               chunk: int = 16384, progress: Optional[Callable[[int], None]] = None) -> Result:
    """One client stream of `mode` ("echo", "source", "sink", "half") and `size` bytes.

    pause: the reader stops that long after its first bytes (a paused reader);
    abort_after: the client resets the stream after that many bytes came back;
    progress(n): told of every n bytes that came back.
    """
    end = time.monotonic() + deadline
    want = pattern(size, seed=size) if mode == "source" else pattern(size, seed=size + 1)
    try:
        sock = connect()
    except OSError as exc:
        return Result(mode, size, "cut", 0, "connect: %s" % exc)
    got = bytearray()
    sender: Optional[threading.Thread] = None

    def check(outcome: str, detail: str) -> Result:
        digest = mode in ("sink", "half")
        expect = want[:len(got)] if not digest else b""
        if not digest and bytes(got) != expect:
            first = next(i for i in range(len(got)) if got[i] != expect[i])
            return Result(mode, size, "corrupt", len(got), "byte %d differs" % first)
        return Result(mode, size, outcome, len(got), detail)

    try:
        sock.settimeout(1.0)
        code = {"echo": b"e", "source": b"s", "sink": b"k", "half": b"h"}[mode]
        try:
            sock.sendall(HEADER.pack(code, size))
        except OSError as exc:   # the tunnel reset it at once (its session just ended)
            return check("cut", "reset before the header went: %s" % exc)
        if mode in ("echo", "sink", "half"):
            def send() -> None:
                view = memoryview(want)
                while view and time.monotonic() < end:
                    try:
                        view = view[sock.send(view[:chunk]):]
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                if mode == "half" and not view:
                    try:
                        sock.shutdown(socket.SHUT_WR)   # the half-close: the answer still comes
                    except OSError:
                        pass
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
        expect_len = 32 if mode in ("sink", "half") else size
        paused = False
        while len(got) < expect_len:
            if time.monotonic() > end:
                return check("hung", "%d of %d bytes after %g s" % (len(got), expect_len, deadline))
            if abort_after is not None and len(got) >= abort_after:
                abort(sock)
                return check("aborted", "reset after %d bytes" % len(got))
            if pause and got and not paused:
                paused = True
                time.sleep(pause)   # the point of this client: it reads nothing meanwhile
            try:
                data = sock.recv(min(65536, expect_len - len(got)))
            except socket.timeout:
                continue
            except OSError as exc:
                return check("cut", "reset: %s" % exc)
            if not data:
                return check("cut", "EOF after %d of %d bytes" % (len(got), expect_len))
            got += data
            if progress is not None:
                progress(len(data))
        if mode in ("sink", "half"):
            if bytes(got) != hashlib.sha256(want).digest():
                return Result(mode, size, "corrupt", size, "the service's sha256 differs")
            while mode == "half":   # both sides sent EOF: the stream must end
                if time.monotonic() > end:
                    return Result(mode, size, "hung", size, "no EOF after the answer")
                try:
                    if not sock.recv(1):
                        break
                    return Result(mode, size, "corrupt", size, "bytes after the answer")
                except socket.timeout:
                    continue
                except OSError as exc:
                    return Result(mode, size, "cut", 32, "reset after the answer: %s" % exc)
            return Result(mode, size, "complete", size, "")
        return check("complete", "")
    finally:
        if sock.fileno() >= 0:
            sock.close()
        if sender is not None:
            sender.join(5)


class Batch:
    """Streams run in threads; results collected."""

    def __init__(self) -> None:
        self.results: List[Result] = []
        self.threads: List[threading.Thread] = []
        self.lock = threading.Lock()
        self._received = 0

    def _progress(self, count: int) -> None:
        with self.lock:
            self._received += count

    def received(self) -> int:
        """Bytes that came back so far, over every stream of the batch."""
        with self.lock:
            return self._received

    def start(self, connect: Callable[[], socket.socket], mode: str, size: int, **kw) -> None:
        def run() -> None:
            result = run_stream(connect, mode, size, progress=self._progress, **kw)
            with self.lock:
                self.results.append(result)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float) -> List[Result]:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        with self.lock:
            return list(self.results)

    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)


def tally(results: List[Result]) -> dict:
    counts = {name: 0 for name in OUTCOMES}
    for result in results:
        counts[result.outcome] += 1
    counts["bytes_verified"] = sum(r.received for r in results
                                   if r.outcome in ("complete", "cut", "aborted"))
    return counts
