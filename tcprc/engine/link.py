"""One uplink, driven for both sides: reading, the stream table, local sockets, back-pressure.

The protocol is wire's: the session (wire.session) answers every event with
typed actions (wire.actions), each stream's rules (wire.streams) say what its
frames mean; this link carries them out with sockets, the loop and the pump
threads, and decides nothing about the protocol itself.  What the two sides
add is a role (engine.role.Role, handed in): the device dials what an
OpenLocal asks within its target policy, the server owns host ports, accepts
clients and takes over from a stale uplink.

Back-pressure: for a stream without credit (legacy), bytes for a local socket
that reads slower than the uplink delivers are queued on the stream.  Past
`stream_buffer` bytes the link stops reading the uplink (TCP then slows the
peer down, stalling every stream of the tunnel, as the legacy protocol must);
a stream over its buffer that makes no progress for `stall_timeout` seconds
is closed with a log line, and reading resumes.  A stream with credit (v2)
holds at most its window here.  Reading also stops while the control frames
this side owes the peer (its answers) pile up past writer.QUEUE_LIMIT: a
peer that never reads cannot make them grow without end.  The two reasons to
pause are kept apart, so the end of one does not resume reading while the
other holds.
"""

import logging
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

from ..wire import frames as protocol
from ..wire.actions import (CloseStream, DropStream, Fail, Grant, Log, PeerClosed, PeerEof, Send,
                            Upgraded)
from ..wire.session import Session
from ..wire.streams import failure_code
from .buffers import FrameBuffer
from .loop import Loop
from .pump import PumpHost, PumpThread, run_pump
from .ratelog import LimitedLog
from .role import Role
from .sockets import shutdown_quietly
from .stream import DRAINING, RELEASED, SHUT, Stream
from .transport import Transport
from .writer import QUEUE_LIMIT, FrameWriter
from ..settings import LinkSettings

_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_monotonic = time.monotonic
_LINGER_ABORT = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST
_TCP_CLOSE = 7   # tcpi_state of a connection the kernel tore down (linux/tcp_states.h)
# struct tcp_info: tcpi_bytes_received (Linux >= 4.1) is the u64 at offset 128.
_TCPI_BYTES_RECEIVED = 128
_TCPI_SIZE = _TCPI_BYTES_RECEIVED + 8
_ACK_AT_ONCE = protocol.ACK_AT_ONCE
_CLOSE_ERROR, _CLOSE_RESET = protocol.CLOSE_ERROR, protocol.CLOSE_RESET

# How long a stream closed by the peer may take to hand its last bytes to a
# client and see it hang up, before it is cut.
LINGER = 5.0


class Link(PumpHost):
    """One uplink over an injected transport, loop, session and role.

    Threads: run() is the link thread (it runs the loop, then tears down);
    every method not marked otherwise is for that thread only.  From any
    thread: stop(), call_soon(), uplink_failed(), wait_stopped(), stats()
    (a snapshot of counters).  Pump threads reach it only as a PumpHost.
    The loop is the link's: run() runs it and closes it.
    """

    def __init__(self, transport: Transport, loop: Loop, session: Session, settings: LinkSettings,
                 name: str, role: Optional[Role] = None):
        self.transport = transport
        self.loop = loop
        self.session = session
        self.settings = settings
        self.name = name
        self.role = role if role is not None else Role()
        self.log = logging.getLogger("tcprc." + self.role.log_name)
        self.noisy = LimitedLog(self.log)
        self.writer = FrameWriter(self.transport)
        self.frames = FrameBuffer()
        self.streams: Dict[int, Stream] = {}
        self.open_streams = self.streams       # PumpHost: sizes the pumps' reads
        self.retiring: Set[Stream] = set()     # out of the table, not yet RELEASED
        self.end_reason = ""
        self.bytes_from_peer = 0
        self.refused_streams = 0               # clients refused: no thread could start
        self.started = time.monotonic()
        self._paused = False                   # a stream is over its buffer
        self._control_full = False             # our control frames are over QUEUE_LIMIT
        self._closing = False
        self._watch_uplink_write = False
        self._flush_retry_armed = False
        self._housekeeping_armed = False
        self._session_timer_armed = False
        self._stopped = threading.Event()
        self.last_heard = _monotonic()         # the last read that gave bytes (heartbeats)
        # Chosen once: a plain transport's reads pay nothing for the TLS case.
        self._on_readable: Callable[[], None] = (
            self._on_uplink_buffered if transport.buffers else self._on_uplink_readable)
        self._handlers: Dict[type, Callable[[Any], None]] = {
            Send: self._send, Log: self._log, Fail: lambda action: self.fail(action.reason),
            DropStream: self._drop_stream, CloseStream: self._close_stream_action,
            PeerClosed: self._peer_closed, PeerEof: self._peer_eof, Grant: self._grant,
            Upgraded: self._upgraded,
        }
        self._handlers.update(self.role.attach(self))

    @property
    def sock(self) -> Optional[socket.socket]:
        """The TCP socket under a plain transport (diagnostics, tests); None otherwise."""
        return getattr(self.transport, "sock", None)

    @property
    def v2(self) -> bool:
        return self.session.v2

    @property
    def rtt(self) -> Optional[float]:
        return self.session.rtt

    # ---- lifecycle --------------------------------------------------------------
    def run(self) -> None:
        """Serve the uplink in the calling thread until it ends; then release everything.

        The fault barrier of the link thread: an exception nobody expected (a
        bug) is logged once with its traceback and ends this uplink only; the
        device redials, the server's other uplinks carry on."""
        try:
            try:
                self._watch_uplink()
                self.role.on_start()
                self.act(self.session.start(time.monotonic()))
                self._arm_session_timer()
                self.loop.run()
            except Exception as exc:
                self.internal_error("the link thread", exc)
            try:
                self._teardown()
            except Exception as exc:
                self.internal_error("the uplink's teardown", exc)
                self.discard()
        finally:
            self._stopped.set()

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A bug surfaced in `where`: one line with the traceback, and the uplink ends."""
        self.log.error("%s: internal error in %s, the uplink is closed: %s: %s", self.name,
                       where, type(exc).__name__, exc, exc_info=exc)
        if not self.end_reason:
            self.end_reason = "internal error: %s: %s" % (type(exc).__name__, exc)
        self.loop.stop()

    def discard(self) -> None:
        """Release the transport and the loop of a link that will not run (or whose
        teardown failed): their descriptors go at once, not at garbage collection."""
        self.writer.close()
        for close in (self.transport.close, self.loop.close):
            try:
                close()
            except Exception:
                pass

    def stop(self, reason: str) -> None:
        """Thread-safe: end this uplink."""
        self.loop.call_soon(lambda: self.fail(reason))

    uplink_failed = stop   # PumpHost: a pump's send failed

    def call_soon(self, callback: Any) -> None:
        """Thread-safe (PumpHost): run `callback` in the link thread."""
        self.loop.call_soon(callback)

    def wait_stopped(self, timeout: Optional[float] = None) -> bool:
        return self._stopped.wait(timeout)

    def fail(self, reason: str) -> None:
        """End the uplink (from the link thread); the first reason is kept."""
        if not self.end_reason:
            self.end_reason = reason
        self.loop.stop()

    def _teardown(self) -> None:
        self.role.on_teardown()
        self.session.reset()
        self.writer.close()
        self.transport.shutdown()
        everything = list(self.streams.values()) + list(self.retiring)
        self.streams.clear()
        for stream in everything:
            stream.mark_closed()
            stream.state = SHUT   # released below, once the pumps are gone
            stream.drop_pending()
            if stream.sock is not None:
                self._watch_stream_write(stream, False)
                shutdown_quietly(stream.sock)
            in_transit = stream.abandon()
            if in_transit is not None:
                shutdown_quietly(in_transit)
        # Pumps wake at once (their sockets are shut down); one still inside
        # connect() finishes by itself within connect_timeout and closes its
        # own socket, since the stream is abandoned.
        deadline = time.monotonic() + 2.0
        for stream in everything:
            if stream.thread is not None:
                stream.thread.join(max(0.0, deadline - time.monotonic()))
        self._closing = True
        self.loop.close()   # runs the pumps' last call_soon (stream_connected / pump_exited)
        for stream in everything:
            self._release(stream)
        self.retiring.clear()
        self.transport.close()
        self.role.log_closed()

    # ---- the uplink -------------------------------------------------------------
    def set_reader(self, reader: Callable[[], None]) -> None:
        """Read the uplink with `reader` (a role's first look at a new uplink)."""
        self._on_readable = reader

    def read_frames(self) -> None:
        """The standard reader from now on (a role's first look is over)."""
        self._on_readable = (self._on_uplink_buffered if self.transport.buffers
                             else self._on_uplink_readable)
        self._watch_uplink()
        self._on_readable()

    def _watch_uplink(self) -> None:
        if self._closing:
            return
        reading = not (self._paused or self._control_full)
        self.loop.set_handlers(self.transport, self._on_readable if reading else None,
                               self._on_uplink_writable if self._watch_uplink_write else None)
        if reading and self.transport.buffers:
            self.loop.call_soon(self._read_buffered)

    def _on_uplink_buffered(self) -> None:
        """The read handler over a transport that buffers (TLS): what it took
        from the socket beyond this read would wait for the next packet."""
        self._on_uplink_readable()
        if self.transport.has_buffered():
            self.loop.call_soon(self._read_buffered)

    def _read_buffered(self) -> None:
        if not (self._paused or self._control_full or self.ending) \
                and self.transport.has_buffered():
            self._on_uplink_buffered()

    def _on_uplink_readable(self) -> None:
        try:
            count = self.frames.receive(self.transport, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(self._error_reason(exc))
            return
        self.last_heard = _monotonic()
        if not count:
            partial = self.frames.incomplete_frame()
            self.fail(self._eof_reason() + (" in the middle of a frame (%s)" % partial if partial else ""))
            return
        sole = self.frames.sole_data()
        if sole is not None:
            self._on_data_run(sole[0], [sole[1]])
            return
        acked = False
        # Consecutive DATA frames of one stream (a bulk read holds several)
        # reach its socket in one sendmsg.
        for command, client_id, payload in self.frames.runs():
            if command is None:
                self._on_data_run(client_id, payload)
            else:
                if not acked and command in _ACK_AT_ONCE:
                    acked = self._ack_now()
                self.act(self.session.frame(command, client_id, payload, self.streams,
                                             _monotonic()))
                self._arm_session_timer()
            if self.end_reason:
                return

    def _eof_reason(self) -> str:
        """Why reading the uplink gave EOF: a FIN from the peer, or a dead connection.

        The kernel reports a timed-out or reset connection to one call only;
        when a pump's send took it, the socket state still tells: CLOSE_WAIT
        after the peer's FIN, CLOSE after an abort.
        """
        if self.writer.error:
            return "uplink write failed: %s" % self.writer.error
        info = self.transport.tcp_info(_TCPI_SIZE)
        if info is None:
            return self.role.eof_reason("closed by peer")
        reset = info[:1] == bytes([_TCP_CLOSE])
        if self.peer_sent_nothing():
            return self._silent_close(reset)
        return self.role.eof_reason("connection lost (reset or timed out)" if reset
                                    else "closed by peer")

    def _silent_close(self, reset: bool) -> str:
        """The peer hung up (`reset`: or the connection died) without a byte."""
        return self.role.silent_close(reset) or (
            "connection lost (reset or timed out)" if reset else "closed by peer")

    def _error_reason(self, exc: OSError) -> str:
        """Why reading the uplink failed."""
        if isinstance(exc, ConnectionResetError) and self.peer_sent_nothing():
            return self._silent_close(True)
        return "uplink error: %s" % (exc.strerror or exc)

    def peer_sent_nothing(self) -> bool:
        """The kernel's count: the peer never sent a byte on this uplink (a FIN
        counts as one).  False when the transport cannot tell."""
        info = self.transport.tcp_info(_TCPI_SIZE)
        return info is not None and len(info) >= _TCPI_SIZE and \
            struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0] <= 1

    def _ack_now(self) -> bool:
        """ACK a read that held a CLOSE at once, not after the delayed-ACK timer (40 ms).

        Nothing answers a CLOSE, and a peer with Nagle on, as the Java server
        is, holds its next small frame (the next client's CONNECT) until that
        ACK: every back-to-back client would wait for the timer.  Only CLOSE:
        through the Java server, 100 back-to-back connections took a median
        of 1.4 ms with that, 8.5 ms when every control frame was ACKed at once
        (the extra ACKs cost the server's Nagle more than they save), 45 ms
        without; each ACK is also a packet and a system call (tcprc's own
        connection rate: 3% lower when CONNECTs were ACKed too).
        """
        self.transport.quick_ack()
        return True

    def _on_uplink_writable(self) -> None:
        self._flush_control()

    def post(self, command: int, client_id: int, payload: bytes = b"") -> None:
        """Send a control frame from the link thread without ever blocking on the uplink."""
        self._post(protocol.encode(command, client_id, payload),
                   protocol.coalesce_key(command, client_id))

    def _post(self, frame: bytes, key: Optional[int] = None) -> None:
        # A frame already queued has its flush under way (writability or the retry).
        if self.writer.post(frame, key):
            self._flush_control()

    def _flush_control(self) -> None:
        state = self.writer.flush_nowait()
        want_write = state == FrameWriter.FULL
        # Whatever drains the queue (this, or a worker's send) ends in a call
        # here: on writability when FULL, from the retry when BUSY.
        full = self.writer.queued_bytes() > QUEUE_LIMIT
        if want_write != self._watch_uplink_write or full != self._control_full:
            if full and not self._control_full:
                self.noisy.warning("%s: the peer does not read our control frames "
                                   "(%d bytes queued): stopped reading the uplink",
                                   self.name, self.writer.queued_bytes())
            self._watch_uplink_write = want_write
            self._control_full = full
            self._watch_uplink()
        if state == FrameWriter.BUSY and not self._flush_retry_armed:
            # A worker holds the lock and flushes queued frames when done; this
            # retry only covers the moment between its last check and its release.
            self._flush_retry_armed = True
            self.loop.call_later(0.005, self._retry_flush)

    def _retry_flush(self) -> None:
        self._flush_retry_armed = False
        self._flush_control()

    @property
    def ending(self) -> bool:
        """The uplink has a reason to end, or its teardown is running: nothing new starts."""
        return bool(self.end_reason) or self._closing

    # ---- the session's actions ----------------------------------------------------------
    def act(self, actions: List[Any]) -> None:
        """Carry out what the session answered, in order (wire.actions); roles call
        it with what they asked of the session."""
        handlers = self._handlers
        for action in actions:
            handler = handlers.get(type(action))
            if handler is None:
                self.noisy.warning("%s: ignored %s: not expected on this side", self.name,
                                   type(action).__name__)
            else:
                handler(action)
            if self.end_reason:
                return

    def _send(self, action: Send) -> None:
        self.post(action.command, action.client_id, action.payload)

    def _log(self, action: Log) -> None:
        if action.level >= logging.WARNING:
            self.noisy.warning("%s: %s", self.name, action.message)
        else:
            self.log.log(action.level, "%s: %s", self.name, action.message)

    def _drop_stream(self, action: DropStream) -> None:
        old = self.streams.get(action.client_id)
        if old is not None:
            self.close_stream(old, action.reason, notify_peer=False)

    def _close_stream_action(self, action: CloseStream) -> None:
        stream = self.streams.get(action.client_id)
        if stream is not None:
            self.close_stream(stream, action.reason, code=action.code, text=action.text)

    def _upgraded(self, action: Upgraded) -> None:
        self.role.on_upgraded(action.detail)
        self._heartbeat()

    def _heartbeat(self) -> None:
        if self.ending:
            return
        actions, delay = self.session.tick(_monotonic(), self.last_heard)
        self.act(actions)
        if not self.end_reason:
            self.loop.call_later(delay, self._heartbeat)

    def probe(self, timeout: float, answer: Callable[[bool], None]) -> None:
        """Link thread: is the peer there right now?  A PING (v2) whose PONG must come
        within `timeout` seconds: answer(True) if it did, answer(False) if not (also
        for a legacy session, which has no PING, and an uplink that ended meanwhile)."""
        heartbeat = self.session.heartbeat
        if heartbeat is None or self.ending:
            answer(False)
            return
        self.act([heartbeat.probe(_monotonic())])
        self.loop.call_later(timeout, lambda: answer(heartbeat.probe_answered
                                                     and not self.end_reason))

    def _arm_session_timer(self) -> None:
        # One timer for whatever the session waits for: a timer per event would
        # pile up in the loop's heap when a peer repeats it in a fast cycle.
        if self._session_timer_armed or self._closing:
            return
        deadline = self.session.next_deadline()
        if deadline is not None:
            self._session_timer_armed = True
            self.loop.call_later(max(0.01, deadline - time.monotonic()), self._session_timer)

    def _session_timer(self) -> None:
        self._session_timer_armed = False
        self.act(self.session.expire(time.monotonic(),
                                      not (self._paused or self._control_full)))
        self._arm_session_timer()

    # ---- DATA, the fast path --------------------------------------------------------
    def _on_data_run(self, client_id: int, payloads: List[memoryview]) -> None:
        """DATA frames in a row for one client: their payloads, in order."""
        stream = self.streams.get(client_id)
        if stream is None:
            self.act(self.session.unknown_data(client_id, payloads, time.monotonic()))
            self._arm_session_timer()
            return
        if len(payloads) == 1:
            size = len(payloads[0])
        else:
            payloads = [p for p in payloads if p]
            size = sum(map(len, payloads))
        if not size:
            return
        self.bytes_from_peer += size
        stream.bytes_from_peer += size
        rules = stream.rules
        problem = rules.received(size)
        if problem is not None:
            self.close_stream(stream, problem, code=_CLOSE_ERROR)
            return
        sent = 0
        if stream.sock is not None and not stream.pending:
            try:
                if len(payloads) == 1:   # send() has less to set up than sendmsg()
                    sent = stream.sock.send(payloads[0], _DONTWAIT)
                else:
                    sent = stream.sock.sendmsg(payloads, (), _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close_stream(stream, "write failed: %s" % (exc.strerror or exc),
                                  code=failure_code(exc))
                return
            grant = rules.delivered(sent, True)
            if grant:
                self._post(protocol.credit_frame(client_id, grant))
            if sent == size:
                return
        for payload in payloads:   # what the socket did not take waits on the stream
            if sent >= len(payload):
                sent -= len(payload)
                continue
            stream.queue(memoryview(bytes(payload[sent:])))
            sent = 0
        if stream.sock is not None:
            self._watch_stream_write(stream, True)
        if stream.pending_bytes > self.settings.stream_buffer and not self._paused \
                and not rules.credited:   # a credited stream's queue is bounded by its window
            self._paused = True
            self._watch_uplink()
            self._arm_housekeeping()

    # ---- streams: the peer's frames ----------------------------------------------------
    def _peer_closed(self, action: PeerClosed) -> None:
        stream = self.streams.pop(action.client_id, None)
        if stream is None:
            return
        # Not ours to flip: our pump sent CLOSE and its pump_exited is still
        # queued, so the peer's CLOSE answers it.
        answered = not stream.mark_closed()
        self.act(self.session.peer_closed(stream.rules, answered, time.monotonic()))
        if action.code:
            self.role.on_stream_failed(stream, action.code, action.text)
        else:
            self.role.on_stream_closed(stream, "closed; the peer answered" if answered
                                       else "closed by peer")
        self.retiring.add(stream)
        if action.code == _CLOSE_RESET:
            self._abort(stream)   # the peer's end was reset: so is ours
            return
        # Hand the client what the peer sent before its CLOSE, then hang up.
        stream.state = DRAINING
        if stream.sock is None:
            return   # still connecting: stream_connected() starts the drain
        stream.last_progress = time.monotonic()
        if not stream.pending:
            self._shut(stream, graceful=True)
        self._arm_housekeeping()

    def _peer_eof(self, action: PeerEof) -> None:
        stream = self.streams.get(action.client_id)
        if stream is not None and stream.sock is not None and not stream.pending:
            self._deliver_eof(stream)
        # else: stream_connected or the drain delivers it

    def _grant(self, action: Grant) -> None:
        stream = self.streams.get(action.client_id)
        if stream is not None and not stream.add_credit(action.amount, stream.rules.credit_limit):
            self.close_stream(stream, "the peer granted more than %d bytes of credit"
                              % stream.rules.credit_limit, code=_CLOSE_ERROR)

    def _deliver_eof(self, stream: Stream) -> None:
        """The peer's EOF, after every byte before it: the local socket's write half ends."""
        try:
            stream.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._maybe_finish(stream)

    def _maybe_finish(self, stream: Stream) -> None:
        """Both directions ended (EOF each way, all delivered): CLOSE, and release."""
        if not stream.rules.finished() or stream.pending \
                or self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        self.session.closed_here(stream.id, time.monotonic())
        if stream.mark_closed():
            self._send(self.session.close_frame(stream.rules, 0, ""))
        self.role.on_stream_closed(stream, "closed both ways")
        self._release(stream)

    def _abort(self, stream: Stream) -> None:
        """End the local socket with RST once its pump is out of recv()."""
        stream.abort = True
        stream.state = SHUT
        stream.drop_pending()
        if stream.sock is None:
            return   # still connecting: stream_connected cuts it
        self._watch_stream_write(stream, False)
        if stream.pump_done:
            self._release(stream)
            return
        try:
            stream.sock.shutdown(socket.SHUT_RD)   # wakes the pump; sends nothing
        except OSError:
            pass

    def _shut(self, stream: Stream, graceful: bool) -> None:
        """-> SHUT: shut the local socket down (graceful: only its write half, after
        a drain), then release the stream if its pump is done already."""
        stream.state = SHUT
        stream.drop_pending()
        if stream.sock is not None:
            self._watch_stream_write(stream, False)
            try:
                stream.sock.shutdown(socket.SHUT_WR if graceful else socket.SHUT_RDWR)
            except OSError:
                shutdown_quietly(stream.sock)
        if stream.pump_done:
            self._release(stream)

    # ---- streams: this side ---------------------------------------------------------
    def new_stream(self, client_id: int, peer: str) -> Stream:
        """A Stream under this uplink's rules (version 2's once negotiated)."""
        return Stream(client_id, peer, self.session.new_stream(client_id))

    def open_stream(self, stream: Stream, connect_to: Any = None) -> bool:
        """Register a new stream and start its pump thread.  A thread that cannot
        start (a thread or memory limit) refuses this one client, with a CLOSE
        that says why, and the tunnel carries on."""
        self.streams[stream.id] = stream
        try:
            stream.thread = PumpThread("tcprc-pump-%d" % stream.id, run_pump,
                                       (stream, self.writer, self, connect_to))
        except (RuntimeError, MemoryError, OSError) as exc:
            self.refused_streams += 1
            self.noisy.warning("%s: client %d (%s) refused: cannot start its thread: %s",
                               self.name, stream.id, stream.peer, exc)
            stream.pump_done = True   # there is no pump to wait for
            self.close_stream(stream, "refused: cannot start its thread (%s)" % exc,
                              code=_CLOSE_ERROR, text="cannot start a thread")
            self.role.on_stream_refused(stream)
            return False
        return True

    def stream_connected(self, stream: Stream) -> None:
        """Link thread (PumpHost): a device-side pump connected its socket."""
        stream.sock = stream.take_connected()
        if stream.sock is None:
            return
        if stream.state is SHUT or self.end_reason:
            self._shut(stream, graceful=False)
        elif stream.state is DRAINING:
            # The peer closed it while we connected: deliver what it sent, then hang up.
            stream.last_progress = time.monotonic()
            if stream.pending:
                self._watch_stream_write(stream, True)
            else:
                self._shut(stream, graceful=True)
        elif stream.pending:
            self._watch_stream_write(stream, True)
        elif stream.rules.peer_eof:
            self._deliver_eof(stream)

    def close_stream(self, stream: Stream, reason: str, notify_peer: bool = True,
                     code: int = 0, text: str = "") -> None:
        """Close from this side: CLOSE to the peer (unless told not to), cut the local
        socket.  The CLOSE carries `code` (a CLOSE reason) and `text`, or `reason`,
        where the stream's rules carry reasons."""
        if stream.state is SHUT or stream.state is RELEASED:
            return
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if notify_peer:
                self.session.closed_here(stream.id, time.monotonic())
        if stream.mark_closed() and notify_peer:
            self._send(self.session.close_frame(stream.rules, code, (text or reason) if code
                                                else ""))
        self.role.on_stream_closed(stream, reason)
        if not stream.pump_done:
            self.retiring.add(stream)
        self._shut(stream, graceful=False)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        """Link thread (PumpHost): the stream's pump thread has ended."""
        stream.pump_done = True
        rules = stream.rules
        if not rules.pump_closes and self.streams.get(stream.id) is stream:
            if stream.sent_eof:
                rules.eof_sent()
                self._maybe_finish(stream)   # half-closed: the other way may go on
                return
            # Our side failed (connect, or a socket error): the CLOSE is ours to send.
            code, text = stream.failure or (_CLOSE_ERROR, reason)
            self.close_stream(stream, reason or "closed", code=code, text=text)
            if stream.state is not RELEASED:
                self._release(stream)
            return
        if self.streams.get(stream.id) is stream:
            # The local side ended (the pump sent CLOSE already, or the uplink is gone).
            del self.streams[stream.id]
            self.session.closed_here(stream.id, time.monotonic())
            self.role.on_stream_closed(stream, reason or "closed")
        if stream.state is DRAINING and stream.sock is not None:
            return   # bytes still owed to the client; released when drained or cut
        self._release(stream)

    def _release(self, stream: Stream) -> None:
        """-> RELEASED: close the local socket; nothing of the stream remains."""
        if stream.state is RELEASED:
            return
        stream.state = RELEASED
        self.retiring.discard(stream)
        stream.drop_pending()
        stream.rules.released()
        if stream.sock is not None:
            self._watch_stream_write(stream, False)
            if stream.abort:
                try:
                    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                except OSError:
                    pass
            stream.sock.close()
        self._maybe_resume()
        if not self.streams and not self.retiring and not self._closing:
            # The last stream is gone: the uplink buffer's bulk pages can go
            # too, once the frames of this read are handled.
            self.loop.call_soon(self.frames.calm)

    def _watch_stream_write(self, stream: Stream, on: bool) -> None:
        if on == stream.watching_write or stream.sock is None:
            return
        stream.watching_write = on
        if self._closing:
            return
        if on:
            self.loop.set_handlers(stream.sock, None, lambda: self._on_stream_writable(stream))
        else:
            self.loop.forget(stream.sock)

    def _on_stream_writable(self, stream: Stream) -> None:
        before = stream.pending_bytes
        try:
            stream.flush_nowait()
        except OSError as exc:
            if stream.state is DRAINING:
                self._shut(stream, graceful=False)
            else:
                self.close_stream(stream, "write failed: %s" % (exc.strerror or exc),
                                  code=failure_code(exc))
            return
        grant = stream.rules.delivered(before - stream.pending_bytes, not stream.pending)
        if grant:
            self._post(protocol.credit_frame(stream.id, grant))
        if stream.pending:
            return
        if stream.state is DRAINING:
            self._shut(stream, graceful=True)
        else:
            self._watch_stream_write(stream, False)
            if stream.rules.peer_eof:
                self._deliver_eof(stream)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if not self._paused or self._closing:
            return
        limit = self.settings.stream_buffer
        if any(s.pending_bytes > limit for s in self.streams.values()):
            return
        self._paused = False
        if not self.end_reason:
            self._watch_uplink()

    # ---- stalls and lingering closes ---------------------------------------------
    def _arm_housekeeping(self) -> None:
        if not self._housekeeping_armed:
            self._housekeeping_armed = True
            self.loop.call_later(min(1.0, self.settings.stall_timeout / 2), self._housekeeping)

    def _housekeeping(self) -> None:
        self._housekeeping_armed = False
        now = time.monotonic()
        stall = self.settings.stall_timeout
        if self._paused:
            limit = self.settings.stream_buffer
            for stream in list(self.streams.values()):
                if stream.pending_bytes > limit and now - stream.last_progress > stall:
                    self.noisy.warning(
                        "%s: client %d (%s) read nothing for %g s with %d bytes queued: closed",
                        self.name, stream.id, stream.peer, stall, stream.pending_bytes)
                    self.close_stream(stream, "too slow")
            self._maybe_resume()
        for stream in list(self.retiring):
            # A closed stream may linger to drain and to see the client hang up,
            # but only while it makes progress, and never past LINGER when idle.
            if stream.state is RELEASED:
                continue
            idle = now - stream.last_progress
            if stream.sock is None:
                # Still connecting (the connect timeout bounds that): what the
                # peer sent goes once it has waited past LINGER.
                if idle > LINGER:
                    stream.drop_pending()
            elif (stream.state is DRAINING and idle > stall) or \
                    (stream.state is not DRAINING and idle > LINGER):
                self._shut(stream, graceful=False)
        if self._paused or any(s.state is not RELEASED for s in self.retiring):
            self._arm_housekeeping()

    # ---- status -----------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        return {
            "clients": len(self.streams),
            "bytes_sent": self.writer.bytes_sent,
            "bytes_received": self.bytes_from_peer,
            "uptime": time.monotonic() - self.started,
            "protocol": "v2" if self.session.v2 else "legacy",
            "tls": self.transport.version or "off",
            "rtt": self.session.rtt,
            "refused_streams": self.refused_streams,
        }

