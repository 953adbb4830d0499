"""A minimal selector loop: fd callbacks, timers, and call_soon from other threads.

One runs per uplink, in that uplink's own thread (the product card's
design); the server runs one more for its uplink acceptor.
It drives select.epoll (select.poll where epoll is missing) itself rather
than through the selectors module: every DATA frame the uplink delivers
passes through one round of this loop, and a round without the wrapper's
key objects and event translation costs less Python per hop.
"""

import heapq
import itertools
import select
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

Callback = Callable[[], Any]

_IN, _OUT = select.POLLIN, select.POLLOUT
# Error and hang-up wake both callbacks, as with the selectors module: the
# next read or write is what reports them.
_READABLE = ~_OUT
_WRITABLE = ~_IN


# select.poll is the fallback for kernels or builds without epoll; tests
# switch this off to keep that path covered.
USE_EPOLL = hasattr(select, "epoll")


class _Poll:
    """select.poll behind select.epoll's interface (timeout in seconds, -1: none)."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self.register = self._poll.register
        self.modify = self._poll.modify
        self.unregister = self._poll.unregister

    def poll(self, timeout: float) -> List[Tuple[int, int]]:
        return self._poll.poll(None if timeout < 0 else timeout * 1000.0)

    def close(self) -> None:
        pass


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """fd callbacks, timers and a ready queue, run by one thread.

    call_soon() may be called from any thread (it wakes the loop); every
    other method belongs to the thread that runs run(), and close() to its
    owner once run() has returned.
    """

    def __init__(self, on_error: Optional[Callable[[BaseException], Any]] = None) -> None:
        # An exception escaping a callback goes to on_error and the loop goes
        # on (an acceptor that serves everyone); without one it ends run().
        self.on_error = on_error
        self._poller: Any = select.epoll() if USE_EPOLL else _Poll()
        self._handlers: Dict[int, Tuple[Optional[Callback], Optional[Callback]]] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._ready: Deque[Callback] = deque()
        self._ready_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._stopping = False
        self.set_handlers(self._wake_r, self._drain_wakeups, None)

    # ---- called from any thread -------------------------------------------------
    def call_soon(self, callback: Callback) -> None:
        with self._ready_lock:
            self._ready.append(callback)
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # loop already closed; nothing left to wake

    # ---- called from the loop thread --------------------------------------------
    def set_handlers(self, sock: Any, on_read: Optional[Callback],
                     on_write: Optional[Callback]) -> None:
        """Watch `sock` for the events that have a callback; None for both forgets it."""
        fd = sock.fileno()
        mask = (_IN if on_read else 0) | (_OUT if on_write else 0)
        known = fd in self._handlers
        if not mask:
            if known:
                del self._handlers[fd]
                self._poller.unregister(fd)
            return
        self._handlers[fd] = (on_read, on_write)
        if known:
            self._poller.modify(fd, mask)
        else:
            self._poller.register(fd, mask)

    def forget(self, sock: Any) -> None:
        self.set_handlers(sock, None, None)

    def forget_fd(self, fd: int) -> None:
        """Forget a descriptor that may be closed already (its socket closed by
        another thread): the kernel dropped it from the poller then."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (OSError, ValueError, KeyError):
                pass

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def every(self, interval: float, callback: Callback) -> None:
        """Call `callback` every `interval` seconds for as long as the loop runs."""
        def tick() -> None:
            self.call_later(interval, tick)
            callback()
        self.call_later(interval, tick)

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """Run until stop().  The fault barrier sits outside the rounds, where a
        try costs nothing per event."""
        while not self._stopping:
            try:
                self._rounds()
            except Exception as exc:
                if self.on_error is None:
                    raise
                self.on_error(exc)

    def _rounds(self) -> None:
        # One function with local names: every DATA frame costs a round.
        poll, handlers, timers = self._poller.poll, self._handlers, self._timers
        while not self._stopping:
            timeout = -1.0
            if self._ready:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            for fd, events in poll(timeout):
                callbacks = handlers.get(fd)
                # A previous callback of this round may have forgotten the fd.
                if callbacks is None:
                    continue
                on_read, on_write = callbacks
                if on_write is not None and events & _WRITABLE:
                    on_write()
                if on_read is not None and events & _READABLE and fd in handlers:
                    on_read()
                if self._stopping:
                    return
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if not timer.cancelled:
                        timer.callback()
            if self._ready:
                self._run_ready()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_ready(self) -> None:
        # Unlocked checks of _ready are safe: call_soon appends before it
        # flags or wakes us, so an item queued right now is seen next round.
        with self._ready_lock:
            batch, self._ready = self._ready, deque()
            self._woken = False
        try:
            while batch:
                batch.popleft()()
        except BaseException:
            with self._ready_lock:   # what the failed callback did not reach still runs
                batch.extend(self._ready)
                self._ready = batch
            raise

    def close(self) -> None:
        """Run what other threads queued, then release the selector and wake pipe."""
        if self._ready:
            self._run_ready()
        self._poller.close()
        self._wake_r.close()
        self._wake_w.close()
