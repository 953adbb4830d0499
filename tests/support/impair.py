"""An impairment relay: a TCP forwarder with delay, jitter, rate, stalls and a black hole.

This kernel has no netem, so the path's delay lives here: every chunk read on
one leg is written to the other leg no earlier than `delay` +- `jitter`
seconds after it arrived, and never before the chunk ahead of it (order is
kept, as TCP would); `rate` (bytes/s) spaces chunks by their size.  stall(s)
holds everything for s seconds; blackhole(True) holds it until switched off.
Both TCP legs stay up meanwhile (the kernel keeps ACKing; only heartbeats
in the payload can tell).  kill() aborts every pair with RST both ways: an
uplink killed on the path.  Memory is bounded: a direction holds at most
QUEUE_LIMIT bytes before it stops reading.

`tune(sock)` is applied to both legs of every pair (e.g. TCP keepalive like
the agent's, so a dead path behind the relay is seen on the relay's legs as
the agent would see it end to end); a leg that fails aborts the other one.

From a script:  python tests/support/impair.py --to HOST:PORT [--listen ADDR:PORT]
[--delay S] [--jitter S] [--rate BYTES] [--seed N]; it prints "listening ADDR:PORT",
then reads commands on stdin: "blackhole on|off", "stall S", "kill", "stats".
"""

import collections
import random
import socket
import struct
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

HostPort = Tuple[str, int]
CHUNK = 16384
QUEUE_LIMIT = 256 * 1024
POLL = 0.5          # seconds a leg's thread blocks before it looks whether its pair ended
_EOF, _RESET = object(), object()


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), quietly."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Direction:
    """src -> dst of one pair: a reader thread queues, a writer thread releases on time."""

    def __init__(self, relay: "Relay", pair: "Pair", src: socket.socket, dst: socket.socket):
        self.relay, self.pair, self.src, self.dst = relay, pair, src, dst
        self.queue: Deque[Tuple[float, Any]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.last_release = 0.0
        self.done = False

    def start(self) -> List[threading.Thread]:
        threads = [threading.Thread(target=self._read, daemon=True, name="impair-read"),
                   threading.Thread(target=self._write, daemon=True, name="impair-write")]
        for thread in threads:
            thread.start()
        return threads

    def _put(self, item: Any, size: int) -> None:
        relay = self.relay
        with self.cond:
            while self.queued >= QUEUE_LIMIT and not self.done:
                self.cond.wait(0.5)
            now = time.monotonic()
            release = now + max(0.0, relay.delay + relay.rng.uniform(-relay.jitter, relay.jitter))
            if relay.rate:
                release = max(release, self.last_release + size / relay.rate)
            release = max(release, self.last_release)   # order is kept
            self.last_release = release
            self.queue.append((release, item))
            self.queued += size
            self.cond.notify_all()

    def _read(self) -> None:
        while not self.done:
            try:
                data = self.src.recv(CHUNK)
            except socket.timeout:
                continue   # legs poll, so a pair that ends wakes its threads
            except OSError:
                self._put(_RESET, 0)
                return
            if not data:
                self._put(_EOF, 0)
                return
            self._put(data, len(data))

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.done:
                    self.cond.wait(0.5)
                if self.done:
                    return
                release, item = self.queue[0]
            wait = max(release - time.monotonic(), self.relay.held_for())
            if wait > 0:
                with self.cond:
                    self.cond.wait(min(wait, 0.05))
                continue
            with self.cond:
                self.queue.popleft()
                if item is not _EOF and item is not _RESET:
                    self.queued -= len(item)
                self.cond.notify_all()
            if item is _RESET:
                self.pair.reset()
                return
            if item is _EOF:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.pair.half_done()
                return
            if not self._send(item):
                self.pair.reset()
                return
            self.relay.count(len(item))

    def _send(self, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self.done:
            try:
                view = view[self.dst.send(view):]
            except socket.timeout:
                continue
            except OSError:
                return False
        return not view

    def stop(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()


class Pair:
    """One relayed connection: the accepted leg and the upstream leg."""

    def __init__(self, relay: "Relay", down: socket.socket, up: socket.socket):
        self.relay, self.down, self.up = relay, down, up
        self.upstream_port = up.getsockname()[1]
        self.lock = threading.Lock()
        self.halves = 0
        self.closed = False
        self.directions = [_Direction(relay, self, down, up), _Direction(relay, self, up, down)]

    def start(self) -> None:
        for direction in self.directions:
            direction.start()

    def half_done(self) -> None:
        with self.lock:
            self.halves += 1
            if self.halves < 2 or self.closed:
                return
            self.closed = True
        self._finish(abortive=False)

    def reset(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self._finish(abortive=True)

    def _finish(self, abortive: bool) -> None:
        for direction in self.directions:
            direction.stop()
        for sock in (self.down, self.up):
            if abortive:
                abort(sock)
            else:
                sock.close()
        self.relay.forget(self)


class Relay:
    """listen -> target, impaired.  start() binds (in the caller's namespace) and serves."""

    def __init__(self, target: HostPort, listen: HostPort = ("127.0.0.1", 0), delay: float = 0.0,
                 jitter: float = 0.0, rate: Optional[float] = None, seed: int = 1,
                 tune: Optional[Callable[[socket.socket], None]] = None,
                 connect_timeout: float = 10.0):
        self.target, self.listen = target, listen
        self.delay, self.jitter, self.rate = delay, jitter, rate
        self.rng = random.Random(seed)
        self.tune = tune
        self.connect_timeout = connect_timeout
        self.address: Optional[HostPort] = None
        self.pairs: List[Pair] = []
        self.accepted = 0
        self.failed_dials = 0
        self.kills = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._hold_until = 0.0
        self._black = False
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None

    # ---- control (any thread) --------------------------------------------------------
    def blackhole(self, on: bool) -> None:
        self._black = on

    def stall(self, seconds: float) -> None:
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    def held_for(self) -> float:
        if self._black:
            return 0.05
        return self._hold_until - time.monotonic()

    def kill(self) -> int:
        """Abort every live pair with RST both ways; how many there were."""
        with self._lock:
            pairs = list(self.pairs)
            self.kills += len(pairs)
        for pair in pairs:
            pair.reset()
        return len(pairs)

    def live(self) -> List[Pair]:
        with self._lock:
            return list(self.pairs)

    def count(self, size: int) -> None:
        with self._lock:
            self.bytes += size

    def forget(self, pair: Pair) -> None:
        with self._lock:
            if pair in self.pairs:
                self.pairs.remove(pair)

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> "Relay":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.listen)
        sock.listen(64)
        sock.settimeout(0.2)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, daemon=True, name="impair-accept")
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            # Dial from its own thread: a slow connect must not hold the next accept.
            threading.Thread(target=self._dial, args=(down,), daemon=True).start()

    def _dial(self, down: socket.socket) -> None:
        try:
            up = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            self.failed_dials += 1
            abort(down)
            return
        for leg in (down, up):
            leg.settimeout(POLL)
            leg.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tune is not None:
                self.tune(leg)
        pair = Pair(self, down, up)
        with self._lock:
            if self._stop.is_set():
                abort(down)
                abort(up)
                return
            self.pairs.append(pair)
        pair.start()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        self.kill()


def keepalive_tuner(idle: int, interval: int, count: int,
                    user_timeout: float = 0.0) -> Callable[[socket.socket], None]:
    """tune= for Relay: TCP keepalive (and TCP_USER_TIMEOUT) on both legs, like the agents'."""
    def tune(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
    return tune


def _hostport(text: str) -> HostPort:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="TCP impairment relay (delay, jitter, rate, stalls)")
    parser.add_argument("--listen", default="127.0.0.1:0", type=_hostport)
    parser.add_argument("--to", required=True, type=_hostport)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=0.0, help="bytes per second, 0: unlimited")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    relay = Relay(args.to, args.listen, args.delay, args.jitter, args.rate or None, args.seed).start()
    print("listening %s:%d" % relay.address, flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:2] == ["blackhole", "on"]:
            relay.blackhole(True)
        elif words[:2] == ["blackhole", "off"]:
            relay.blackhole(False)
        elif words[:1] == ["stall"] and len(words) == 2:
            relay.stall(float(words[1]))
        elif words == ["kill"]:
            print("killed %d" % relay.kill(), flush=True)
        elif words == ["stats"]:
            print("pairs %d accepted %d bytes %d" % (len(relay.live()), relay.accepted, relay.bytes),
                  flush=True)
        elif words:
            print("unknown command", flush=True)
    relay.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
