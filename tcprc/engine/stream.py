"""One stream (one client of the tunnel) as the engine drives it: its local socket,
its pump thread, who writes what.  Its protocol state is its rules'
(wire.streams: open, half-closed each way, closed, reset, released); what is
kept here is the life of the local socket (`state`, written by the link
thread only):

    OPEN      listed in the link's table; bytes flow both ways.
    DRAINING  the peer closed it: what it sent before its CLOSE still goes to
              the local socket (`pending`), then the socket's write half is shut.
    SHUT      the local socket is shut down (drained, or cut by this side);
              waiting for the pump thread to end and the client to hang up.
    RELEASED  the socket is closed and nothing of the stream remains.

    OPEN -> DRAINING -> SHUT -> RELEASED, and OPEN -> SHUT (cut) or
    OPEN -> RELEASED (the pump ended first: the local side hung up).

Apart from the state, two things cross threads, each under the stream's
lock: `closed` (no frame may be sent for this id any more), flipped once by
whoever gets there first, the pump on local EOF (where the rules let the
pump send CLOSE) or the link on CLOSE or an error; that one sends the
CLOSE, so at most one CLOSE goes out per stream and never DATA after it.
And `credit` (where the rules want credit): what the pump may still send,
spent by the pump, added by the link on the peer's CREDIT; the pump blocks
while it is 0.
"""

import _thread

import socket
import threading
import time
from collections import deque
from enum import Enum
from typing import Any, Deque, Optional, Tuple, Union

from ..wire.streams import StreamRules


class LocalState(Enum):
    OPEN = "open"
    DRAINING = "draining"
    SHUT = "shut"
    RELEASED = "released"


OPEN, DRAINING, SHUT, RELEASED = (LocalState.OPEN, LocalState.DRAINING, LocalState.SHUT,
                                  LocalState.RELEASED)


class Stream:
    """Fields say which thread writes them; the link thread reads them all.

    The pump thread calls only mark_closed(), is_open() and hand_over();
    everything else is for the link thread.
    """

    def __init__(self, client_id: int, peer: str, rules: Optional[StreamRules] = None):
        self.id = client_id                   # fixed
        self.peer = peer                      # fixed; for log lines
        # The protocol's side of the stream (link thread; the pump reads its constants).
        self.rules = rules if rules is not None else StreamRules(client_id)
        self.state = OPEN                     # link thread
        self.closed = False                   # either thread, under _close_lock: mark_closed()
        self.pump_done = False                # link thread, when the pump's exit is delivered
        self.sock: Optional[socket.socket] = None   # link thread (a connecting pump hands it over)
        self.thread = None                    # link thread, at start (a PumpThread)
        self._close_lock = threading.Lock()
        self._connected: Optional[socket.socket] = None  # pump thread, under _close_lock
        self._abandoned = False                           # link thread, under _close_lock
        # Bytes for the local socket, when it took less than it was given.  A
        # deque allocates a 64-slot block at once, so a stream only gets one
        # while it has something queued: () otherwise.  Link thread only.
        self.pending: Union[Deque[memoryview], Tuple[()]] = ()
        self.pending_bytes = 0
        self.last_progress = time.monotonic()
        self.watching_write = False
        self.bytes_to_peer = 0                # pump thread
        self.bytes_from_peer = 0              # link thread
        # What we may send, where the rules want credit: pump spends, link adds (_close_lock).
        self.credit = self.rules.initial_credit
        self._credit_wait: Optional[Any] = None   # a held lock the pump waits on while credit is 0
        self.sent_eof = False                 # pump thread, before it exits: its EOF went out
        self.failure: Optional[Tuple[int, str]] = None   # pump thread: CLOSE reason, text
        self.abort = False                    # link thread: close the local socket with RST

    # ---- either thread --------------------------------------------------------------
    def mark_closed(self) -> bool:
        """Flip to closed; True for the one caller that did it."""
        with self._close_lock:
            if self.closed:
                return False
            self.closed = True
            waiter, self._credit_wait = self._credit_wait, None
        if waiter is not None:
            waiter.release()
        return True

    def is_open(self) -> bool:
        return not self.closed

    # ---- credit (v2) -----------------------------------------------------------------
    def take_credit(self, spent: int) -> int:
        """Pump thread: spend `spent` bytes, then the credit left, waiting while it
        is 0; 0 once the stream is closed."""
        while True:
            with self._close_lock:
                self.credit -= spent
                spent = 0
                if self.closed:
                    return 0
                if self.credit > 0:
                    return self.credit
                waiter = self._credit_wait = _thread.allocate_lock()
                waiter.acquire()
            waiter.acquire()   # released by add_credit or mark_closed

    def add_credit(self, count: int, limit: int) -> bool:
        """Link thread: the peer's CREDIT; False (nothing added) when the credit
        would pass `limit` (the rules' bound)."""
        with self._close_lock:
            if self.credit + count > limit:
                return False
            self.credit += count
            waiter, self._credit_wait = self._credit_wait, None
        if waiter is not None:
            waiter.release()
        return True

    # ---- the connect hand-over --------------------------------------------------------
    def hand_over(self, sock: socket.socket) -> bool:
        """Pump thread: offer the freshly connected socket; False if the link gave up."""
        with self._close_lock:
            if self._abandoned:
                return False
            self._connected = sock
            return True

    def take_connected(self) -> Optional[socket.socket]:
        """Link thread: the socket a connecting pump handed over, once."""
        with self._close_lock:
            sock, self._connected = self._connected, None
            return sock

    def abandon(self) -> Optional[socket.socket]:
        """Link teardown: no socket may be handed over any more; returns one in transit."""
        with self._close_lock:
            self._abandoned = True
            return self._connected

    # ---- link thread: bytes for the local socket --------------------------------------
    def queue(self, data: memoryview) -> None:
        if not self.pending:
            self.pending = deque()
        self.pending.append(data)
        self.pending_bytes += len(data)

    def flush_nowait(self) -> None:
        """Write queued bytes to the local socket without blocking; raises OSError."""
        while self.pending:
            head = self.pending[0]
            try:
                sent = self.sock.send(head, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            self.last_progress = time.monotonic()
            self.pending_bytes -= sent
            if sent < len(head):
                self.pending[0] = head[sent:]
                return
            self.pending.popleft()
        self.pending = ()

    def drop_pending(self) -> None:
        self.pending = ()
        self.pending_bytes = 0
