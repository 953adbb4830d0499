"""The one way frames leave an uplink: header and payload together under one lock.

Worker threads (pumps) write DATA with blocking sends, which is the
back-pressure of a congested uplink.  The link thread must never block on
the uplink (if both ends' link threads blocked writing while nobody read,
they would deadlock), so its frames (CONNECT, CLOSE, LISTEN) go through
`post()`: queued, sent at once without waiting if the lock and the socket
allow, otherwise sent by the next worker that holds the lock, or retried by
the link thread (on writability when the socket was full, after a moment
when a worker held the lock).

The queue is bounded by its owner, not here: a CLOSE already waiting for an
id is not queued twice, and the link stops reading the uplink while
`queued_bytes()` is over QUEUE_LIMIT (a peer that never reads but keeps
asking for answers would otherwise grow it without end).
"""

import socket
import threading
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Set

from ..errors import PeerError
from ..wire import frames as protocol
from .transport import Transport, as_transport

_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))   # an int: an IntFlag's | and & run Python code
_MORE = int(getattr(socket, "MSG_MORE", 0))
_data_header = protocol.data_header
_HEADER_SIZE = protocol.HEADER_SIZE
_MAX_PAYLOAD = protocol.MAX_PAYLOAD

# Control frames waiting to be sent: past this the link stops reading.
QUEUE_LIMIT = 16 * 1024


class UplinkClosed(PeerError):
    """Raised to a worker whose frame can no longer be sent: the uplink is gone."""


class FrameWriter:
    """The uplink's frames out, over a Transport.

    Pump threads call send(), send_data() and send_spliced() (blocking, under
    the lock); the link thread calls post(), flush_nowait(), queued_bytes()
    and close(), and never blocks on the uplink.  `bytes_sent` and `error`
    may be read from any thread.
    """
    DONE, BUSY, FULL = "done", "busy", "full"

    def __init__(self, transport: Transport):
        # A bare socket is taken as a plain transport (tests, simple callers).
        self._transport = as_transport(transport)
        self.can_splice = self._transport.can_splice
        self._lock = threading.Lock()
        self._queued: Deque[bytes] = deque()     # control frames, whole
        self._keys: Deque[Optional[int]] = deque()   # their coalescing keys (wire's)
        self._head_sent = 0                       # bytes of _queued[0] already sent
        self._queued_keys: Set[int] = set()       # keys of the frames in _queued
        # Each counter has one writer (post: the link thread; the flushes:
        # whoever holds the lock), so their difference needs no lock.
        self._posted_bytes = 0
        self._flushed_bytes = 0
        self.closed = False
        self.error = ""                           # why a send failed, for the log
        self.bytes_sent = 0                       # DATA payload bytes

    # ---- worker threads ---------------------------------------------------------
    def send_frame(self, frame: bytes,
                   still_wanted: Optional[Callable[[], bool]] = None) -> bool:
        """Send one whole control frame, blocking; False if `still_wanted()` said no
        under the lock.

        Checking under the lock, after queued control frames went out, keeps a
        stream's frames from following the CLOSE that the link thread queued for it.
        """
        return self._locked(still_wanted, 0, [frame], len(frame))

    def send_data(self, client_id: int, data: memoryview,
                  still_wanted: Optional[Callable[[], bool]] = None) -> bool:
        """DATA for `data` of any length: as many frames as it takes, one sendmsg."""
        size = len(data)
        if size <= _MAX_PAYLOAD:   # the common case, kept short for latency
            return self._locked(still_wanted, size, [_data_header(client_id, size), data],
                                _HEADER_SIZE + size)
        parts, wire_bytes = protocol.data_frames(client_id, data)
        return self._locked(still_wanted, size, parts, wire_bytes)

    def send_spliced(self, client_id: int, pipe: int, count: int,
                     still_wanted: Optional[Callable[[], bool]] = None) -> bool:
        """send() of DATA whose `count` payload bytes wait in the pipe `pipe`:
        the kernel moves them to the uplink, no copy passes through Python."""
        head = _data_header(client_id, count)
        return self._locked(still_wanted, count,
                            transmit=lambda: self._splice_all(head, pipe, count))

    def _locked(self, still_wanted: Optional[Callable[[], bool]], data_bytes: int,
                parts: Optional[List[Any]] = None, wire_bytes: int = 0,
                transmit: Optional[Callable[[], None]] = None) -> bool:
        """Under the lock: queued control frames, then `parts` (`wire_bytes` long,
        with one sendmsg unless the kernel takes less) or what `transmit` sends."""
        with self._lock:
            if self.closed:
                raise UplinkClosed()
            try:
                if self._queued:
                    self._flush_queued_blocking()
                if still_wanted is not None and not still_wanted():
                    return False
                # Counted first, so a status never lags bytes the peer already has.
                self.bytes_sent += data_bytes
                if transmit is not None:
                    transmit()
                else:
                    sent = self._transport.sendmsg(parts)
                    if sent != wire_bytes:
                        self._sendmsg_all(parts, sent)
                # Frames queued while we held the lock would otherwise wait.
                if self._queued:
                    self._flush_queued_blocking()
            except OSError as exc:
                raise self._failed(exc) from exc
        return True

    def _failed(self, exc: OSError) -> "UplinkClosed":
        """A send failed: the uplink is done; the error says why, for the log."""
        self.closed = True
        if isinstance(exc, BlockingIOError):   # SO_SNDTIMEO ran out
            self.error = "no progress for the send timeout"
        else:
            self.error = exc.strerror or str(exc)
        return UplinkClosed(self.error)

    def _splice_all(self, head: bytes, pipe: int, count: int) -> None:
        # MSG_MORE holds the header back to leave in one segment with the payload.
        self._transport.sendall(head, _MORE)
        self._transport.splice_from(pipe, count)

    def _sendmsg_all(self, parts: List[Any], sent: int) -> None:
        """Finish a sendmsg of `parts` that took only `sent` bytes (a signal, or
        SO_SNDTIMEO running out while the peer drains): on from the exact byte."""
        while True:
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if not parts:
                return
            if sent:
                parts[0] = memoryview(parts[0])[sent:]
            sent = self._transport.sendmsg(parts)

    def _flush_queued_blocking(self) -> None:
        while self._queued:
            head = self._queued[0]
            self._transport.sendall(memoryview(head)[self._head_sent:])
            self._sent_head(head)

    def _sent_head(self, head: bytes) -> None:
        """Under the lock: `head`, the first queued frame, is all on the wire."""
        if not self._queued or self._queued[0] is not head:
            return   # close() emptied the queue while the send ran (the link's teardown)
        self._queued.popleft()
        key = self._keys.popleft()
        self._head_sent = 0
        self._flushed_bytes += len(head)
        if key is not None:   # a later frame with this key is news again
            self._queued_keys.discard(key)

    # ---- link thread ------------------------------------------------------------
    def post(self, frame: bytes, key: Optional[int] = None) -> bool:
        """Queue a whole control frame for flush_nowait(); False if nothing new was
        queued: closed, or a frame with the same coalescing `key` (wire's
        frames.coalesce_key) still waits, which says it all."""
        if self.closed:
            return False
        if key is not None:
            if key in self._queued_keys:
                return False
            self._queued_keys.add(key)
        self._posted_bytes += len(frame)
        self._queued.append(frame)
        self._keys.append(key)
        return True

    def queued_bytes(self) -> int:
        """Bytes of control frames not yet (wholly) sent."""
        return self._posted_bytes - self._flushed_bytes

    def flush_nowait(self) -> str:
        """Send queued frames as far as possible without waiting.

        DONE: nothing left; BUSY: a worker holds the lock (it will most likely
        send them itself); FULL: the socket took no more, retry when writable.
        """
        if not self._queued:
            return self.DONE
        if not self._lock.acquire(blocking=False):
            return self.BUSY
        try:
            while self._queued and not self.closed:
                head = self._queued[0]
                try:
                    sent = self._transport.send(memoryview(head)[self._head_sent:], _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self.close()
                    return self.DONE   # the link notices the dead uplink by reading it
                self._head_sent += sent
                if self._head_sent < len(head):
                    break
                self._sent_head(head)
            return self.FULL if self._queued else self.DONE
        finally:
            self._lock.release()

    def close(self) -> None:
        """No frame leaves after this.  Unless a send failed or a worker is
        still inside one (its frame must not be cut by it), the transport
        ends the stream in order (goodbye: TLS's close_notify), without
        waiting: the link thread never blocks on the uplink."""
        idle = self._lock.acquire(False)
        try:
            self.closed = True
            self._queued.clear()
            self._keys.clear()
            self._queued_keys.clear()
            self._flushed_bytes = self._posted_bytes
            if idle and not self.error:
                self._transport.goodbye()
        finally:
            if idle:
                self._lock.release()
