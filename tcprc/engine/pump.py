"""The worker thread of a stream: it copies the local socket into DATA frames.

The pump only reads its socket and writes frames; it never closes the
socket once it has handed it over (`stream_connected`): the link thread
owns closing, after the pump has said it exited.  Which thread writes
which field of a Stream: see engine.stream.
"""

import _thread
import errno
import fcntl
import logging
import os
import socket
import threading
from typing import Any, Callable, Optional, Sized, Tuple, Union

from ..errors import PeerError
from ..wire import frames as protocol
from ..wire.streams import failure_code
from .buffers import KEEP, Pages, anonymous
from .sockets import connect_tcp, tune_stream_socket
from .stream import Stream
from .writer import FrameWriter, UplinkClosed

log = logging.getLogger("tcprc.stream")

READ_CHUNK = protocol.MAX_PAYLOAD
# A read takes up to 16 frames, sent with one sendmsg: fewer syscalls and
# GIL hand-overs per byte.  The open streams share a budget of 32 frames per
# read (one stream: 16, eight: 4, 32 or more: 1), so the buffer pages reads
# touch stay bounded however many streams carry bulk data: about 7 MB, plus
# 64 KB per stream (255 streams: 23 MB at worst, 16 MB with one-frame reads).
READ_FRAMES = 16
READ_BUDGET = 32
# Read size by number of open streams (ids are one byte: at most 256).
# (The 257 entries share the few distinct int objects: 10 KB less than 257 ints of their own.)
_SHARED: dict = {}
_READ_SIZES = [_SHARED.setdefault(size, size) for size in
               (max(1, min(READ_FRAMES, READ_BUDGET // max(1, n))) * READ_CHUNK for n in range(257))]
del _SHARED
PIPE_SIZE = 256 * 1024

# Zero-copy pumps with os.splice (Linux, Python >= 3.10), opt-in with
# TCPRC_SPLICE=1.  Off by default: on loopback it measured slower than the
# copying loop (scripts/bench: 1 stream 6.8 vs 8.0 Gbit/s; it costs a third
# syscall per frame and the receiving link copies anyway).  It may pay where
# the uplink is a real NIC; the copying loop is what old interpreters run.
SPLICE_AVAILABLE = hasattr(os, "splice") and hasattr(os, "pipe2")
SPLICE = SPLICE_AVAILABLE and os.environ.get("TCPRC_SPLICE") == "1"


class PumpThread:
    """The thread of one pump: started at once, joinable with a bound, nothing more.

    Built on _thread, not threading.Thread, which allocates about 2 KB more
    per thread (an Event, a Condition and its deque, weak-set entries: 3.1 KB
    traced against 0.8): 255 streams' worth would stay behind as allocator
    pages after the streams close.  An error that escapes the pump goes to
    threading.excepthook like any other thread's.
    """
    __slots__ = ("name", "_running")

    def __init__(self, name: str, target: Callable[..., None], args: Tuple) -> None:
        self.name = name
        self._running = _thread.allocate_lock()
        self._running.acquire()
        try:
            _thread.start_new_thread(self._run, (target, args))
        except BaseException:
            self._running.release()
            raise

    def _run(self, target: Callable[..., None], args: Tuple) -> None:
        try:
            target(*args)
        except SystemExit:
            pass
        except BaseException as exc:
            threading.excepthook(threading.ExceptHookArgs(
                (type(exc), exc, exc.__traceback__, self)))
        finally:
            self._running.release()

    def is_alive(self) -> bool:
        return self._running.locked()

    def join(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds; True once the thread has ended."""
        if self._running.acquire(timeout=max(0.0, timeout)):
            self._running.release()
            return True
        return False


class PumpHost:
    """What a pump needs from the link that owns its stream; the pump sees nothing else.

    `open_streams`: a Sized whose len() is the number of open streams (it
    sizes reads; read without a lock, a stale count only changes one read).
    `call_soon(callback)` and `uplink_failed(reason)` are thread-safe; the
    pump schedules `stream_connected(stream)` and `pump_exited(stream,
    reason)` with call_soon, so they run in the link thread.
    Link implements this; a test may implement it without a loop.
    """
    open_streams: Sized

    def call_soon(self, callback: Callable[[], Any]) -> None:
        raise NotImplementedError

    def stream_connected(self, stream: "Stream") -> None:
        raise NotImplementedError

    def pump_exited(self, stream: "Stream", reason: str) -> None:
        raise NotImplementedError

    def uplink_failed(self, reason: str) -> None:
        raise NotImplementedError


class TargetRefused(PeerError, OSError):
    """The device's target policy refused what a CONNECT named (the peer asked for
    it; an OSError, so the pump's connect path handles it like a failed dial)."""


REFUSED = "refused: "   # how a pump's exit reason starts after a TargetRefused


def run_pump(stream: Stream, writer: FrameWriter, host: PumpHost,
             connect_to: Union[None, Tuple[str, int, float], Callable[[], socket.socket]] = None) -> None:
    """Body of a pump thread.  `connect_to`, on the device side: (host, port,
    timeout), or a function that returns the connected socket (raises OSError).

    The stream's rules say what its end is: a frame that closes the stream
    (legacy: the pump sends CLOSE when its side ends first), or one that only
    half-closes it (v2: EOF; every CLOSE is the link's, with `stream.failure`
    saying why when this side failed).
    """
    reason = "closed"
    sock = stream.sock
    rules = stream.rules
    try:
        if connect_to is not None:
            try:
                if callable(connect_to):
                    sock = connect_to()
                else:
                    address, port, timeout = connect_to
                    sock = connect_tcp(address, port, timeout)
            except OSError as exc:
                refused = isinstance(exc, TargetRefused)
                if refused:
                    reason = REFUSED + str(exc)
                else:
                    reason = "connect to %s failed: %s" % (stream.peer, exc.strerror or exc)
                if rules.pump_closes:
                    if stream.mark_closed():
                        writer.send_frame(rules.end_frame)
                else:
                    stream.failure = (protocol.close_reason_for(exc, refused),
                                      str(exc) if refused else str(exc.strerror or exc))
                return
            sock.settimeout(None)
            tune_stream_socket(sock)
            if not stream.hand_over(sock):
                sock.close()   # the link is gone; nobody else will close it
                reason = ""
                return
            host.call_soon(lambda: host.stream_connected(stream))
        if rules.credited:
            _copy_with_credit(stream, sock, writer, host.open_streams)
        else:
            _copy_to_uplink(stream, sock, writer, host.open_streams)
        if rules.pump_closes:
            if stream.mark_closed():
                writer.send_frame(rules.end_frame)
            else:
                reason = ""   # the link or the peer closed it and said why
        elif writer.send_frame(rules.end_frame, stream.is_open):
            stream.sent_eof = True
            reason = "sent EOF"
        else:
            reason = ""
    except UplinkClosed as exc:
        reason = "uplink closed"
        if str(exc):
            # A send failed (peer gone, or stuck past send_timeout): the uplink is
            # dead even if reading it has not shown it yet.
            host.uplink_failed("uplink write failed: %s" % exc)
    except OSError as exc:
        reason = "local socket error: %s" % (exc.strerror or exc)
        if rules.pump_closes:
            try:
                if stream.mark_closed():
                    writer.send_frame(rules.end_frame)
            except UplinkClosed:
                pass
        else:
            stream.failure = (failure_code(exc), str(exc.strerror or exc))
    except Exception as exc:
        # The pump's fault barrier: a bug here may have left the stream's
        # accounting (credit, CLOSE) half done, so the whole uplink ends,
        # logged once; the device redials and the other tunnels carry on.
        reason = "internal error"
        log.error("client %d: internal error in its pump thread: %s: %s", stream.id,
                  type(exc).__name__, exc, exc_info=exc)
        host.uplink_failed("internal error in the pump of client %d: %s: %s"
                           % (stream.id, type(exc).__name__, exc))
    finally:
        host.call_soon(lambda: host.pump_exited(stream, reason))


def _copy_with_credit(stream: Stream, sock: socket.socket, writer: FrameWriter,
                      open_streams: Sized) -> None:
    """The copying loop of a v2 stream: never more in flight than the peer granted.

    While the credit is 0 the pump does not read its socket, so TCP slows
    this client down and nobody else.
    """
    if _spliced(stream, sock, writer):
        return
    view, pages = _read_buffer()
    still_open: Callable[[], bool] = stream.is_open
    take_credit = stream.take_credit
    count = 0
    while True:
        credit = take_credit(count)
        if not credit:
            _discard_until_eof(sock, view)   # closed by the link or the peer
            return
        count = sock.recv_into(view, min(credit, _READ_SIZES[len(open_streams)]))
        if not count:
            return
        if not writer.send_data(stream.id, view[:count], still_open):
            _discard_until_eof(sock, view)
            return
        stream.bytes_to_peer += count
        if count > KEEP or pages.wide:
            pages.note(count)


def _copy_to_uplink(stream: Stream, sock: socket.socket, writer: FrameWriter,
                    open_streams: Sized) -> None:
    if _spliced(stream, sock, writer):
        return
    view, pages = _read_buffer()
    still_open: Callable[[], bool] = stream.is_open
    while True:
        count = sock.recv_into(view, _READ_SIZES[len(open_streams)])
        if not count:
            return
        if not writer.send_data(stream.id, view[:count], still_open):
            _discard_until_eof(sock, view)
            return
        stream.bytes_to_peer += count
        if count > KEEP or pages.wide:
            pages.note(count)   # sent: nothing in the buffer is live


def _read_buffer() -> Tuple[memoryview, Pages]:
    """A pump's read buffer: an anonymous mapping, not a bytearray: its pages
    cost RSS only once a read reaches them (an interactive stream touches one
    page, not 64 KB), and they go back to the kernel when the stream calms
    down or closes, instead of fragmenting the malloc arenas that 255 pump
    threads would otherwise grow.  (Unmapped when the last view goes, which
    may be a traceback's: no close().)"""
    mapping = anonymous(READ_FRAMES * READ_CHUNK)
    return memoryview(mapping), Pages(mapping)


def _spliced(stream: Stream, sock: socket.socket, writer: FrameWriter) -> bool:
    """Run the zero-copy pump when it is on and works here; False: copy instead."""
    if not (SPLICE and writer.can_splice):
        return False
    pipe = _open_pipe()
    if pipe is None:
        return False
    try:
        return _splice_to_uplink(stream, sock, writer, pipe)
    finally:
        os.close(pipe[0])
        os.close(pipe[1])


def _open_pipe() -> Optional[Tuple[int, int]]:
    try:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # Room for a whole frame even when the socket hands over small pages.
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass   # the default 64 KB pipe works, in smaller frames
    return read_end, write_end


def _splice_to_uplink(stream: Stream, sock: socket.socket, writer: FrameWriter,
                      pipe: Tuple[int, int]) -> bool:
    """Zero-copy pump: socket -> pipe -> uplink, the frame header sent in between.

    False when this socket cannot be spliced (nothing was read yet): the
    caller then runs the copying loop.
    """
    source, (read_end, write_end) = sock.fileno(), pipe
    still_open: Callable[[], bool] = stream.is_open
    credited = stream.rules.credited
    first = True
    count = limit = READ_CHUNK
    while True:
        if credited:   # v2: never more in flight than the peer granted
            credit = stream.take_credit(0 if first else count)
            if not credit:
                _discard_until_eof(sock, memoryview(bytearray(4096)))
                return True
            limit = min(READ_CHUNK, credit)
        try:
            count = os.splice(source, write_end, limit)
        except OSError as exc:
            if first and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        first = False
        if not count:
            return True
        if not writer.send_spliced(stream.id, read_end, count, still_open):
            _discard_until_eof(sock, memoryview(bytearray(4096)))
            return True   # what the pipe still holds goes with the pipe
        stream.bytes_to_peer += count


def _discard_until_eof(sock: socket.socket, buf: memoryview) -> None:
    """Closed by the peer: read until the client hangs up (or the link shuts us down).

    Closing a socket with unread input makes the kernel send RST, which can
    destroy the last bytes the link wrote to the client; reading to EOF
    keeps the close graceful.  The link bounds this wait.
    """
    while sock.recv_into(buf):
        pass
