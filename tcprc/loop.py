"""A minimal selector loop: fd callbacks, timers, and call_soon from other threads.

One runs per uplink, in that uplink's own thread (the product card's design).
"""

import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

Callback = Callable[[], Any]


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._handlers: Dict[int, Tuple[Optional[Callback], Optional[Callback]]] = {}
        self._timers: List[Tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._ready: Deque[Callback] = deque()
        self._ready_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False

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
        mask = (selectors.EVENT_READ if on_read else 0) | (selectors.EVENT_WRITE if on_write else 0)
        known = fd in self._handlers
        if not mask:
            if known:
                del self._handlers[fd]
                self._selector.unregister(fd)
            return
        self._handlers[fd] = (on_read, on_write)
        if known:
            self._selector.modify(fd, mask)
        else:
            self._selector.register(fd, mask)

    def forget(self, sock: Any) -> None:
        self.set_handlers(sock, None, None)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        while not self._stopping:
            self._run_once()

    def _run_once(self) -> None:
        timeout = None
        if self._ready:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, events in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                self._drain_wakeups()
                continue
            handlers = self._handlers.get(key.fd)
            # A previous callback of this round may have forgotten the fd.
            if handlers is None:
                continue
            on_read, on_write = handlers
            if events & selectors.EVENT_WRITE and on_write:
                on_write()
            if events & selectors.EVENT_READ and on_read and key.fd in self._handlers:
                on_read()
            if self._stopping:
                return
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                timer.callback()
        self._run_ready()

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _run_ready(self) -> None:
        if not self._ready:
            # Nothing queued (call_soon appends before it flags or wakes us, so
            # an item queued right now is seen at the next round): skip the lock.
            return
        with self._ready_lock:
            batch, self._ready = self._ready, deque()
            self._woken = False
        for callback in batch:
            callback()

    def close(self) -> None:
        """Run what other threads queued, then release the selector and wake pipe."""
        self._run_ready()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
