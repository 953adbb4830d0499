"""One uplink, shared by both sides: reading and dispatch, the stream table, back-pressure.

The protocol's rules are the session's (wire.session): the link asks it at
every rule point and carries out the actions it answers.  What the two
sides add is I/O the session cannot do: the device dials what a CONNECT
asks within its target policy (open_requested) and tells a refusal from a
lost uplink; the server owns the host port, accepts clients and takes
over from a stale uplink (listen_granted, host_ready).

Back-pressure: the legacy protocol has no per-stream flow control, so bytes
for a local socket that reads slower than the uplink delivers are queued on
the stream.  Past `stream_buffer` bytes the link stops reading the uplink
(TCP then slows the peer down, stalling every stream of the tunnel, as the
legacy protocol must); a stream over its buffer that makes no progress for
`stall_timeout` seconds is closed with a log line, and reading resumes.
Reading also stops while the control frames this side owes the peer (its
answers) pile up past writer.QUEUE_LIMIT: a peer that never reads cannot
make them grow without end.  The two reasons to pause are kept apart, so
the end of one does not resume reading while the other holds.

Protocol v2 (once the session says UPGRADED): streams opened from then on
have credit windows, so a slow local socket holds at most `window` bytes
here and the uplink is never paused for it; EOF carries a half-close each
way, CLOSE carries a reason and is always answered, and PING/PONG measure
the round trip and notice a silent path (see docs/protocol.md).
"""

import logging
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Set

from ..wire import frames as protocol
from ..wire.session import (AUTHED, DEBUG, DENIED, FAIL, LISTENED, OPEN, REPLACE, SEND,
                            UNLISTEN, UPGRADED, WARN, Session)
from .buffers import FrameBuffer
from .loop import Loop
from .pump import PumpHost, PumpThread, run_pump
from .ratelog import LimitedLog
from .sockets import shutdown_quietly
from .stream import DRAINING, RELEASED, SHUT, Stream
from .transport import Transport
from .v2rules import V2Rules, close_reason, failure_code
from .writer import QUEUE_LIMIT, FrameWriter
from ..settings import LinkSettings

_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))   # an int: an IntFlag's | and & run Python code
_monotonic = time.monotonic
_LINGER_ABORT = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST
_TCP_CLOSE = 7   # tcpi_state of a connection the kernel tore down (linux/tcp_states.h)
# struct tcp_info: tcpi_bytes_received (Linux >= 4.1) is the u64 at offset 128.
_TCPI_BYTES_RECEIVED = 128
_TCPI_SIZE = _TCPI_BYTES_RECEIVED + 8

# How long a stream closed by the peer may take to hand its last bytes to a
# client and see it hang up, before it is cut.
LINGER = 5.0


class Link(PumpHost, V2Rules):
    """One uplink over an injected transport, loop and session.

    Threads: run() is the link thread (it runs the loop, then tears down);
    every method not marked otherwise is for that thread only.  From any
    thread: stop(), call_soon(), uplink_failed(), wait_stopped(), stats()
    (a snapshot of counters).  Pump threads reach it only as a PumpHost.
    The loop is the link's for now: run() runs it and closes it.
    """
    role = "link"

    def __init__(self, transport: Transport, loop: Loop, session: Session, settings: LinkSettings,
                 name: str):
        self.transport = transport
        self.loop = loop
        self.session = session
        self.settings = settings
        self.name = name
        self.log = logging.getLogger("tcprc." + self.role)
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
        self._on_readable = (self._on_uplink_buffered if transport.buffers
                             else self._on_uplink_readable)
        self._dispatch = {
            protocol.CONNECT: self._on_connect,
            protocol.CLOSE: self._on_close,
            # DATA never gets here: the read loop hands runs of it to _on_data_run.
            protocol.LISTEN: self._on_listen,
        }
        # The handshake's frames go to the session; v2's stream frames are known
        # only once it is negotiated (upgrade()): before, they are unknown commands.
        for command in (protocol.OFFER, protocol.HELLO, protocol.CHALLENGE, protocol.AUTH,
                        protocol.WELCOME, protocol.REJECT):
            self._dispatch[command] = self._handshake_handler(command)

    @property
    def sock(self) -> Optional[socket.socket]:
        """The TCP socket under a plain transport (diagnostics, tests); None otherwise."""
        return getattr(self.transport, "sock", None)

    # ---- lifecycle --------------------------------------------------------------
    def run(self) -> None:
        """Serve the uplink in the calling thread until it ends; then release everything.

        The fault barrier of the link thread: an exception nobody expected (a
        bug) is logged once with its traceback and ends this uplink only; the
        device redials, the server's other uplinks carry on."""
        try:
            try:
                self._watch_uplink()
                self.on_start()
                self._act(self.session.start(time.monotonic()))
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
        self.on_teardown()
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
        self.log_closed()

    def log_closed(self) -> None:
        self.log.info("%s: uplink closed: %s", self.name, self.end_reason or "stopped")

    # ---- hooks for the two roles ------------------------------------------------
    def on_start(self) -> None:
        pass

    def on_teardown(self) -> None:
        pass

    def open_requested(self, client_id: int, address: str, port: int, early: bytearray) -> None:
        """The session's OPEN: a CONNECT asks for a stream (the device's part)."""
        self.noisy.warning("%s: ignored CONNECT for client %d: not expected on this side",
                           self.name, client_id)

    def listen_granted(self) -> None:
        """The session's LISTENED: a legacy session is established (the server's part)."""

    def authenticated(self, device_id: str) -> None:
        """The session's AUTHED: a v2 handshake passed its checks (the server's part)."""

    def unlisten(self) -> None:
        """The session's UNLISTEN: it was not legacy after all (the server's part)."""

    def denied(self, device_id: str, message: str) -> None:
        """The session's DENIED: a handshake failed its checks (the server's part)."""
        self.noisy.warning("%s: %s", self.name, message)

    def on_stream_refused(self, stream: Stream) -> None:
        """A stream could not start (no thread for it); counted by the role."""

    def on_stream_closed(self, stream: Stream, reason: str) -> None:
        self.log.info("%s: client %d (%s) closed: %s (%d bytes to the peer, %d from it)",
                      self.name, stream.id, stream.peer, reason, stream.bytes_to_peer,
                      stream.bytes_from_peer)

    # ---- the uplink -------------------------------------------------------------
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
        if not (self._paused or self._control_full or self.end_reason or self._closing) \
                and self.transport.has_buffered():
            self._on_uplink_buffered()

    def _on_uplink_readable(self) -> None:
        try:
            count = self.frames.receive(self.transport, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(self.on_uplink_error(exc))
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
        dispatch = self._dispatch
        # Consecutive DATA frames of one stream (a bulk read holds several)
        # reach its socket in one sendmsg.
        run_id = -1
        run: List[memoryview] = []
        acked = False
        for command, client_id, payload in self.frames.frames():
            if command == protocol.DATA and (client_id == run_id or not run):
                run_id = client_id
                run.append(payload)
                continue
            if run:
                self._on_data_run(run_id, run)
                run_id, run = -1, []
                if self.end_reason:
                    return
            if command == protocol.DATA:
                run_id, run = client_id, [payload]
                continue
            if not acked and command == protocol.CLOSE:
                acked = self._ack_now()
            handler = dispatch.get(command)
            if handler is None:
                self.noisy.warning("%s: skipped unknown command %d for client %d (%d payload bytes)",
                                   self.name, command, client_id, len(payload))
            else:
                handler(client_id, payload)
            if self.end_reason:
                return
        if run:
            self._on_data_run(run_id, run)

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
            return "closed by peer"
        reset = info[:1] == bytes([_TCP_CLOSE])
        if self.peer_sent_nothing():
            return self.on_silent_close(reset)
        return "connection lost (reset or timed out)" if reset else "closed by peer"

    def on_silent_close(self, reset: bool) -> str:
        """The reason when the peer hung up (`reset`: or the connection died)
        without ever sending a byte."""
        return "connection lost (reset or timed out)" if reset else "closed by peer"

    def on_uplink_error(self, exc: OSError) -> str:
        """The reason when reading the uplink failed."""
        if isinstance(exc, ConnectionResetError) and self.peer_sent_nothing():
            return self.on_silent_close(True)
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
        # A frame already queued has its flush under way (writability or the retry).
        if self.writer.post(command, client_id, payload):
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

    # ---- the session's rules ---------------------------------------------------------
    def _act(self, actions: List[Any]) -> None:
        """Carry out what the session answered, in order (see wire.session)."""
        for action in actions:
            kind = action[0]
            if kind is SEND:
                self.post(action[1], action[2], action[3])
            elif kind is WARN:
                self.noisy.warning("%s: %s", self.name, action[1])
            elif kind is DEBUG:
                self.log.debug("%s: %s", self.name, action[1])
            elif kind is REPLACE:
                old = self.streams.get(action[1])
                if old is not None:
                    self.close_stream(old, "replaced by a new CONNECT", notify_peer=False)
            elif kind is OPEN:
                self.open_requested(action[1], action[2], action[3], action[4])
            elif kind is LISTENED:
                self.listen_granted()
            elif kind is AUTHED:
                self.authenticated(action[1])
            elif kind is DENIED:
                self.denied(action[1], action[2])
            elif kind is UNLISTEN:
                self.unlisten()
            elif kind is UPGRADED:
                self.upgrade(action[1], action[2])
            elif kind is FAIL:
                self.fail(action[1])
            if self.end_reason:
                return

    def _on_connect(self, client_id: int, payload: memoryview) -> None:
        self._act(self.session.connect(client_id, payload, client_id in self.streams,
                                       time.monotonic()))

    def _on_listen(self, client_id: int, payload: memoryview) -> None:
        self._act(self.session.listen(_monotonic()))
        self._arm_session_timer()

    def _handshake_handler(self, command: int) -> Any:
        def handle(client_id: int, payload: memoryview) -> None:
            self._act(self.session.frame(command, client_id, payload, self.streams, _monotonic()))
            self._arm_session_timer()
        return handle

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
        self._act(self.session.expire(time.monotonic(),
                                      not (self._paused or self._control_full)))
        self._arm_session_timer()

    # ---- frames -----------------------------------------------------------------
    def _on_data_run(self, client_id: int, payloads: List[memoryview]) -> None:
        """DATA frames in a row for one client: their payloads, in order."""
        stream = self.streams.get(client_id)
        if stream is None:
            self._act(self.session.unknown_data(client_id, payloads, time.monotonic()))
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
        if stream.window:
            if size > stream.allowed or stream.peer_eof:
                self.close_stream(stream, "the peer sent DATA after its EOF" if stream.peer_eof
                                  else "the peer sent %d bytes past its window"
                                  % (size - stream.allowed), code=protocol.CLOSE_ERROR)
                return
            stream.allowed -= size
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
            if stream.window:
                self._delivered(stream, sent)
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
                and not stream.window:   # a v2 stream's queue is bounded by its window
            self._paused = True
            self._watch_uplink()
            self._arm_housekeeping()

    def _on_close(self, client_id: int, payload: memoryview) -> None:
        stream = self.streams.pop(client_id, None)
        if stream is None:
            self._act(self.session.peer_close(client_id, False, False, time.monotonic()))
            return
        # Not ours to flip: our pump sent CLOSE and its pump_exited is still
        # queued, so the peer's CLOSE answers it.
        answered = not stream.mark_closed()
        code = 0
        if stream.window:
            code, text = close_reason(payload)
            if not answered:
                self.post(protocol.CLOSE, client_id)   # v2: every CLOSE is answered
        self._act(self.session.peer_close(client_id, True, answered, time.monotonic()))
        if code:
            self.on_stream_failed(stream, code, text)
        else:
            self.on_stream_closed(stream, "closed; the peer answered" if answered else "closed by peer")
        self.retiring.add(stream)
        if code == protocol.CLOSE_RESET:
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

    # ---- streams ----------------------------------------------------------------
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
                              code=protocol.CLOSE_ERROR, text="cannot start a thread")
            self.on_stream_refused(stream)
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
        elif stream.peer_eof:
            self._deliver_eof(stream)

    def close_stream(self, stream: Stream, reason: str, notify_peer: bool = True,
                     code: int = 0, text: str = "") -> None:
        """Close from this side: CLOSE to the peer (unless told not to), cut the local socket.

        v2: the CLOSE carries `code` (a CLOSE reason) and `text`, or `reason`.
        """
        if stream.state is SHUT or stream.state is RELEASED:
            return
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if notify_peer:
                self.session.closed_here(stream.id, time.monotonic())
        if stream.mark_closed() and notify_peer:
            self.post(protocol.CLOSE, stream.id,
                      protocol.encode_close_reason(code, text or reason) if stream.window and code
                      else b"")
        self.on_stream_closed(stream, reason)
        if not stream.pump_done:
            self.retiring.add(stream)
        self._shut(stream, graceful=False)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        """Link thread (PumpHost): the stream's pump thread has ended."""
        stream.pump_done = True
        if stream.window and self.streams.get(stream.id) is stream:
            if stream.sent_eof:
                self._maybe_finish(stream)   # half-closed: the other way may go on
                return
            # Our side failed (connect, or a socket error): the CLOSE is ours to send.
            code, text = stream.failure or (protocol.CLOSE_ERROR, reason)
            self.close_stream(stream, reason or "closed", code=code, text=text)
            if stream.state is not RELEASED:
                self._release(stream)
            return
        if self.streams.get(stream.id) is stream:
            # The local side ended (the pump sent CLOSE already, or the uplink is gone).
            del self.streams[stream.id]
            self.session.closed_here(stream.id, time.monotonic())
            self.on_stream_closed(stream, reason or "closed")
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
        if stream.window:
            self._forget_growth(stream)
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
        if stream.window:
            self._delivered(stream, before - stream.pending_bytes)
        if stream.pending:
            return
        if stream.state is DRAINING:
            self._shut(stream, graceful=True)
        else:
            self._watch_stream_write(stream, False)
            if stream.peer_eof:
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
            "protocol": "v2" if self.v2 else "legacy",
            "tls": self.transport.version or "off",
            "rtt": self.rtt,
            "refused_streams": self.refused_streams,
        }
